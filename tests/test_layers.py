"""Properties every YOLO attention layer must have, checked for every registered family (``modules.names()``).

Module-specific numerics live in test_<family>.py; here: shapes at every YOLO feature size and width,
gradients, dtype/device round trips, AMP, batch-1 training, ONNX export, and that the registry spec agrees
with the constructor.
"""

from __future__ import annotations

import inspect
import io
import pickle

import numpy as np
import pytest
import torch

import modules
from layer_utils import YOLO_CHANNELS, YOLO_SIZES, randomize_

FAMILIES = modules.names()
spec_of = modules.get_spec


def make(name: str, c1: int = 64, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return spec_of(name).layer(c1, **kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_spec_matches_constructor(name):
    spec = spec_of(name)
    assert spec.name == name == spec.layer.__name__
    params = list(inspect.signature(spec.layer.__init__).parameters.values())[1:]
    assert params[0].name == "c1", "the input channel count must be the first argument"
    assert all(p.default is not inspect.Parameter.empty for p in params[1:]), "every other argument needs a default"
    defaults = {p.name: p.default for p in params}
    for hp in spec.hparams:
        assert hp.name in defaults, f"{hp.name} is not a constructor argument"
        assert hp.default == defaults[hp.name]
        assert hp.choices, f"{hp.name} has no choices"
        for value in hp.choices:
            assert isinstance(value, (bool, int, float, str, tuple)), f"{hp.name}: {value!r} is not plain data"


@pytest.mark.parametrize("name", FAMILIES)
def test_every_search_choice_builds(name):
    """Each value the spec lets the search pick at a width builds a working layer."""
    spec = spec_of(name)
    for c1 in (64, 256):
        for hp_name, values in spec.choices_for(c1, (20, 20)).items():
            assert values, f"{name}: no valid {hp_name} at c1={c1}"
            for value in values:
                layer = spec.layer(c1, **{hp_name: value}).eval()
                with torch.no_grad():
                    assert layer(torch.randn(1, c1, 20, 20)).shape == (1, c1, 20, 20)


@pytest.mark.parametrize("name", FAMILIES)
def test_check_names_the_unknown_argument(name):
    with pytest.raises(ValueError, match="no_such_arg"):
        spec_of(name).check(64, no_such_arg=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_all_yolo_feature_sizes(name):
    layer = make(name, 64)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        for h, w in YOLO_SIZES:
            x = torch.randn(2, 64, h, w)
            with torch.no_grad():
                y = layer(x)
            assert y.shape == x.shape, f"{mode} {h}x{w}"
            assert torch.isfinite(y).all(), f"{mode} {h}x{w}"


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("c1", YOLO_CHANNELS)
def test_all_yolo_widths_with_defaults(name, c1):
    layer = make(name, c1).eval()
    x = torch.randn(1, c1, 15, 20)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_reach_every_parameter(name):
    """In train or in eval mode (a bias right before a train-mode BatchNorm has a true gradient of 0)."""
    layer = randomize_(make(name, 64))
    reached = set()
    for train in (True, False):
        layer.zero_grad()
        x = torch.randn(2, 64, 12, 10, requires_grad=True)
        (layer.train(train)(x) * torch.randn(2, 64, 12, 10)).sum().backward()
        assert x.grad.abs().sum() > 0
        reached |= {n for n, p in layer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    missing = [n for n, _ in layer.named_parameters() if n not in reached]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", FAMILIES)
def test_no_frozen_constants_among_parameters(name):
    """Ultralytics' trainer sets requires_grad=True on every parameter; constants must be buffers."""
    assert all(p.requires_grad for p in make(name).parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_of_one_trains(name):
    layer = make(name, 64).train()
    x = torch.randn(1, 64, 10, 10, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_then_to_dtype(name):
    """Ultralytics calls .eval() before .to()/.half(); no cached tensor may stay behind in the old dtype.
    (Small random weights: multiplicative attention outputs grow past float16's range with O(1) weights.)"""
    layer = randomize_(make(name, 64), scale=0.15)
    assert layer.eval() is layer
    x = torch.randn(1, 64, 9, 11)
    with torch.no_grad():
        ref = layer(x)
        out64 = layer.to(torch.float64)(x.double())
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64.float(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        half = layer.half()(x.half())
        assert half.dtype == torch.float16 and torch.isfinite(half).all()
    floats = [t for t in [*layer.parameters(), *layer.buffers()] if t.is_floating_point()]
    assert all(t.dtype == torch.float16 for t in floats)


@pytest.mark.parametrize("name", FAMILIES)
def test_cpu_autocast_forward_backward(name):
    layer = make(name, 64).train()
    x = torch.randn(2, 64, 10, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_pickle_round_trip(name):
    layer = randomize_(make(name, 64)).eval()
    x = torch.randn(1, 64, 10, 10)
    clone = make(name, 64).eval()
    clone.load_state_dict(layer.state_dict())
    copied = pickle.loads(pickle.dumps(layer))  # checkpoints pickle whole modules
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x))
        torch.testing.assert_close(copied(x), layer(x))


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_export_matches_onnxruntime(name):
    ort = pytest.importorskip("onnxruntime")
    layer = randomize_(make(name, 64)).eval()
    x = torch.randn(1, 64, 15, 20)
    buf = io.BytesIO()
    torch.onnx.export(layer, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = layer(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
