"""What a user trains after a search: the renumbering recovered from two YAMLs, the exported ``.pt`` loading and
training through a plain ``YOLO(...)`` in a fresh process from exactly the mapped base, and ``python -m
search.train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import optuna
import pytest
import torch

from search.front.checkpoints import write_mapped, write_tuned
from space import Placement, SpaceError, align, build_space, load_base, make_candidate, to_yaml

from test_search_engine import REPO

NECK_TWO = {"N3": Placement("N3", "CoT"), "N4": Placement("N4", "CGA")}


@pytest.mark.parametrize("base_name", ["yolov8n.yaml", "yolo11n.yaml"])
def test_align_recovers_the_renumbering_of_sampled_candidates(base_name):
    base = load_base(base_name)
    space = build_space(base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
    checked = 0
    while checked < 150:
        try:
            candidate = space.suggest(study.ask())
        except (optuna.TrialPruned, SpaceError):
            continue
        assert align(base.yaml, candidate.yaml) == candidate.base_layers, candidate.describe()
        checked += 1


def test_align_refuses_a_candidate_of_another_base():
    other = make_candidate(load_base("yolo11n.yaml"), {"N3": Placement("N3", "CoT")})
    with pytest.raises(SpaceError, match="not made from this base"):
        align(load_base("yolov8n.yaml").yaml, other.yaml)


def _base_checkpoint(path, nc: int):
    """A base checkpoint as Ultralytics writes one (random weights: what matters is that they arrive)."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    model = YOLO("yolov8n.yaml", task="detect", verbose=False)
    model.model = DetectionModel("yolov8n.yaml", nc=nc, verbose=False)
    model.save(path)
    return {k: v.float() for k, v in torch.load(path, weights_only=False)["model"].state_dict().items()}


@pytest.mark.slow
def test_exported_pt_trains_through_plain_yolo_in_a_fresh_process_from_the_mapped_base(tmp_path, coco128):
    candidate = make_candidate(load_base("yolov8n.yaml"), NECK_TWO)
    state = _base_checkpoint(tmp_path / "base.pt", nc=80)
    names = {i: f"c{i}" for i in range(80)}
    pt = tmp_path / "pareto" / "cand.pt"
    pt.parent.mkdir()
    inherited = write_mapped(pt, to_yaml(candidate), candidate.base_layers, state, names,
                             {"data": str(coco128 / "coco128.yaml"), "imgsz": 64})
    assert inherited.fresh_layers == (16, 20)  # the two neck insertions
    script = textwrap.dedent(f"""
        import torch
        import modules; modules.register()
        from ultralytics import YOLO
        model = YOLO({str(pt)!r})
        def keep(trainer):
            state = {{k: v.detach().clone() for k, v in trainer.model.state_dict().items()}}
            torch.save(state, {str(tmp_path / 'start.pt')!r})
        model.add_callback("on_train_start", keep)
        model.train(data={str(coco128 / 'coco128.yaml')!r}, epochs=1, imgsz=64, batch=4, fraction=0.0625, workers=0,
                    plots=False, project={str(tmp_path)!r}, name="train", exist_ok=True, amp=False)
        print("MAP", model.trainer.metrics["metrics/mAP50-95(B)"])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "YOLO_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MAP" in run.stdout
    start = torch.load(tmp_path / "start.pt")
    checked = 0
    for i, j in candidate.base_layers:
        for key, value in state.items():
            if key.startswith(f"model.{i}.") and value.is_floating_point():
                moved = f"model.{j}." + key[len(f"model.{i}."):]
                # The checkpoint is fp16, as Ultralytics stores one; the base's values survive the round trip.
                assert torch.equal(start[moved].float(), value.half().float()), moved
                checked += 1
    assert checked > 300
    # The candidate's own trained weights (a top rung's last.pt, kept by --save-weights) as <name>-tuned.pt.
    tuned = tmp_path / "pareto" / "cand-tuned.pt"
    assert write_tuned(tmp_path / "train" / "weights" / "last.pt", tuned)
    ckpt = torch.load(tuned, weights_only=False)
    assert ckpt["optimizer"] is None and ckpt["model"].yaml["head"] == candidate.yaml["head"]
    assert not write_tuned(tmp_path / "start.pt", tmp_path / "not-a-checkpoint.pt")
    assert not (tmp_path / "not-a-checkpoint.pt").exists()


@pytest.mark.slow
def test_search_train_maps_a_base_into_a_yaml_and_trains_it(tmp_path, coco128):
    _base_checkpoint(tmp_path / "base.pt", nc=80)
    yaml_path = tmp_path / "cand.yaml"
    yaml_path.write_text(to_yaml(make_candidate(load_base("yolov8n.yaml"), NECK_TWO)))
    out = tmp_path / "full"
    run = subprocess.run([sys.executable, "-m", "search.train", str(yaml_path), "--weights", str(tmp_path / "base.pt"),
                          "--data", str(coco128 / "coco128.yaml"), "--epochs", "1", "--imgsz", "64", "--batch", "4",
                          "--fraction", "0.0625", "--workers", "0", "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tensors of" in run.stderr and "fresh layers [16, 20]" in run.stderr
    line = run.stdout.strip().splitlines()[-1]
    assert line.startswith("cand.yaml: mAP50-95 ") and "after 1 epochs" in line
    result = json.loads((out / "full.json").read_text())
    assert result["epochs"] == 1 and result["start"].endswith("start-cand.pt")
    assert result["training"]["lr0"] == 0.001  # the fine-tuning arguments of the search


def test_search_train_refuses_weights_for_a_pt_and_a_missing_file(tmp_path, capsys):
    from search.train import main

    pt = tmp_path / "c.pt"
    torch.save({"train_args": {"data": "x.yaml"}}, pt)
    for argv, expected in (([str(pt), "--weights", "b.pt"], "holds its own weights"),
                           ([str(tmp_path / "nope.yaml")], "no such .pt or .yaml file"),
                           ([str(pt)], "data YAML x.yaml does not exist")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
