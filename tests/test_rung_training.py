"""Stop at a rung and continue: Ultralytics' own checkpoint/resume, on the top rung's learning-rate schedule."""

import numpy as np
import optuna
import pytest
import torch

import space
from search.training.proxy import ProxySchedule, TrainJob, run_training

pytestmark = pytest.mark.slow
SCHEDULE = ProxySchedule(epochs=3, imgsz=64, batch=4, fraction=(8, 4), train_args=(("warmup_epochs", 1),))


def _digest(tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, coco128):
    """One candidate trained 3 epochs without a stop, and the same stopped after 1 epoch and continued to 3."""
    tmp = tmp_path_factory.mktemp("rungs")
    cand = space.build_space(space.load_base("yolov8n.yaml"), space.SpaceConfig(max_layers=0)).suggest(
        optuna.trial.FixedTrial({"placement": "none"}))
    job = TrainJob(trial=0, candidate_hash=cand.hash, yaml_text=space.to_yaml(cand),
                   data=str(coco128 / "coco128.yaml"), schedule=SCHEDULE, run_dir=str(tmp / "whole"), stop_at=3)
    whole = run_training(job)
    first = run_training(TrainJob(**{**job.__dict__, "run_dir": str(tmp / "rung0"), "stop_at": 1}))
    ckpt = first.extra["checkpoint"]
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)  # read before the continuation overwrites it
    saved["files"] = sorted(p.name for p in (tmp / "rung0").rglob("*.pt"))
    rest = run_training(TrainJob(**{**job.__dict__, "run_dir": str(tmp / "rung1"), "stop_at": 3, "resume": ckpt}))
    saved["files_after_top"] = sorted(p.name for p in (tmp / "rung1").rglob("*.pt"))
    return whole, first, rest, saved


def test_a_stopped_training_is_validated_and_keeps_a_checkpoint(runs):
    whole, first, rest, saved = runs
    assert first.error is None and first.extra["epochs_done"] == 1 and first.map50_95 is not None
    assert saved["epoch"] == 0 and saved["train_args"]["epochs"] == 3, "the checkpoint is on the top rung's schedule"
    assert "checkpoint" not in rest.extra, "the top rung keeps no checkpoint"
    assert saved["files"] == ["last.pt"], "a rung keeps its checkpoint and nothing else (no best.pt to leak)"
    assert saved["files_after_top"] == [], "the top rung writes no weights"


def test_the_continued_run_restores_weights_ema_optimizer_and_epoch(runs):
    _, first, rest, saved = runs
    assert rest.error is None and rest.extra["start_epoch"] == 1 and rest.extra["epochs_done"] == 3
    ema = _digest(saved["ema"].float().state_dict().values())
    opt = saved["optimizer"]["state"]
    assert rest.extra["state_at_start"]["ema"] == ema
    assert rest.extra["state_at_start"]["model"] == ema, "Ultralytics resumes the model from the saved EMA"
    assert rest.extra["state_at_start"]["optimizer"] == _digest(v for k in sorted(opt) for v in opt[k].values())


def test_every_epoch_has_the_uninterrupted_runs_learning_rate(runs):
    whole, first, rest, _ = runs
    assert len(whole.extra["lr"]) == 3
    np.testing.assert_allclose(first.extra["lr"] + rest.extra["lr"], whole.extra["lr"], rtol=1e-12)
    assert len({tuple(lr) for lr in whole.extra["lr"]}) == 3, "the rate changes every epoch: the check can fail"


def test_an_unusable_rung_checkpoint_is_trained_again_from_the_start(runs, tmp_path, coco128):
    """Issue 22: a promoted candidate whose rung checkpoint is truncated (a crash, a full disk) or gone trains its
    rung from the start instead of failing; the trial records why."""
    from search.training.proxy import unusable_checkpoint

    _, first, _, _ = runs
    truncated = tmp_path / "last.pt"
    truncated.write_bytes(open(first.extra["checkpoint"], "rb").read()[:5000])
    assert "missing" in unusable_checkpoint(str(tmp_path / "gone.pt"))
    assert "unreadable" in unusable_checkpoint(str(truncated))
    cand = space.build_space(space.load_base("yolov8n.yaml"), space.SpaceConfig(max_layers=0)).suggest(
        optuna.trial.FixedTrial({"placement": "none"}))
    job = TrainJob(trial=0, candidate_hash=cand.hash, yaml_text=space.to_yaml(cand), data=str(coco128 / "coco128.yaml"),
                   schedule=SCHEDULE, run_dir=str(tmp_path / "again"), stop_at=2, resume=str(truncated))
    res = run_training(job)
    assert res.error is None and "unreadable" in res.extra["rung_restarted"]
    assert res.extra["start_epoch"] == 0 and res.extra["epochs_done"] == 2, "the rung from its first epoch"
    assert res.extra["checkpoint"], "and a new checkpoint for the next rung"
