"""The base training's progress (issue 21): it validates every few epochs so the status line shows its mAP as it
grows, and validating does not change what it learns (the random streams it draws from are restored, so the cached
base weights are those of a training that never validated)."""

from __future__ import annotations

import pytest
import torch

from search import objectives as obj
from search.progress import EpochPlan, Progress
from search.training.proxy import ProxySchedule, TrainJob, epochs_written, run_training
from search.training.weights import base_val_every
from space import load_base, make_candidate, to_yaml

SCHEDULE = ProxySchedule(epochs=3, imgsz=64, batch=4, fraction=(8, 8),
                         train_args=(("lr0", 0.01), ("warmup_epochs", 0)))


def _weights(run_dir) -> dict:
    ckpt = torch.load(run_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in ckpt["ema"].state_dict().items()}  # the network the base cache keeps


@pytest.mark.slow
def test_validating_every_epoch_shows_the_map_and_leaves_the_weights_as_they_were(tmp_path, coco128):
    base = make_candidate(load_base("yolov8n.yaml"))
    jobs = {name: TrainJob(trial=-1, candidate_hash=base.hash, yaml_text=to_yaml(base),
                           data=str(coco128 / "coco128.yaml"), schedule=SCHEDULE, run_dir=str(tmp_path / name),
                           save_weights=True, val_every=every) for name, every in (("plain", 0), ("v2", 2))}
    results = {name: run_training(job) for name, job in jobs.items()}
    for result in results.values():
        assert result.error is None, result.error
    assert len({r.extra["data_order"] for r in results.values()}) == 1, "validating draws no training randomness"
    plain = _weights(tmp_path / "plain")
    validated = _weights(tmp_path / "v2")
    assert all(torch.equal(plain[k], validated[k]) for k in plain), "validation must not change the training"
    assert results["plain"].map50_95 == results["v2"].map50_95
    # Three epochs written; validated after epoch 2 (and 3, the last: read as epoch 2 until a 4th row would come).
    done, latest = epochs_written(jobs["v2"])
    assert done == 3 and latest is not None and latest[0] == 2 and latest[1] >= 0.0
    assert epochs_written(jobs["plain"]) == (3, None), "no validation between epochs: no mAP to show"
    assert epochs_written(TrainJob(**{**jobs["v2"].__dict__, "run_dir": str(tmp_path / "none")})) == (0, None)


def test_the_status_line_shows_the_base_epoch_its_map_and_the_time_left(tmp_path):
    import optuna

    table = obj.parse("mAP50-95,latency_ms")
    study = optuna.create_study(directions=obj.directions(table))
    progress = Progress(study, table, EpochPlan((1, 3), 3, 6, 0, 1), verbose=False, every_s=10**9)
    progress.tick(1, base=(10, 40, 100.0, (10, 0.2137)))
    # then: 6 candidates x 1 epoch and 2 of them 2 more (1 / eta until a rung has results)
    assert progress.status() == "base training: epoch 10/40 (mAP50-95 0.2137 at epoch 10), ~5 min left; " \
                                "then 6 candidates, about 10 epochs", progress.status()
    progress.tick(1, base=(3, 40, 30.0, None))
    assert progress.status().startswith("base training: epoch 3/40, ~6 min left; then")
    progress.close()
    assert [base_val_every(n) for n in (1, 9, 40, 100)] == [1, 1, 5, 12]
