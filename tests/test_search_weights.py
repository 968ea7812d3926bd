"""Weight inheritance and constraints in real searches: --weights auto reused on resume, --weights PATH checks,
--max-params rejecting candidates before any training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from optuna.trial import TrialState

from test_search_engine import REPO, load, run_search, search_cmd

pytestmark = pytest.mark.slow

# Base yolov8n with coco128's 80 classes has 3,157,200 parameters; CoT at N5 (256 ch) adds 60,152 with
# kernel 3 / expansion 4 and 81,016 with kernel 5 / expansion 4.
SPACE = "slots: [N5]\nmax_layers: 1\nmodules:\n  CoT: {kernel_size: [3, 5], expansion: [4]}\n"
MAX_PARAMS = 3_157_200 + 70_000


def test_auto_weights_are_inherited_and_reused_on_resume_and_constraints_skip_training(tmp_path, coco128):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    cmd = search_cmd(tmp_path, coco128, "--study-name", "w", "--space", str(space), "--weights", "auto",
                     "--base-epochs", "1", "--max-params", str(MAX_PARAMS))
    first = run_search([*cmd, "--budget", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "training the base model once" in first.stderr
    state_file = tmp_path / "w" / "base-weights.pt"
    stamp = state_file.stat().st_mtime_ns
    study = load(tmp_path, "w")
    assert study.user_attrs["attnas_settings"]["weights"] == {
        "mode": "auto", "path": None, "sha256": None, "base_epochs": 1,
        "train_args": {"lr0": 0.003, "optimizer": "AdamW", "warmup_epochs": 3}}
    assert study.user_attrs["attnas_base_weights"]["base_map50_95"] >= 0
    base_trial = study.trials[0]
    assert base_trial.user_attrs["inherited_tensors"] > 300 and base_trial.user_attrs["fresh_layers"] == []

    # An over-size candidate, queued so the test does not depend on the sampler's draws.
    study.enqueue_trial({"placement": "N5", "N5.module": "CoT", "N5.CoT.kernel_size": 5})
    study.enqueue_trial({"placement": "N5", "N5.module": "CoT", "N5.CoT.kernel_size": 3})
    second = run_search([*cmd, "--budget", "2"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training the base model once" not in second.stderr  # resume reuses the stored base weights
    assert state_file.stat().st_mtime_ns == stamp
    study = load(tmp_path, "w")
    big, small = study.trials[1], study.trials[2]
    assert big.state == TrialState.COMPLETE and "params" in big.user_attrs["infeasible"]
    assert big.system_attrs["constraints:params"] == big.user_attrs["n_params"] - MAX_PARAMS > 0
    assert "train_s" not in big.user_attrs and not (tmp_path / "w" / "trials" / "1" / "train.log").exists()
    assert small.state == TrialState.COMPLETE and "infeasible" not in small.user_attrs
    assert small.system_attrs["constraints:params"] <= 0
    # The inserted CoT (layer 22 of 23) starts fresh, everything else comes from the base.
    assert small.user_attrs["fresh_layers"] == [22] and small.user_attrs["inherited_tensors"] > 300
    assert big.number not in {t.number for t in study.best_trials}
    counted = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if "infeasible" not in t.user_attrs]
    assert len(counted) == 2

    # The front is exported as ready-to-train checkpoints too, and search.train trains one with the study's schedule.
    pareto_dir = tmp_path / "w" / "pareto"
    yamls = sorted(p.stem for p in pareto_dir.glob("*.yaml"))
    assert yamls and sorted(p.stem for p in pareto_dir.glob("*.pt")) == yamls
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert [row["pt"] for row in summary["pareto"]] == [f"pareto/{stem}.pt" for stem in yamls]
    full = subprocess.run([sys.executable, "-m", "search.train", str(pareto_dir / f"{yamls[0]}.pt"), "--fraction",
                           "0.0625", "--workers", "0"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    assert f"{yamls[0]}.pt: mAP50-95" in full.stdout
    recorded = json.loads((tmp_path / "w" / "full" / yamls[0] / "full.json").read_text())["training"]
    data = str((coco128 / "coco128.yaml").resolve())  # recorded resolved (../shared may be a link)
    assert (recorded["epochs"], recorded["imgsz"], recorded["data"]) == (1, 64, data)
    # Another study on the same base, data and base training takes the cached base, and a different base training
    # misses the cache: tests/test_base_cache.py (without two more searches).


def test_checkpoint_of_another_scale_is_refused_before_anything_runs(tmp_path, coco128):
    from ultralytics.nn.tasks import DetectionModel

    ckpt = tmp_path / "yolov8s.pt"
    torch.save({"model": DetectionModel("yolov8s.yaml", nc=80, verbose=False)}, ckpt)
    result = subprocess.run(search_cmd(tmp_path, coco128, "--weights", str(ckpt), "--budget", "1"),
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --weights") and "another base or scale" in last
    assert not (tmp_path / "yolov8n-coco128").exists()


def test_user_checkpoint_with_other_classes_keeps_all_but_the_class_branch(tmp_path):
    from search.training.weights import WeightsPlan, check_user_checkpoint
    from space import load_base
    from ultralytics.nn.tasks import DetectionModel

    ckpt = tmp_path / "yolov8n-80.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=80, verbose=False).half()}, ckpt)
    state, skipped = check_user_checkpoint(WeightsPlan.parse(str(ckpt), 20), load_base("yolov8n.yaml"), nc=3)
    assert skipped and all(".cv3." in k for k in skipped)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_the_base_cache_address_ignores_the_fresh_layers_recipe():
    """A base has no fresh layers: a study with --fresh-lr-mult reuses it, and a base cached before the recipe
    settings existed keeps its address (the hash of the schedule without them)."""
    import hashlib
    from dataclasses import replace

    from search.training.proxy import ProxySchedule, TrainJob
    from search.training.weights import base_cache_key

    schedule = ProxySchedule(epochs=40, imgsz=128, batch=16)
    job = TrainJob(trial=-1, candidate_hash="h", yaml_text="nc: 1\n", data="d.yaml", schedule=schedule, run_dir="r")
    with_recipe = replace(job, schedule=replace(schedule, fresh_lr_mult=10.0, fresh_init=0.1))
    assert base_cache_key(job, "fp") == base_cache_key(with_recipe, "fp")
    before = {k: v for k, v in schedule.as_dict().items() if k not in ("fresh_lr_mult", "fresh_init")}
    blob = json.dumps({"base": hashlib.sha256(b"nc: 1\n").hexdigest(), "data": "fp", "schedule": before},
                      sort_keys=True, default=str)
    assert base_cache_key(job, "fp") == hashlib.sha256(blob.encode()).hexdigest()[:20]
    assert base_cache_key(replace(job, schedule=replace(schedule, epochs=41)), "fp") != base_cache_key(job, "fp")
