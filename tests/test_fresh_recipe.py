"""The proxy recipe for layers a candidate does not inherit: their own learning rate (a multiple of the inherited
layers', through warm-up, decay and a resume), layer scales out of weight decay, and residual gates opened."""

from __future__ import annotations

import pytest
import torch

import modules
from search.training.proxy import ProxySchedule, TrainJob, run_training
from search.training.weights import save_state
from space import Placement, build_model, load_base, make_candidate, to_yaml

MULT = 10.0
SCHEDULE = ProxySchedule(epochs=3, imgsz=64, batch=4, fraction=(8, 4),
                         train_args=(("lr0", 0.001), ("optimizer", "AdamW"), ("warmup_bias_lr", 0.0),
                                     ("warmup_epochs", 1)),
                         fresh_lr_mult=MULT, fresh_init=0.1)


def test_residual_gates_are_the_closed_scales_of_each_family():
    counts = {name: len(modules.residual_gates(modules.get_spec(name).layer(64))) for name in modules.names()}
    assert counts["STA"] == counts["GMA"] == 0, "no gate: they start as small non-zero branches"
    assert counts["CoT"] == 1 and counts["CGA"] >= 2 and counts["DualViT"] >= 2
    cot = modules.get_spec("CoT").layer(64)
    assert modules.residual_gates(cot)[0] is cot.bn3.weight  # CoTNet's zero_init_last_bn


@pytest.fixture(scope="module")
def trained(tmp_path_factory, coco128):
    """A DualViT inserted at N3 with the recipe: trained 3 epochs in one go, and stopped at 1 and continued to 3."""
    tmp = tmp_path_factory.mktemp("fresh")
    base = load_base("yolov8n.yaml")
    state = {k: v.float() for k, v in build_model(make_candidate(base)).model.state_dict().items()}
    save_state(state, tmp / "base.pt")
    cand = make_candidate(base, {"N3": Placement("N3", "DualViT")})
    job = TrainJob(trial=0, candidate_hash=cand.hash, yaml_text=to_yaml(cand), data=str(coco128 / "coco128.yaml"),
                   schedule=SCHEDULE, run_dir=str(tmp / "whole"), weights=str(tmp / "base.pt"),
                   base_layers=cand.base_layers, stop_at=3)
    whole = run_training(job)
    first = run_training(TrainJob(**{**job.__dict__, "run_dir": str(tmp / "cont"), "stop_at": 1}))
    rest = run_training(TrainJob(**{**job.__dict__, "run_dir": str(tmp / "cont"), "stop_at": 3,
                                    "resume": first.extra["checkpoint"]}))
    return whole, first, rest


@pytest.mark.slow
def test_fresh_layers_learn_at_mult_times_the_inherited_rate_at_every_epoch(trained):
    whole, first, rest = trained
    for result in trained:
        assert result.error is None, result.error
    groups = whole.extra["param_groups"]
    fresh = [i for i, g in enumerate(groups) if g["fresh"]]
    assert fresh and all(groups[i]["params"] for i in fresh)
    epochs = whole.extra["lr"]  # one list of group rates per epoch
    assert len(epochs) == 3
    assert sum(first.extra["lr"] + rest.extra["lr"], []) == pytest.approx(sum(epochs, []))
    for rates in epochs:
        for i in fresh:
            kind = groups[i]["param_group"]
            twin = next(j for j, g in enumerate(groups) if not g["fresh"] and g["param_group"] == kind)
            assert rates[i] == pytest.approx(MULT * rates[twin], rel=1e-9)
    assert len(set(map(tuple, epochs))) == 3, "the rates move (warm-up, then the schedule's decay)"
    # Layer scales (DualViT's gammas, 1-d) of the fresh layer are not decayed; its convolutions and linears are.
    assert any(g["fresh"] and g["param_group"] == "weight" and g["weight_decay"] == 0.0 for g in groups)
    assert any(g["fresh"] and g["param_group"] == "weight" and g["weight_decay"] > 0 for g in groups)
    assert rest.extra["param_groups"] == groups, "a continued training rebuilds the same groups"


@pytest.mark.slow
def test_fresh_init_opens_the_gates_of_a_new_training_only(trained):
    whole, first, rest = trained
    gates = len(modules.residual_gates(modules.get_spec("DualViT").layer(64)))
    assert whole.extra["opened_gates"] == first.extra["opened_gates"] == gates
    assert "opened_gates" not in rest.extra, "a continued training keeps what it learnt"


def test_the_papers_recipe_changes_nothing():
    from search.training.proxy import FreshRecipe, split_fresh_groups

    model = build_model(make_candidate(load_base("yolov8n.yaml"), {"N3": Placement("N3", "CoT")})).model
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "weight_decay": 0.01}], lr=0.001)
    kept = frozenset(range(len(model.model))) - {16}
    groups = split_fresh_groups(optimizer, model, FreshRecipe(kept, 1.0, None))
    assert [g["fresh"] for g in groups] == [False, True, True]  # the layer's own groups, at the same rate
    assert optimizer.param_groups[1]["lr"] == optimizer.param_groups[0]["lr"] == 0.001
    faithful = TrainJob(trial=0, candidate_hash="x", yaml_text="", data="", run_dir="", weights="w.pt",
                        schedule=ProxySchedule(epochs=1, imgsz=64, batch=2))
    from search.training.proxy import _fresh_recipe

    assert _fresh_recipe(faithful) is None, "the papers' recipe leaves Ultralytics' optimizer as it is"


@pytest.mark.slow
def test_one_seed_gives_the_base_and_a_candidate_the_same_batches(tmp_path, coco128):
    """Common random numbers: the paired score (candidate minus base at the same seed) compares two networks on
    the same images, augmented alike, in the same order, although the candidate's fresh layers draw from the
    random generators when they are built."""
    base = load_base("yolov8n.yaml")

    def order(placements, seed: int) -> str:
        cand = make_candidate(base, placements)
        schedule = ProxySchedule(epochs=1, imgsz=64, batch=4, fraction=(8, 4), seed=seed)
        job = TrainJob(trial=0, candidate_hash=cand.hash, yaml_text=to_yaml(cand), data=str(coco128 / "coco128.yaml"),
                       schedule=schedule, run_dir=str(tmp_path / f"{cand.hash}-{seed}"))
        result = run_training(job)
        assert result.error is None, result.error
        return result.extra["data_order"]

    with_layers = {"N3": Placement("N3", "DualViT"), "P5": Placement("P5", "GMA")}
    assert order({}, 0) == order(with_layers, 0)
    assert order(with_layers, 1) != order(with_layers, 0)
