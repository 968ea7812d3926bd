"""Issue 22: free space is checked before a run starts against what it may hold at its peak (rung checkpoints of
the candidates that may wait at a rung, the base's weights, the rest), with one warning line naming both numbers."""

import re
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch

import space
from search import disk
from search.prepare import prepare
from search.run import build_parser
from search.settings import Fidelity, RunSettings, StudySettings
from search.training.proxy import ProxySchedule, TrainJob, run_training
from search.training.weights import WeightsPlan

MB = 10**6
WARNING = re.compile(r"warning: (?P<free>[\d.]+ [kMGT]?B) free on the device of (?P<out>\S+); this run may need up "
                     r"to (?P<need>[\d.]+ [kMGT]?B) at its peak \((?P<n>\d+) rung checkpoints of ~(?P<each>[\d.]+ "
                     r"[kMGT]?B) each, .*\); free space or pass --out on another disk")


@pytest.fixture(scope="module")
def rung_checkpoint(tmp_path_factory, coco128) -> Path:
    """The last.pt a candidate keeps at its first rung (yolov8n, AdamW, stopped after 1 of 3 epochs)."""
    cand = space.build_space(space.load_base("yolov8n.yaml"), space.SpaceConfig(max_layers=0)).suggest(
        optuna.trial.FixedTrial({"placement": "none"}))
    schedule = ProxySchedule(epochs=3, imgsz=64, batch=4, fraction=(8, 4),
                             train_args=(("optimizer", "AdamW"), ("warmup_epochs", 1)))
    job = TrainJob(trial=0, candidate_hash=cand.hash, yaml_text=space.to_yaml(cand), data=str(coco128 / "coco128.yaml"),
                   schedule=schedule, run_dir=str(tmp_path_factory.mktemp("rung") / "0"), stop_at=1)
    result = run_training(job)
    assert result.error is None, result.error
    return Path(result.extra["checkpoint"])


def _prepare(out: Path, coco128: Path, *flags: str):
    """``prepare`` for the coco128 set from scratch (no base training), with ``--out`` at ``out``."""
    return prepare(build_parser().parse_args(["--out", str(out), "--data", str(coco128 / "coco128.yaml"),
                                              "--weights", "none", *flags]))


@pytest.mark.slow
def test_the_estimate_from_the_parameter_count_matches_a_real_rung_checkpoint(rung_checkpoint):
    n_params = disk.base_params(space.load_base("yolov8n.yaml"), nc=80)  # coco128 has 80 classes
    saved = torch.load(rung_checkpoint, map_location="cpu", weights_only=False)
    assert n_params == sum(p.numel() for p in saved["ema"].parameters()), "the counted network is the saved one"
    assert saved["train_args"]["optimizer"] == "AdamW"
    estimate, real = disk.checkpoint_bytes(n_params, "AdamW"), rung_checkpoint.stat().st_size
    assert abs(estimate - real) / real < 0.3, f"estimate {estimate} bytes, last.pt {real} bytes"


def test_several_rungs_need_a_checkpoint_per_candidate_that_may_wait_and_per_worker():
    s, run = StudySettings(), RunSettings(budget=50, workers=2)  # rungs 1,3,9; --weights auto, not stored yet
    need = disk.peak_need(s, run, n_params=3_000_000)
    each = 3_000_000 * 1.5 * 10 + disk.CHECKPOINT_OVERHEAD_BYTES  # candidates: 1.5x the base, AdamW: 10 B/param
    assert (need.checkpoints, need.checkpoint_bytes, need.checkpoint_kind) == (52, each, "rung checkpoints")
    assert need.base_bytes == 2 * disk.checkpoint_bytes(3_000_000, "AdamW") + 2 * disk.state_bytes(3_000_000)
    assert need.other_bytes == disk.OTHER_FILES_BYTES + 50 * disk.OTHER_BYTES_PER_TRIAL
    assert need.total == 52 * each + need.base_bytes + need.other_bytes
    resumed = disk.peak_need(s, run, n_params=3_000_000, counted=45, base_stored=True)
    assert (resumed.checkpoints, resumed.base_bytes) == (5 + 2, 0), "only the budget left; the base is stored"
    assert disk.peak_need(s, run, n_params=3_000_000, counted=50).checkpoints == 0, "the budget is spent"


def test_one_rung_keeps_no_checkpoint_unless_weights_are_saved():
    s = replace(StudySettings(), fidelity=Fidelity(rungs=(3,)), weights=WeightsPlan("none"))
    plain = disk.peak_need(s, RunSettings(budget=50, workers=2), n_params=3_000_000)
    assert (plain.checkpoints, plain.base_bytes) == (0, 0)
    assert plain.total == disk.OTHER_FILES_BYTES + 50 * disk.OTHER_BYTES_PER_TRIAL
    kept = disk.peak_need(s, RunSettings(budget=50, workers=2, save_weights=True), n_params=3_000_000)
    assert (kept.checkpoints, kept.checkpoint_kind) == (100, "kept checkpoints (--save-weights)"), "last.pt and best.pt"


def test_sgd_checkpoints_hold_one_moment_in_fp16():
    s = replace(StudySettings(), proxy=replace(StudySettings().proxy, train_args=(("optimizer", "SGD"),)))
    need = disk.peak_need(s, RunSettings(), n_params=2_000_000)
    assert need.checkpoint_bytes == 3_000_000 * 4 + disk.CHECKPOINT_OVERHEAD_BYTES


def test_sizes_read_in_decimal_units():
    assert [disk.human(n) for n in (512, 4_194_304, 24 * MB, 812 * MB, 1.26e9)] == \
        ["0.5 kB", "4.2 MB", "24 MB", "812 MB", "1.3 GB"]


def test_a_small_disk_gets_one_warning_naming_what_is_free_and_what_the_run_may_need(small_disk, coco128, capsys):
    out = small_disk.path / "runs"
    prep = _prepare(out, coco128)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, lines
    shown = WARNING.fullmatch(lines[0])
    assert shown, lines[0]
    need = disk.peak_need(prep.settings.study, prep.settings.run, disk.base_params(space.load_base("yolov8n.yaml"), 80))
    assert shown["free"] == disk.human(disk.free_bytes(out)) == "4.2 MB"
    assert shown["need"] == disk.human(need.total) and need.total > 2e9
    assert (int(shown["n"]), shown["each"]) == (52, disk.human(need.checkpoint_bytes)), "50 candidates + 2 workers"
    assert shown["out"] == str(out)
    assert list(small_disk.path.iterdir()) == [], "the check writes nothing"


def test_no_warning_when_there_is_room(tmp_path, coco128, capsys):
    prep = _prepare(tmp_path / "runs", coco128, "--budget", "2")
    need = disk.peak_need(prep.settings.study, prep.settings.run, disk.base_params(space.load_base("yolov8n.yaml"), 80))
    if disk.free_bytes(tmp_path) < need.total:
        pytest.skip(f"{tmp_path} has less than {disk.human(need.total)} free")
    assert "warning" not in capsys.readouterr().err
    assert disk.short_of_space(tmp_path, need, free=need.total) is None
