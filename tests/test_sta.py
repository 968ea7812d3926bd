"""STA (super token attention, STViT): numerics against formulas written here, official key names, constraints.

The formulas below are independent of the module's code: the sparse association is written as a dense
pixel x super-token weight matrix built from an explicit 3x3 neighbour table, the attention with einsums.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layer_utils import randomize_
from modules.sta import SPEC, STA, Attention, StokenAttention, _reject


@pytest.fixture(autouse=True)
def _float64_one_thread():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# Reference formulas


def mhsa(tokens: torch.Tensor, attn: Attention) -> torch.Tensor:
    """MHSA over ``tokens`` (B, N, C) with STViT's head-interleaved qkv rows ``[q_h, k_h, v_h]`` per head."""
    b, n, c = tokens.shape
    heads = attn.num_heads
    hd = c // heads
    qkv = tokens @ attn.qkv.weight[:, :, 0, 0].T + attn.qkv.bias
    q, k, v = qkv.reshape(b, n, heads, 3, hd).unbind(3)  # output channel h*3*hd + t*hd + d
    weights = (torch.einsum("bnhd,bmhd->bhnm", q, k) * hd**-0.5).softmax(-1)
    out = torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(b, n, c)
    return out @ attn.proj.weight[:, :, 0, 0].T + attn.proj.bias


def neighbour_onehot(hh: int, ww: int, sh: int, sw: int) -> torch.Tensor:
    """(P, 9, T): pixel p's k-th 3x3 neighbour super token (slot k = 3*(dy+1) + (dx+1)); zero row off the grid."""
    ys, xs = torch.meshgrid(torch.arange(hh * sh), torch.arange(ww * sw), indexing="ij")
    cy, cx = ys.flatten() // sh, xs.flatten() // sw
    onehot = torch.zeros(cy.numel(), 9, hh * ww)
    for k in range(9):
        ty, tx = cy + k // 3 - 1, cx + k % 3 - 1
        for p in torch.nonzero((ty >= 0) & (ty < hh) & (tx >= 0) & (tx < ww)).flatten().tolist():
            onehot[p, k, ty[p] * ww + tx[p]] = 1.0
    return onehot


def sparse_sta(x: torch.Tensor, sh: int, sw: int, n_iter: int, refine, detach_affinity: bool = True) -> torch.Tensor:
    """Steps 1-7 of STViT's super token attention as dense matrices. ``refine`` maps (B, T, C) -> (B, T, C)."""
    b, c, h0, w0 = x.shape
    hh, ww = math.ceil(h0 / sh), math.ceil(w0 / sw)
    xp = F.pad(x, (0, ww * sw - w0, 0, hh * sh - h0))  # 1. zero pad bottom/right
    pix = xp.flatten(2).transpose(1, 2)  # (B, P, C), pixel p = y*W + x
    cell = F.one_hot(
        (torch.arange(hh * sh)[:, None] // sh * ww + torch.arange(ww * sw)[None] // sw).flatten(), hh * ww
    ).to(x.dtype)  # (P, T) pixel -> its own super token
    onehot = neighbour_onehot(hh, ww, sh, sw)
    seen = pix.detach() if detach_affinity else pix
    tokens = torch.einsum("pt,bpc->btc", cell, seen) / (sh * sw)  # 2. block means
    for it in range(n_iter):  # 4. affinity to the 9 neighbours (off-grid neighbours: zero token, logit 0)
        logits = torch.einsum("bpc,pkt,btc->bpk", seen, onehot, tokens) * c**-0.5
        weight = torch.einsum("bpk,pkt->bpt", logits.softmax(-1), onehot)  # (B, P, T)
        if it < n_iter - 1:
            tokens = torch.einsum("bpt,bpc->btc", weight, seen) / (weight.sum(1)[..., None] + 1e-12)
    tokens = torch.einsum("bpt,bpc->btc", weight, pix) / (weight.sum(1)[..., None] + 1e-12)  # 5.
    tokens = refine(tokens)  # 6.
    out = torch.einsum("bpt,btc->bpc", weight, tokens)  # 7. back to pixels, crop
    return out.transpose(1, 2).reshape(b, c, hh * sh, ww * sw)[:, :, :h0, :w0]


def block(layer: STA, x: torch.Tensor, attention) -> torch.Tensor:
    """STViT's StokenAttentionLayer in eval mode, written with functional ops on ``layer``'s parameters."""
    c = x.shape[1]
    g1 = layer.gamma_1 if layer.layerscale else 1.0
    g2 = layer.gamma_2 if layer.layerscale else 1.0
    x = x + F.conv2d(x, layer.pos_embed.conv.weight, layer.pos_embed.conv.bias, padding=1, groups=c)
    ln = layer.norm1.norm
    normed = F.layer_norm(x.permute(0, 2, 3, 1), (c,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    x = x + g1 * attention(normed)
    bn = layer.norm2
    y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    mlp = layer.mlp2
    y = F.gelu(F.conv2d(y, mlp.fc1.weight, mlp.fc1.bias))
    y = y + F.conv2d(y, mlp.conv.conv.weight, mlp.conv.conv.bias, padding=1, groups=y.shape[1])
    return x + g2 * F.conv2d(y, mlp.fc2.weight, mlp.fc2.bias)


def as_grid_fn(fn, h: int, w: int):
    """Wrap a (B, N, C) token function as a B×C×h×w one."""
    return lambda t: fn(t.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(t.shape[0], -1, h, w)


def as_grid_fn_inverse(grid_fn, hh: int, ww: int):
    """Wrap a B×C×hh×ww function as a (B, T, C) one."""
    return lambda s: grid_fn(s.transpose(1, 2).reshape(s.shape[0], -1, hh, ww)).flatten(2).transpose(1, 2)


def grads(module: torch.nn.Module, fn, x: torch.Tensor, seed: int = 1):
    """[output, input gradient, *parameter gradients] of ``fn(x)`` against a fixed random cotangent."""
    x = x.clone().requires_grad_()
    out = fn(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    params = [p for p in module.parameters()]
    g = torch.autograd.grad((out * cot).sum(), [x, *params], allow_unused=True)
    return [out.detach(), g[0], *(torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, g[1:]))]


def assert_same(a, b, rtol=1e-10):
    a, b = (a if isinstance(a, (list, tuple)) else [a]), (b if isinstance(b, (list, tuple)) else [b])
    for u, v in zip(a, b, strict=True):
        scale = max(v.abs().max().item(), 1e-30)
        assert (u - v).abs().max().item() <= rtol * scale


# ---------------------------------------------------------------------------------------------------------
# Numerics


def test_stoken_size_one_is_plain_mhsa():
    op = randomize_(StokenAttention(16, 1, num_heads=2, qkv_bias=True))
    x = torch.randn(2, 16, 5, 7)
    assert_same(grads(op, op, x), grads(op, as_grid_fn(lambda t: mhsa(t, op.stoken_refine), 5, 7), x))


def test_sta_block_with_stoken_size_one_is_plain_mhsa_block():
    layer = randomize_(STA(16, stoken_size=1, num_heads=4, layerscale=True)).eval()
    x = torch.randn(2, 16, 6, 5)
    expected = block(layer, x, as_grid_fn(lambda t: mhsa(t, layer.attn.stoken_refine), 6, 5))
    with torch.no_grad():
        assert_same(layer(x), expected)


@pytest.mark.parametrize(
    "hw, stoken, n_iter, heads",
    [((8, 8), 4, 1, 2), ((10, 7), 4, 1, 1), ((10, 7), 4, 2, 2), ((9, 11), (4, 2), 2, 4), ((5, 5), 8, 1, 1), ((1, 4), 2, 1, 2)],
)
def test_sparse_path_equals_dense_formula(hw, stoken, n_iter, heads):
    """Output, input and parameter gradients of steps 1-7 (train mode: nothing in the op depends on the mode)."""
    op = randomize_(StokenAttention(16, stoken, n_iter=n_iter, num_heads=heads, qkv_bias=True)).train()
    sh, sw = stoken if isinstance(stoken, tuple) else (stoken, stoken)
    x = torch.randn(2, 16, *hw)
    formula = lambda t: sparse_sta(t, sh, sw, n_iter, lambda s: mhsa(s, op.stoken_refine))  # noqa: E731
    assert_same(grads(op, op, x), grads(op, formula, x))


def test_affinity_gets_no_gradient():
    """Gradients equal the formula with the affinity detached and differ from the one without (sensitivity)."""
    op = randomize_(StokenAttention(16, 4, n_iter=2, num_heads=2, qkv_bias=True))
    x = torch.randn(1, 16, 8, 8)
    refine = lambda s: mhsa(s, op.stoken_refine)  # noqa: E731
    dx = grads(op, op, x)[1]
    dx_detached = grads(op, lambda t: sparse_sta(t, 4, 4, 2, refine, detach_affinity=True), x)[1]
    dx_through = grads(op, lambda t: sparse_sta(t, 4, 4, 2, refine, detach_affinity=False), x)[1]
    assert_same(dx, dx_detached)
    assert (dx - dx_through).abs().max() > 1e-3 * dx_through.abs().max()


def test_refine_variants():
    x = torch.randn(1, 16, 10, 7)
    plain = StokenAttention(16, 4, refine=False)
    with torch.no_grad():
        assert_same(plain(x), sparse_sta(x, 4, 4, 1, lambda s: s))
        assert torch.equal(StokenAttention(16, 1, refine=False)(x), x)  # global path without refine: identity
    convs = randomize_(StokenAttention(16, 4, refine_attention=False))
    assert [tuple(p.shape) for p in convs.parameters()] == [(16, 16, 1, 1), (16,), (16, 1, 5, 5), (16,), (16, 16, 1, 1), (16,)]
    with torch.no_grad():
        expected = sparse_sta(x, 4, 4, 1, as_grid_fn_inverse(convs.stoken_refine, 3, 2))
        assert_same(convs(x), expected)


@pytest.mark.parametrize("stoken, hw", [(1, (6, 5)), (4, (10, 7))])
def test_sta_block_matches_formula(stoken, hw):
    layer = randomize_(STA(16, stoken_size=stoken, n_iter=2, num_heads=2, mlp_ratio=3)).eval()
    x = torch.randn(2, 16, *hw)
    if stoken == 1:
        attention = as_grid_fn(lambda t: mhsa(t, layer.attn.stoken_refine), *hw)
    else:
        attention = lambda t: sparse_sta(t, stoken, stoken, 2, lambda s: mhsa(s, layer.attn.stoken_refine))  # noqa: E731
    with torch.no_grad():
        assert_same(layer(x), block(layer, x, attention))


def test_int_and_tuple_stoken_size_are_equivalent():
    a = randomize_(StokenAttention(16, 4, num_heads=2, qkv_bias=True))
    b = StokenAttention(16, (4, 4), num_heads=2, qkv_bias=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 9, 6)
    assert a.stoken_size == b.stoken_size == (4, 4)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert STA(16, 4).attn.stoken_size == STA(16, [4, 4]).attn.stoken_size == (4, 4)


def test_padding_is_unmasked_zero_as_in_the_reference():
    """Padding is unmasked zeros: a 10x7 map gives the crop of the result on its zero-padded 12x8 version."""
    op = randomize_(StokenAttention(16, 4, num_heads=2, qkv_bias=True))
    x = torch.randn(1, 16, 10, 7)
    padded = F.pad(x, (0, 1, 0, 2))  # what the op pads internally
    with torch.no_grad():
        assert_same(op(x), op(padded)[:, :, :10, :7])


def test_low_precision_keeps_the_normalisation_finite():
    op = randomize_(StokenAttention(32, 4, n_iter=2, num_heads=2, qkv_bias=True)).float().eval()
    x = torch.randn(1, 32, 12, 9, dtype=torch.float32)
    with torch.no_grad():
        ref = op(x)
        half = op.half()(x.half()).float()
    assert torch.isfinite(half).all()
    assert (half - ref).abs().max() < 1e-2 * ref.abs().max()


def test_layerscale_block_starts_close_to_the_positional_conv():
    """Init: with layerscale both branches are scaled by 1e-5, so the block is ~ x + dw3x3(x)."""
    layer = STA(32, layerscale=True).eval()
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        base = layer.pos_embed(x)
        assert (layer(x) - base).abs().max() < 1e-3 * base.abs().max()
        assert not torch.allclose(STA(32).eval()(x), base, atol=1e-3)  # without layerscale: O(1) branches


# ---------------------------------------------------------------------------------------------------------
# Official state dict (hhb072/STViT models/stvit.py, StokenAttention(64, (4, 4), num_heads=2, qkv_bias=True))

OFFICIAL_OP_KEYS = {
    "unfold.weights": (9, 1, 3, 3),  # frozen identity kernel: accepted on load, not stored
    "fold.weights": (9, 1, 3, 3),
    "stoken_refine.qkv.weight": (192, 64, 1, 1),
    "stoken_refine.qkv.bias": (192,),
    "stoken_refine.proj.weight": (64, 64, 1, 1),
    "stoken_refine.proj.bias": (64,),
}
# StokenAttentionLayer(64, 1, (8, 8), num_heads=1, qkv_bias=True, layerscale=True), mlp_ratio 4
OFFICIAL_BLOCK_KEYS = {
    "gamma_1": (1, 64, 1, 1),
    "gamma_2": (1, 64, 1, 1),
    "pos_embed.conv.weight": (64, 1, 3, 3),
    "pos_embed.conv.bias": (64,),
    "norm1.norm.weight": (64,),
    "norm1.norm.bias": (64,),
    **{"attn." + k: v for k, v in OFFICIAL_OP_KEYS.items() if "refine.qkv" in k or "refine.proj" in k},
    "attn.unfold.weights": (9, 1, 3, 3),
    "attn.fold.weights": (9, 1, 3, 3),
    "norm2.weight": (64,),
    "norm2.bias": (64,),
    "norm2.running_mean": (64,),
    "norm2.running_var": (64,),
    "norm2.num_batches_tracked": (),
    "mlp2.fc1.weight": (256, 64, 1, 1),
    "mlp2.fc1.bias": (256,),
    "mlp2.fc2.weight": (64, 256, 1, 1),
    "mlp2.fc2.bias": (64,),
    "mlp2.conv.conv.weight": (256, 1, 3, 3),
    "mlp2.conv.conv.bias": (256,),
}


def official_state(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in keys.items():
        if k.endswith("fold.weights"):
            state[k] = torch.eye(9, dtype=torch.float32).reshape(9, 1, 3, 3)
        elif k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        else:
            state[k] = torch.rand(shape, generator=gen, dtype=torch.float32) + 0.5
    return state


def learned(keys: dict) -> dict:
    return {k: v for k, v in keys.items() if not k.endswith("fold.weights")}


def test_official_op_state_dict_keys_and_load():
    op = StokenAttention(64, (4, 4), num_heads=2, qkv_bias=True)
    assert {k: tuple(v.shape) for k, v in op.state_dict().items()} == learned(OFFICIAL_OP_KEYS)
    state = official_state(OFFICIAL_OP_KEYS)
    op.load_state_dict(state, strict=True)  # with the identity kernels
    op.load_state_dict(learned(state), strict=True)  # and without
    assert torch.equal(op.stoken_refine.qkv.weight, state["stoken_refine.qkv.weight"].double())
    assert all(p.requires_grad for p in op.parameters())
    state["fold.weights"] = state["fold.weights"] * 2
    with pytest.raises(RuntimeError, match="identity kernel"):
        op.load_state_dict(state)


def test_official_block_state_dict_keys_and_load():
    layer = STA(64, stoken_size=8, num_heads=1, layerscale=True)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == learned(OFFICIAL_BLOCK_KEYS)
    layer.load_state_dict(official_state(OFFICIAL_BLOCK_KEYS), strict=True)
    assert not any(k.endswith("fold.weights") for k in STA(64).state_dict())  # layerscale off: no gammas either
    assert "gamma_1" not in STA(64).state_dict()


def test_parameter_counts():
    # default arguments: head_dim 64, mlp_ratio 4, qkv_bias; equals StokenAttentionLayer minus the 162 constants
    assert [sum(p.numel() for p in STA(c).parameters()) for c in (64, 128, 256)] == [53_184, 204_672, 802_560]


# ---------------------------------------------------------------------------------------------------------
# Hyper-parameters and constraints


def test_default_heads_follow_head_dim_64():
    heads = {c: STA(c).attn.stoken_refine.num_heads for c in (16, 64, 128, 192, 200, 320, 768)}
    assert heads == {16: 1, 64: 1, 128: 2, 192: 3, 200: 2, 320: 5, 768: 12}
    assert STA(64, num_heads=8).attn.stoken_refine.num_heads == 8


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"num_heads": 8}, "num_heads"),
        ({"num_heads": 0}, "num_heads"),
        ({"n_iter": 0}, "n_iter"),
        ({"n_iter": True}, "n_iter"),
        ({"stoken_size": 0}, "stoken_size"),
        ({"stoken_size": (4, 0)}, "stoken_size"),
        ({"stoken_size": (4, 4, 4)}, "stoken_size"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"mlp_ratio": 0.001}, "mlp_ratio"),
        ({"drop_path": 1.0}, "drop_path"),
        ({"qk_scale": -1.0}, "qk_scale"),
    ],
)
def test_constraint_errors_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        STA(100, **kwargs)


def test_heads_error_lists_valid_values():
    with pytest.raises(ValueError, match=r"num_heads=8.*c1=100.*\[1, 2, 4\]"):
        STA(100, num_heads=8)
    with pytest.raises(ValueError, match="n_iter"):
        StokenAttention(16, 4, n_iter=0)
    with pytest.raises(ValueError, match="stoken_size"):
        StokenAttention(16, 0)
    with pytest.raises(ValueError, match="num_heads"):
        Attention(96, num_heads=5)


def test_reject_on_known_feature_maps():
    assert "1600" in _reject(64, (80, 80), "stoken_size", 1)  # global MHSA at P3 of a 640 input: too large
    assert _reject(64, (40, 40), "stoken_size", 1) is None
    assert "single" in _reject(64, (5, 5), "stoken_size", 8)  # 160 px proxy P5: one super token
    assert _reject(64, (1, 20), "stoken_size", 8) is None  # a 1x20 strip still has 3 super tokens
    assert SPEC.choices_for(64, (1, 1))["stoken_size"] == (1,)
    assert SPEC.choices_for(64, (80, 80))["stoken_size"] == (2, 4, 8)
    assert SPEC.choices_for(64, (8, 8))["stoken_size"] == (1, 2, 4)
    assert SPEC.choices_for(100)["num_heads"] == (1, 2, 4)
    assert SPEC.choices_for(64)["n_iter"] == (1, 2)
    with pytest.raises(ValueError, match="stoken_size"):
        SPEC.check(64, (80, 80), stoken_size=1)
