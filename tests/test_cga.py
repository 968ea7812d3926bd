"""CGA: cascaded group attention against formulas written here, official state-dict layout, constraints.

The formulas below restate the EfficientViT operator from its paper/official description (per-head cascade,
BN-folded 1x1 and depthwise convs, relative-position bias over (|dy|, |dx|) offsets numbered in the official
first-appearance order) with einsum over all tokens of one window; they share no code with ``modules.cga``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layer_utils import randomize_
from modules.cga import CGA, SPEC, CascadedGroupAttention, LocalWindowAttention, _reject

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# independent formulas


def _bn(x: torch.Tensor, p: dict, prefix: str, train: bool, eps: float = 1e-5) -> torch.Tensor:
    if train:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = p[prefix + "running_mean"], p[prefix + "running_var"]
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / (var.view(shape) + eps).sqrt() * p[prefix + "weight"].view(shape) + p[
        prefix + "bias"
    ].view(shape)


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x)


def _official_offset_table(r: int) -> torch.Tensor:
    """Offsets numbered by first appearance over all (query, key) pairs in row-major order, as the official code."""
    points = [(i, j) for i in range(r) for j in range(r)]
    seen: dict[tuple[int, int], int] = {}
    idx = [seen.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(seen)) for a in points for b in points]
    return torch.tensor(idx).view(r * r, r * r)


def global_cga(x: torch.Tensor, p: dict, heads: int, key_dim: int, kernels, train: bool) -> torch.Tensor:
    """Cascaded group attention over all tokens of a square map (one window), parameters from a state dict."""
    B, C, H, W = x.shape
    assert H == W
    d = C // heads
    bias = p["attention_biases"][:, _official_offset_table(H)]
    chunks = x.split(d, dim=1)
    outs, feat = [], None
    for i in range(heads):
        feat = chunks[i] if i == 0 else chunks[i] + feat
        qkv = _bn(_pointwise(feat, p[f"qkvs.{i}.c.weight"]), p, f"qkvs.{i}.bn.", train)
        q, k, v = qkv[:, :key_dim], qkv[:, key_dim : 2 * key_dim], qkv[:, 2 * key_dim :]
        ks = kernels[i % len(kernels)]
        q = _bn(F.conv2d(q, p[f"dws.{i}.c.weight"], padding=ks // 2, groups=key_dim), p, f"dws.{i}.bn.", train)
        logits = torch.einsum("bcn,bcm->bnm", q.flatten(2), k.flatten(2)) / math.sqrt(key_dim) + bias[i]
        feat = torch.einsum("bnm,bcm->bcn", logits.softmax(-1), v.flatten(2)).reshape(B, d, H, W)
        outs.append(feat)
    return _bn(_pointwise(torch.cat(outs, 1).relu(), p["proj.1.c.weight"]), p, "proj.1.bn.", train)


def windowed_cga(x: torch.Tensor, p: dict, heads: int, key_dim: int, kernels, window: int, train: bool) -> torch.Tensor:
    """global_cga on every zero-padded window (all windows as one batch, so train-mode BN sees them jointly)."""
    B, C, H, W = x.shape
    nh, nw = -(-H // window), -(-W // window)
    padded = x.new_zeros(B, C, nh * window, nw * window)
    padded[:, :, :H, :W] = x
    cells = [(i * window, j * window) for i in range(nh) for j in range(nw)]
    wins = torch.cat([padded[:, :, r : r + window, c : c + window] for r, c in cells])
    out = global_cga(wins, p, heads, key_dim, kernels, train)
    y = torch.zeros_like(padded)
    for n, (r, c) in enumerate(cells):
        y[:, :, r : r + window, c : c + window] = out[n * B : (n + 1) * B]
    return y[:, :, :H, :W]


def _dw3x3(x, p, prefix, train):
    return _bn(F.conv2d(x, p[prefix + "c.weight"], padding=1, groups=x.shape[1]), p, prefix + "bn.", train)


def _ffn(x, p, prefix, train):
    h = _bn(_pointwise(x, p[prefix + "pw1.c.weight"]), p, prefix + "pw1.bn.", train).relu()
    return _bn(_pointwise(h, p[prefix + "pw2.c.weight"]), p, prefix + "pw2.bn.", train)


def _state(module) -> dict:
    return {k: v.detach() for k, v in module.state_dict().items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# numerics (float64)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    "heads,key_dim,kernels,window", [(4, 8, (5, 5, 5, 5), 7), (3, 16, (7, 5, 3), 5), (2, 8, (3,), 7)]
)
def test_window_equal_to_map_is_global_attention(train, heads, key_dim, kernels, window):
    C = 24
    m = randomize_(LocalWindowAttention(C, key_dim, heads, window_resolution=window, kernels=kernels)).double()
    m.train(train)
    x = torch.randn(2, C, window, window, dtype=torch.float64)
    ref = global_cga(x, _state(m.attn), heads, key_dim, kernels, train)
    assert _rel(m(x), ref) < 1e-12


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("hw,window", [((10, 9), 7), ((5, 5), 7), ((1, 4), 5), ((15, 20), 10), ((14, 7), 7)])
def test_windows_equal_global_attention_per_padded_window(train, hw, window):
    C, heads, key_dim, kernels = 24, 3, 8, (7, 5, 3)
    m = randomize_(LocalWindowAttention(C, key_dim, heads, window_resolution=window, kernels=kernels)).double()
    m.train(train)
    x = torch.randn(2, C, *hw, dtype=torch.float64)
    ref = windowed_cga(x, _state(m.attn), heads, key_dim, kernels, window, train)
    assert m(x).shape == x.shape
    assert _rel(m(x), ref) < 1e-12


@pytest.mark.parametrize("train", [False, True])
def test_core_op_is_global_attention_and_needs_its_resolution(train):
    m = randomize_(CascadedGroupAttention(16, 8, 2, resolution=5, kernels=(3, 5))).double().train(train)
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64)
    assert _rel(m(x), global_cga(x, _state(m), 2, 8, (3, 5), train)) < 1e-12
    with pytest.raises(ValueError, match="resolution=5"):
        m(torch.randn(1, 16, 7, 7, dtype=torch.float64))


@pytest.mark.parametrize("train", [False, True])
def test_block_formula(train):
    C, heads, key_dim, kernels, window = 24, 3, 8, (7, 5, 3), 5
    m = randomize_(CGA(C, key_dim=key_dim, num_heads=heads, window_resolution=window, kernels=kernels)).double()
    m.train(train)
    p = _state(m)
    attn = {k.removeprefix("mixer.m.attn."): v for k, v in p.items() if k.startswith("mixer.m.attn.")}
    x = torch.randn(2, C, 9, 6, dtype=torch.float64)
    y = x + _dw3x3(x, p, "dw0.m.", train)
    y = y + _ffn(y, p, "ffn0.m.", train)
    y = y + windowed_cga(y, attn, heads, key_dim, kernels, window, train)
    y = y + _dw3x3(y, p, "dw1.m.", train)
    y = y + _ffn(y, p, "ffn1.m.", train)
    assert _rel(m(x), y) < 1e-12


def test_block_starts_as_exact_identity_and_op_as_zero():
    x = torch.randn(2, 32, 9, 11)
    layer = CGA(32, num_heads=2)
    assert torch.equal(layer(x), x)
    assert torch.equal(layer.eval()(x), x)
    op = LocalWindowAttention(32, 16, 2)
    assert torch.equal(op(x), torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------------------------
# bias gather: no cached copy to go stale


def test_eval_and_train_return_the_module():
    m = CascadedGroupAttention(16, 8, 2, resolution=5)
    assert m.eval() is m and not m.training
    assert m.train() is m and m.training
    layer = CGA(16, num_heads=2)
    assert layer.eval() is layer


def test_load_state_dict_after_eval_is_used():
    m = randomize_(LocalWindowAttention(16, 8, 2, window_resolution=5)).double().eval()
    x = torch.randn(2, 16, 8, 7, dtype=torch.float64)
    m(x)  # a forward in eval mode before the load (the reference caches the bias gather here)
    new = randomize_(LocalWindowAttention(16, 8, 2, window_resolution=5), seed=1).double().state_dict()
    m.load_state_dict(new)
    ref = windowed_cga(x, _state(m.attn), 2, 8, (5,), 5, False)
    assert _rel(m(x), ref) < 1e-12


def test_dtype_moves_after_eval():
    m = randomize_(LocalWindowAttention(16, 8, 2, window_resolution=5)).eval()
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    m.double()
    ref = windowed_cga(x, _state(m.attn), 2, 8, (5,), 5, False)
    assert _rel(m(x), ref) < 1e-12
    m.half()
    assert m.attn.attention_biases.dtype == torch.float16
    assert _rel(m(x.half()).double(), ref) < 2e-2
    m.to(torch.bfloat16)
    assert _rel(m(x.bfloat16()).double(), ref) < 5e-2


def test_eval_mode_gradient_reaches_bias_table():
    m = randomize_(CascadedGroupAttention(16, 8, 2, resolution=5)).eval()
    m(torch.randn(1, 16, 5, 5)).square().sum().backward()
    assert m.attention_biases.grad is not None and m.attention_biases.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# official state-dict layout


def _bn_keys(prefix: str, n: int) -> dict:
    return {
        f"{prefix}.weight": (n,),
        f"{prefix}.bias": (n,),
        f"{prefix}.running_mean": (n,),
        f"{prefix}.running_var": (n,),
        f"{prefix}.num_batches_tracked": (),
    }


# Official CascadedGroupAttention(32, 8, num_heads=2, attn_ratio=2, resolution=5, kernels=[7, 3]), read off the
# official code: per head qkv 1x1 conv 16 -> 2*8+16, depthwise 8-channel q conv, 32 -> 32 projection.
OFFICIAL_CGA_KEYS = {
    "attention_biases": (2, 25),
    "attention_bias_idxs": (25, 25),
    "qkvs.0.c.weight": (32, 16, 1, 1), **_bn_keys("qkvs.0.bn", 32),
    "qkvs.1.c.weight": (32, 16, 1, 1), **_bn_keys("qkvs.1.bn", 32),
    "dws.0.c.weight": (8, 1, 7, 7), **_bn_keys("dws.0.bn", 8),
    "dws.1.c.weight": (8, 1, 3, 3), **_bn_keys("dws.1.bn", 8),
    "proj.1.c.weight": (32, 32, 1, 1), **_bn_keys("proj.1.bn", 32),
}  # fmt: skip

# Official EfficientViTBlock("s", 32, 8, 2, ar=2, window_resolution=5, kernels=[7, 3]) besides its attention.
OFFICIAL_BLOCK_KEYS = {
    **{"mixer.m.attn." + k: v for k, v in OFFICIAL_CGA_KEYS.items()},
    "dw0.m.c.weight": (32, 1, 3, 3), **_bn_keys("dw0.m.bn", 32),
    "dw1.m.c.weight": (32, 1, 3, 3), **_bn_keys("dw1.m.bn", 32),
    **{k: v for i in (0, 1) for k, v in {
        f"ffn{i}.m.pw1.c.weight": (64, 32, 1, 1), **_bn_keys(f"ffn{i}.m.pw1.bn", 64),
        f"ffn{i}.m.pw2.c.weight": (32, 64, 1, 1), **_bn_keys(f"ffn{i}.m.pw2.bn", 32),
    }.items()},
}  # fmt: skip


def _official_state(table: dict, resolution: int) -> dict:
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for k, shape in table.items():
        if k.endswith("attention_bias_idxs"):
            sd[k] = _official_offset_table(resolution)
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=gen) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=gen)
    return sd


def test_official_op_state_dict_loads_strictly():
    m = CascadedGroupAttention(32, 8, 2, attn_ratio=2, resolution=5, kernels=[7, 3])
    own = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert own == {k: v for k, v in OFFICIAL_CGA_KEYS.items() if k != "attention_bias_idxs"}
    assert "attention_bias_idxs" in dict(m.named_buffers())  # kept, but not persistent
    sd = _official_state(OFFICIAL_CGA_KEYS, 5)
    m.load_state_dict(sd, strict=True)  # the official constant index table is accepted and dropped
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # wrapped in LocalWindowAttention the same keys sit under "attn."
    lwa = LocalWindowAttention(32, 8, 2, resolution=14, window_resolution=5, kernels=[7, 3])
    lwa.load_state_dict({"attn." + k: v for k, v in sd.items()}, strict=True)


def test_official_block_state_dict_loads_strictly():
    layer = CGA(32, key_dim=8, num_heads=2, window_resolution=5, kernels=(7, 3))
    own = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert own == {k: v for k, v in OFFICIAL_BLOCK_KEYS.items() if not k.endswith("attention_bias_idxs")}
    layer.load_state_dict(_official_state(OFFICIAL_BLOCK_KEYS, 5), strict=True)


def test_mismatching_index_table_is_refused():
    m = CascadedGroupAttention(32, 8, 2, resolution=5, kernels=[7, 3])
    sd = _official_state(OFFICIAL_CGA_KEYS, 5)
    sd["attention_bias_idxs"] = sd["attention_bias_idxs"].t().flip(0)
    with pytest.raises(RuntimeError, match="attention_bias_idxs"):
        m.load_state_dict(sd)


def test_offset_numbering_matches_official_order():
    for r in (1, 4, 7):
        assert torch.equal(CascadedGroupAttention(8, 4, 2, resolution=r).attention_bias_idxs, _official_offset_table(r))


def test_window_is_capped_by_resolution_like_the_classification_model():
    lwa = LocalWindowAttention(32, 16, 2, resolution=4, window_resolution=7)
    assert lwa.window_resolution == 4 and lwa.attn.attention_biases.shape == (2, 16)


# ----------------------------------------------------------------------------------------------------------------
# arguments and constraints


def test_kernels_are_cycled_and_derived_sizes():
    m = CascadedGroupAttention(64, 16, num_heads=8)  # officially an IndexError (4 kernels, 8 heads)
    assert [dw.c.kernel_size[0] for dw in m.dws] == [5] * 8
    m = CascadedGroupAttention(48, 8, num_heads=3, kernels=[7, 3])
    assert [dw.c.kernel_size[0] for dw in m.dws] == [7, 3, 7]
    assert m.d == 16 and m.attn_ratio == 2
    assert CGA(96, kernels=[3, 5, 7, 3]).mixer.m.attn.kernels == (3, 5, 7, 3)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"num_heads": 3}, "num_heads"),
        ({"num_heads": 0}, "num_heads"),
        ({"kernels": (5, 4)}, "kernels"),
        ({"kernels": ()}, "kernels"),
        ({"key_dim": 0}, "key_dim"),
        ({"window_resolution": 0}, "window_resolution"),
    ],
)
def test_layer_rejects_impossible_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        CGA(64, **kwargs)


def test_heads_error_lists_valid_values():
    with pytest.raises(ValueError, match=r"num_heads=3 .*c1=64.*\[2, 4\]"):
        CGA(64, num_heads=3)


def test_op_constraints():
    with pytest.raises(ValueError, match="num_heads"):
        CascadedGroupAttention(30, 8, num_heads=4)
    with pytest.raises(ValueError, match="kernels"):
        CascadedGroupAttention(32, 8, num_heads=2, kernels=[5, 2])
    with pytest.raises(ValueError, match=r"attn_ratio=4.*attn_ratio=1"):
        CascadedGroupAttention(64, 16, num_heads=4, attn_ratio=4)  # the official default contradicts the cascade
    with pytest.raises(ValueError, match="ffn_ratio"):
        CGA(64, ffn_ratio=0)
    CascadedGroupAttention(128, 16, num_heads=2, attn_ratio=4)  # the one case the official default fits


def test_spec_matches_constructor_and_rules():
    import inspect

    params = inspect.signature(CGA).parameters
    assert list(params)[0] == "c1"
    for hp in SPEC.hparams:
        assert params[hp.name].default == hp.default, hp.name
        for v in hp.choices:
            assert SPEC.reject(768, None, hp.name, v) is None, (hp.name, v)
    assert SPEC.choices_for(64)["num_heads"] == (2, 4)
    assert SPEC.choices_for(192)["num_heads"] == (2, 3, 4)
    assert _reject(64, None, "kernels", (5, 5, 5, 6)) is not None
    assert _reject(64, None, "num_heads", True) is not None


@pytest.mark.parametrize(
    "hw,windows", [((5, 5), (5,)), ((1, 1), (5,)), ((6, 6), (5, 7)), ((8, 8), (5, 7, 10)), ((20, 15), (5, 7, 10))]
)
def test_window_larger_than_needed_is_rejected_at_known_size(hw, windows):
    assert SPEC.choices_for(64, hw)["window_resolution"] == windows
    with pytest.raises(ValueError, match="window_resolution"):
        SPEC.check(64, (5, 5), window_resolution=7)
