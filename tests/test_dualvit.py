"""DualViT: numerics against formulas written here, official state-dict names, constraints and edge cases.

The formulas below re-state the reference (YehLi/ImageNetModel ``classification/dualvit.py``) independently of
the module's code: per-head loops instead of reshapes, functional LayerNorm/linear/conv calls.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layer_utils import randomize_
from modules.dualvit import SPEC, DualAttention, DualBlock, DualViT, SemanticInit, grid_pool


@pytest.fixture
def float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def ln(t, norm):
    return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def lin(t, linear):
    return t @ linear.weight.T + linear.bias


def mha(q, k, v, heads):
    """Multi-head softmax attention on (B, N, C) tensors, one head at a time, scale head_dim**-0.5."""
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(a @ v[..., sl])
    return torch.cat(outs, dim=-1)


def dual_attention_formula(m, x, s, heads):
    C = x.shape[-1]
    # 1. semantic self-attention
    qkv = lin(ln(s, m.qkv_proxy[0]), m.qkv_proxy[1])
    s = s + m.gamma1 * mha(qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :], heads)
    # 2. semantics attend to pixels
    kv = lin(x, m.kv_proxy)
    s = s + m.gamma2 * mha(lin(ln(s, m.q_proxy_ln), m.q_proxy), kv[..., :C], kv[..., C:], heads)
    # 3. semantic MLP
    s = s + m.gamma3 * lin(torch.relu(lin(ln(s, m.p_ln), m.mlp_proxy[0])), m.mlp_proxy[2])
    # 4. pixels attend to the semantics only
    kv = lin(ln(s, m.proxy_ln), m.kv)
    return lin(mha(lin(x, m.q), kv[..., :C], kv[..., C:], heads), m.proj), s


def test_dual_attention_matches_its_four_steps(float64):
    heads, C, H, W, M = 3, 24, 5, 4, 6
    m = randomize_(DualAttention(C, heads))
    x, s = torch.randn(2, H * W, C), torch.randn(2, M, C)
    y, s_out = m(x, H, W, s)
    y_ref, s_ref = dual_attention_formula(m, x, s, heads)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_out, s_ref, rtol=1e-12, atol=1e-12)


def test_dual_block_matches_formula(float64):
    heads, C, H, W, M, ratio = 2, 16, 4, 3, 5, 3
    m = randomize_(DualBlock(C, heads, ratio)).train()  # no dropout/BN: train == eval
    x, s = torch.randn(2, H * W, C), torch.randn(2, M, C)
    y, s_out = m(x, H, W, s)

    a, s_ref = dual_attention_formula(m.attn, ln(x, m.norm1), s, heads)
    x1 = x + m.gamma1 * a
    hid = lin(ln(x1, m.norm2), m.mlp.fc1)  # B, N, ratio*C
    grid = hid.transpose(1, 2).reshape(2, C * ratio, H, W)
    conv = m.mlp.dwconv.dwconv
    grid = F.conv2d(grid, conv.weight, conv.bias, padding=1, groups=C * ratio)
    ffn = lin(F.gelu(grid.flatten(2).transpose(1, 2)), m.mlp.fc2)
    torch.testing.assert_close(y, x1 + m.gamma2 * ffn, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_out, s_ref, rtol=1e-12, atol=1e-12)


def reference_semantic_init(m, x):
    """Reference stage-1 init at 56×56: AvgPool2d(7, 7), the 8×8 queries used as they are (64 pooled tokens)."""
    B, C = x.shape[:2]
    pooled = F.avg_pool2d(x, 7, 7).flatten(2).transpose(1, 2)  # B, 64, C
    kv = lin(pooled, m.kv)
    k, v = kv[..., :C], kv[..., C:]
    q = lin(ln(m.q, m.q_embed[0]), m.q_embed[1])  # 64, C
    attended = torch.softmax(q @ k.transpose(1, 2) * C**-0.5, dim=-1) @ v
    both = torch.stack([attended, pooled], dim=2)  # B, M, 2, C
    se = lin(torch.relu(lin(both.sum(2).mean(1), m.se[0])), m.se[2]).view(B, 2, C).softmax(1)
    return ln((both * se[:, None]).sum(2), m.proxy_ln)


def test_adaptive_semantic_grid_equals_reference_pool7_at_56(float64):
    m = randomize_(SemanticInit(16, grid=8))
    x = torch.randn(2, 16, 56, 56)
    torch.testing.assert_close(m(x), reference_semantic_init(m, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hw", [(56, 56), (20, 15), (5, 5), (1, 1), (1, 20), (13, 7)])
@pytest.mark.parametrize("g", [2, 4, 8])
def test_grid_pool_is_adaptive_average_pooling(float64, hw, g):
    x = torch.randn(2, 3, *hw)
    torch.testing.assert_close(grid_pool(x, g), F.adaptive_avg_pool2d(x, g), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("stage_norm", [False, True])
def test_layer_is_init_then_blocks_then_stage_norm(float64, stage_norm):
    layer = randomize_(DualViT(32, num_heads=2, mlp_ratio=4, semantic_grid=4, depth=2, stage_norm=stage_norm))
    x = torch.randn(2, 32, 7, 6)
    s = layer.init(x)
    t = x.flatten(2).transpose(1, 2)
    for blk in layer.blocks:
        t, s = blk(t, 7, 6, s)
    if stage_norm:
        t = ln(t, layer.norm)
    torch.testing.assert_close(layer(x), t.transpose(1, 2).reshape(x.shape), rtol=1e-12, atol=1e-12)


# Official key -> shape tables (read off classification/dualvit.py for dim=64, num_heads=2, mlp_ratio=8).
OFFICIAL_DUAL_ATTENTION = {
    "gamma1": (64,), "gamma2": (64,), "gamma3": (64,),
    "q.weight": (64, 64), "q.bias": (64,), "kv.weight": (128, 64), "kv.bias": (128,),
    "proj.weight": (64, 64), "proj.bias": (64,),
    "q_proxy.weight": (64, 64), "q_proxy.bias": (64,), "kv_proxy.weight": (128, 64), "kv_proxy.bias": (128,),
    "q_proxy_ln.weight": (64,), "q_proxy_ln.bias": (64,), "p_ln.weight": (64,), "p_ln.bias": (64,),
    "mlp_proxy.0.weight": (256, 64), "mlp_proxy.0.bias": (256,),
    "mlp_proxy.2.weight": (64, 256), "mlp_proxy.2.bias": (64,),
    "proxy_ln.weight": (64,), "proxy_ln.bias": (64,),
    "qkv_proxy.0.weight": (64,), "qkv_proxy.0.bias": (64,),
    "qkv_proxy.1.weight": (192, 64), "qkv_proxy.1.bias": (192,),
}  # fmt: skip
OFFICIAL_DUAL_BLOCK = {
    "gamma1": (64,), "gamma2": (64,),
    "norm1.weight": (64,), "norm1.bias": (64,), "norm2.weight": (64,), "norm2.bias": (64,),
    **{f"attn.{k}": v for k, v in OFFICIAL_DUAL_ATTENTION.items()},
    "mlp.fc1.weight": (512, 64), "mlp.fc1.bias": (512,),
    "mlp.dwconv.dwconv.weight": (512, 1, 3, 3), "mlp.dwconv.dwconv.bias": (512,),
    "mlp.fc2.weight": (64, 512), "mlp.fc2.bias": (64,),
}  # fmt: skip
# Reference top-level stage-1 keys of the DualViT model (embed_dims[0]=64) besides block1/norm_proxy1.
OFFICIAL_STAGE1_TOP = {
    "q": (64, 64), "q_embed.0.weight": (64,), "q_embed.0.bias": (64,),
    "q_embed.1.weight": (64, 64), "q_embed.1.bias": (64,), "kv.weight": (128, 64), "kv.bias": (128,),
    "proxy_ln.weight": (64,), "proxy_ln.bias": (64,),
    "se.0.weight": (64, 64), "se.0.bias": (64,), "se.2.weight": (128, 64), "se.2.bias": (128,),
    "norm1.weight": (64,), "norm1.bias": (64,),
}  # fmt: skip


OFFICIAL_STAGE1 = {**OFFICIAL_STAGE1_TOP, **{f"block1.0.{k}": v for k, v in OFFICIAL_DUAL_BLOCK.items()}}


def _stage1_to_layer(key: str) -> str:
    """The documented rename from the reference model's stage-1 keys to the YOLO layer's."""
    if key.startswith("block1."):
        return "blocks." + key[len("block1.") :]
    if key.startswith("norm1."):
        return "norm." + key[len("norm1.") :]
    return "init." + key


@pytest.mark.parametrize(
    "module, table",
    [
        (lambda: DualAttention(64, 2), OFFICIAL_DUAL_ATTENTION),
        (lambda: DualBlock(64, 2, 8), OFFICIAL_DUAL_BLOCK),
        (
            lambda: DualViT(64, num_heads=2, mlp_ratio=8, semantic_grid=8, depth=1, stage_norm=True),
            {_stage1_to_layer(k): v for k, v in OFFICIAL_STAGE1.items()},
        ),
    ],
    ids=["DualAttention", "DualBlock", "DualViT-stage1"],
)
def test_official_state_dict_names_and_shapes(module, table):
    m = module()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == table
    official = {k: torch.randn(shape) for k, shape in table.items()}
    m.load_state_dict(official, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, official[k])


def test_reference_parameter_counts():
    # DualAttention(256) / DualBlock(mlp 8) counts measured on the reference (design note section 7).
    assert sum(p.numel() for p in DualAttention(256, 8).parameters()) == 1_186_304
    assert sum(p.numel() for p in DualBlock(128, 4, 8).parameters()) == 572_544


def test_norm_eps_layer_scales_and_default_heads():
    layer = DualViT(256)
    blk = layer.blocks[0]
    assert blk.attn.num_heads == 8 and blk.attn.scale == 32**-0.5  # None -> c1 // 32, head_dim 32
    assert DualViT(64).blocks[0].attn.num_heads == 2
    inner = [blk.attn.q_proxy_ln, blk.attn.p_ln, blk.attn.proxy_ln, blk.attn.qkv_proxy[0]]
    inner += [layer.init.q_embed[0], layer.init.proxy_ln]
    assert all(n.eps == 1e-5 for n in inner)
    assert blk.norm1.eps == blk.norm2.eps == DualViT(64, stage_norm=True).norm.eps == 1e-6
    for gamma in (blk.gamma1, blk.gamma2, blk.attn.gamma1, blk.attn.gamma2, blk.attn.gamma3):
        assert torch.all(gamma == 1e-6)
    assert layer.init.scale == 256**-0.5 and layer.init.q.shape == (64, 256)
    assert DualViT(64, semantic_grid=4).init.q.shape == (16, 64)


@pytest.mark.parametrize("depth", [1, 2])
def test_identity_at_init(depth):
    torch.manual_seed(0)
    layer = DualViT(64, depth=depth).train()
    x = torch.randn(2, 64, 20, 15)
    with torch.no_grad():
        y = layer(x)
    assert (y - x).norm() / x.norm() < 1e-5
    # the semantic tokens move by ~1e-6 relative through each block's attention
    with torch.no_grad():
        s0 = layer.init(x)
        _, s1 = layer.blocks[0](x.flatten(2).transpose(1, 2), 20, 15, s0)
    assert (s1 - s0).norm() / s0.norm() < 1e-5


@pytest.mark.parametrize("hw", [(5, 5), (1, 1), (1, 4), (3, 9)])
def test_runs_on_maps_smaller_than_the_grid(hw):
    """The reference crashes below 7 px; the adaptive grid keeps g*g tokens (repeating pixels)."""
    torch.manual_seed(0)
    layer = randomize_(DualViT(64, semantic_grid=8)).train()
    x = torch.randn(2, 64, *hw, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert layer.init(x).shape == (2, 64, 64)


def test_onnx_graph_is_valid_for_other_sizes():
    """The pooling bins are built from tensor ops, so a dynamic-axes export serves every map size."""
    ort = pytest.importorskip("onnxruntime")
    layer = randomize_(DualViT(32, num_heads=2, mlp_ratio=4)).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        layer, (torch.randn(1, 32, 16, 16),), buf, dynamo=False, opset_version=17,
        input_names=["x"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}},
    )  # fmt: skip
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(1, 32, 20, 15), (2, 32, 5, 5), (1, 32, 1, 1)]:
        x = torch.randn(shape)
        (out,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            ref = layer(x).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize(
    "c1, kwargs, arg",
    [
        (64, {"num_heads": 3}, "num_heads"),
        (64, {"num_heads": 0}, "num_heads"),
        (64, {"num_heads": 2.0}, "num_heads"),
        (16, {}, "num_heads"),  # default c1 // 32 = 0 heads
        (100, {}, "num_heads"),  # default 3 heads do not divide 100
        (64, {"mlp_ratio": 0}, "mlp_ratio"),
        (64, {"mlp_ratio": True}, "mlp_ratio"),
        (64, {"semantic_grid": 0}, "semantic_grid"),
        (64, {"semantic_grid": 2.5}, "semantic_grid"),
        (64, {"depth": 0}, "depth"),
        (64, {"depth": 1.0}, "depth"),
        (64, {"stage_norm": "yes"}, "stage_norm"),
        (0, {}, "c1"),
    ],
)
def test_constraint_errors_name_the_argument(c1, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        DualViT(c1, **kwargs)


def test_divisibility_hint_and_map_size_rules():
    with pytest.raises(ValueError, match=r"valid values that divide 64: \[1, 2, 4, 8\]"):
        DualViT(64, num_heads=3)
    with pytest.raises(ValueError, match="semantic_grid"):
        SPEC.check(64, (5, 5), semantic_grid=8)
    assert SPEC.choices_for(64, (5, 5))["semantic_grid"] == (2, 4)
    assert SPEC.choices_for(64, (20, 15)) == {
        "num_heads": (2, 4, 8), "mlp_ratio": (4, 8), "semantic_grid": (2, 4, 8), "depth": (1, 2),
    }  # fmt: skip
    assert SPEC.choices_for(96)["num_heads"] == (2, 4, 8)
    assert SPEC.choices_for(72)["num_heads"] == (2, 4, 8)
    assert SPEC.choices_for(36)["num_heads"] == (2, 4)
    DualViT(96)  # None -> 3 heads, divides 96
