"""A family defined outside the project joins through the public API alone: registered, found by the space,
sampled, built, trained and exported, without a line of a project file changed. Also what add_family refuses."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import yaml
from torch import nn

import modules
from modules.registry import check_hparams, divisor_of
from space import SpaceConfig, build_model, build_space, canonical_hash, load_base, to_yaml

_REDUCTIONS = (2, 4)


def _reject(c1: int, hw: tuple[int, int] | None, name: str, value: Any) -> str | None:
    if name == "reduction":
        return divisor_of(c1, value, _REDUCTIONS, "gate hidden width = c1 // reduction")
    return None


class Tiny(nn.Module):
    """``x + x * sigmoid(1x1(silu(1x1(x))))``: a 1x1-conv gated residual, the smallest attention-like layer."""

    def __init__(self, c1: int, reduction: int = 4) -> None:
        super().__init__()
        check_hparams("Tiny", _reject, c1, None, {"reduction": reduction})
        self.squeeze = nn.Conv2d(c1, c1 // reduction, 1)
        self.gate = nn.Conv2d(c1 // reduction, c1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * torch.sigmoid(self.gate(nn.functional.silu(self.squeeze(x))))


TINY = modules.ModuleSpec(
    name="Tiny",
    layer=Tiny,
    hparams=(modules.HParam("reduction", _REDUCTIONS, 4, "gate hidden width = c1 // reduction"),),
    reject=_reject,
)


@pytest.fixture
def tiny():
    """Tiny registered for one test; afterwards neither the registry nor Ultralytics knows it."""
    modules.add_family(TINY)
    yield TINY
    modules.remove_family("Tiny")
    import ultralytics.nn.tasks as tasks

    assert "Tiny" not in modules.names() and not hasattr(tasks, "Tiny")


def test_a_seventh_family_is_searched_built_trained_and_exported(tiny, coco128, tmp_path):
    from search.training.proxy import ProxySchedule, TrainJob, run_training  # imported, not edited: the real proxy

    # Found by the space: every slot of yolov8n can hold it, with both reductions (all yolov8n widths are even).
    space = build_space(load_base("yolov8n.yaml"), SpaceConfig(modules={"Tiny": {}}, min_layers=1, max_layers=2))
    assert space.slots and all(space.options[s.name] == {"Tiny": {"reduction": (2, 4)}} for s in space.slots)

    # Sampled through a real Optuna trial.
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    cand = space.suggest(trial)
    assert cand.placements and all(p.module == "Tiny" for p in cand.placements)
    assert any(name.endswith(".Tiny.reduction") for name in trial.params)

    # Exported as YAML: it reads back to the same network (equal canonical hash) and builds through YOLO(...).
    text = to_yaml(cand)
    assert canonical_hash(yaml.safe_load(text)) == cand.hash
    model = build_model(cand).model.eval()
    assert sum(type(m) is Tiny for m in model.model) == len(cand.placements)

    # ONNX of the whole detector runs in onnxruntime and agrees with torch.
    ort = pytest.importorskip("onnxruntime")
    x = torch.rand(1, 3, 64, 64)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["images"])
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[:1]
    with torch.no_grad():
        ref = model(x)[0].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(ref).max()))

    # Trained by the search's own proxy (Ultralytics' DetectionTrainer): 1 epoch, 64 px, 8 + 8 real images.
    schedule = ProxySchedule(epochs=1, imgsz=64, batch=4, fraction=(8, 8))
    job = TrainJob(trial=0, candidate_hash=cand.hash, yaml_text=text, data=str(coco128 / "coco128.yaml"),
                   schedule=schedule, run_dir=str(tmp_path / "trial"))
    result = run_training(job)
    assert result.error is None, f"{result.error}\n{result.traceback}"
    assert math.isfinite(result.map50_95) and 0.0 <= result.map50_95 <= 1.0


def test_add_family_refuses_what_would_break_lookups(tiny):
    assert modules.add_family(TINY) is TINY  # the same spec again is a no-op
    other = modules.ModuleSpec("Tiny", type("Tiny", (Tiny,), {}), TINY.hparams, _reject)
    with pytest.raises(ValueError, match="already registered"):
        modules.add_family(other)
    misnamed = modules.ModuleSpec("Small", Tiny, TINY.hparams, _reject)
    with pytest.raises(ValueError, match="must equal its layer's class name 'Tiny'"):
        modules.add_family(misnamed)
    with pytest.raises(TypeError, match="ModuleSpec"):
        modules.add_family(Tiny)
    with pytest.raises(ValueError, match="unknown attention module 'Small'"):
        modules.remove_family("Small")


def test_register_binds_an_added_family_and_refuses_to_shadow_ultralytics(tiny):
    import ultralytics.nn.tasks as tasks

    modules.register()
    assert tasks.Tiny is Tiny and Tiny in torch.serialization.get_safe_globals()
    with pytest.raises(ValueError, match="reduction=3 .*c1=64.*valid values that divide 64: \\[2, 4\\]"):
        Tiny(64, reduction=3)

    shadow = modules.ModuleSpec("C2f", type("C2f", (Tiny,), {}), TINY.hparams, _reject)
    modules.add_family(shadow)
    try:
        with pytest.raises(ValueError, match="would shadow Ultralytics' own C2f"):
            modules.register()
        assert tasks.C2f is not shadow.layer
    finally:
        modules.remove_family("C2f")
    assert "C2f" not in modules.names() and tasks.C2f.__module__.startswith("ultralytics")
