"""GMA (GroupMixFormer group-mix attention): numerics against formulas written here, official state-dict
layout, the width projection and the constraints. Generic layer properties are in test_layers.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layer_utils import YOLO_CHANNELS, randomize_
from modules.gma import GMA, SPEC, Aggregator, EfficientAtt, inner_width


# ---- independent formulas -------------------------------------------------------------------------------


def hardswish(t):
    return t * (t + 3).clamp(0, 6) / 6


def batch_norm(t, sd, prefix, train, eps=1e-5):
    """BatchNorm2d by hand: batch statistics (biased variance) in training, running ones in eval."""
    if train:
        mean = t.mean(dim=(0, 2, 3), keepdim=True)
        var = ((t - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    else:
        mean = sd[prefix + "running_mean"].view(1, -1, 1, 1)
        var = sd[prefix + "running_var"].view(1, -1, 1, 1)
    return (t - mean) / torch.sqrt(var + eps) * sd[prefix + "weight"].view(1, -1, 1, 1) + sd[prefix + "bias"].view(
        1, -1, 1, 1
    )


def layer_norm(t, weight, bias, eps):
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + eps) * weight + bias


def separable(t, sd, prefix, k):
    t = F.conv2d(t, sd[prefix + "conv1.weight"], padding=k // 2, groups=t.shape[1])
    return F.conv2d(t, sd[prefix + "pointwise_conv.weight"])


def gma_formula(sd, x, hw, train, kernels=(3, 5, 7)):
    """Group-mix attention of tokens x (B, N, C) from the state dict, written out head by head."""
    b, n, c = x.shape
    h, w = hw
    s, ch = c // 5, c // 10  # segment width, head width (8 heads on the 4 attention segments)
    qkv = x @ sd["qkv.weight"].T + sd["qkv.bias"]
    q, k, v = (qkv[..., i * c : (i + 1) * c].transpose(1, 2).reshape(b, c, h, w) for i in range(3))

    mixed = {"q": [], "k": [], "v": []}
    for i in range(4):
        segs = [t[:, i * s : (i + 1) * s] for t in (q, k, v)]
        if i:
            segs = [separable(t, sd, f"aggregator.agg{i}.", kernels[i - 1]) for t in segs]
        joint = hardswish(batch_norm(torch.cat(segs), sd, f"aggregator.norm{i}.", train))  # one BN for q, k, v
        for name, t in zip("qkv", joint.split(b)):
            mixed[name].append(t)
    qh, kh, vh = (torch.cat(mixed[name], 1).reshape(b, 8, ch, n).transpose(-1, -2) for name in "qkv")

    local = separable(torch.cat([t[:, 4 * s :] for t in (q, k, v)], 1), sd, "aggregator.agg0.conv.", 3)
    ln_w, ln_b = sd["aggregator.agg0.norm.weight"], sd["aggregator.agg0.norm.bias"]
    local = hardswish(layer_norm(local.flatten(2).transpose(1, 2), ln_w, ln_b, 1e-5))

    scale = (c // 8) ** -0.5  # from the full width, not from the 4C/5 attention channels
    heads = []
    for j in range(8):
        e = torch.exp(kh[:, j] - kh[:, j].amax(dim=1, keepdim=True))
        soft_k = e / e.sum(dim=1, keepdim=True)  # softmax over the tokens
        context = torch.einsum("bnc,bnd->bcd", soft_k, vh[:, j])
        att = scale * torch.einsum("bnc,bcd->bnd", qh[:, j], context)
        # crpe: heads 0-1 use the 3x3 window, heads 2-4 the 5x5, heads 5-7 the 7x7 (conv_list 0, 1, 2)
        group, first, win = (0, 0, 3) if j < 2 else (1, 2, 5) if j < 5 else (2, 5, 7)
        rows = slice((j - first) * ch, (j - first + 1) * ch)
        v_img = vh[:, j].transpose(1, 2).reshape(b, ch, h, w)
        conv = F.conv2d(
            v_img,
            sd[f"crpe.conv_list.{group}.weight"][rows],
            sd[f"crpe.conv_list.{group}.bias"][rows],
            padding=win // 2,
            groups=ch,
        )
        heads.append(att + qh[:, j] * conv.flatten(2).transpose(1, 2))
    out = torch.cat([*heads, local], dim=-1)
    return out @ sd["proj.weight"].T + sd["proj.bias"]


# ---- the core op ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    ("c", "hw", "kernels"), [(80, (6, 5), (3, 5, 7)), (40, (4, 7), (5, 3, 7)), (40, (1, 1), (3, 3, 3))]
)
def test_efficient_att_equals_formula(mode, c, hw, kernels):
    op = randomize_(EfficientAtt(c, qkv_bias=True, kernels=kernels).double(), seed=3).train(mode == "train")
    sd = {k: t.clone() for k, t in op.state_dict().items()}
    x = torch.randn(2, hw[0] * hw[1], c, dtype=torch.float64)
    torch.testing.assert_close(op(x, hw), gma_formula(sd, x, hw, mode == "train", kernels), rtol=1e-10, atol=1e-10)


def test_scale_uses_full_width_and_qk_scale_overrides():
    assert EfficientAtt(80).scale == (80 // 8) ** -0.5  # not (64 // 8) ** -0.5 from the attention channels
    assert EfficientAtt(80, qk_scale=0.25).scale == 0.25


def test_aggregator_batch_norm_sees_q_k_v_jointly():
    torch.manual_seed(0)
    agg = randomize_(Aggregator(40).double(), seed=1).train()
    b, h, w, s = 2, 5, 4, 8
    # q, k and v with very different statistics, stacked on the batch axis as EfficientAtt does
    x = torch.cat([torch.randn(b, h * w, 40, dtype=torch.float64) * sd + mu for sd, mu in ((1, 0), (3, 2), (0.5, -1))])
    running_mean = agg.norm0.running_mean.clone()
    groups, _ = agg(x, (h, w), 8)
    seg0 = groups[:, :, :2].transpose(-1, -2).reshape(3 * b, s, h, w)  # heads 0-1 = segment 0, no conv

    img = x.transpose(1, 2).reshape(3 * b, 40, h, w)[:, :s]
    sd = agg.state_dict()
    joint = hardswish(batch_norm(img, sd, "norm0.", train=True))
    separate = torch.cat([hardswish(batch_norm(t, sd, "norm0.", train=True)) for t in img.split(b)])
    torch.testing.assert_close(seg0, joint, rtol=1e-10, atol=1e-10)
    assert (seg0 - separate).abs().max() > 0.1
    torch.testing.assert_close(agg.norm0.running_mean, 0.9 * running_mean + 0.1 * img.mean(dim=(0, 2, 3)))


# Key -> shape of the official EfficientAtt(80, qkv_bias=True), read off models/groupmixformer.py L41-200.
OFFICIAL_EFFICIENT_ATT_80 = {
    "qkv.weight": (240, 80), "qkv.bias": (240,), "proj.weight": (80, 80), "proj.bias": (80,),
    **{f"aggregator.norm{i}.{p}": (16,) for i in range(4) for p in ("weight", "bias", "running_mean", "running_var")},
    **{f"aggregator.norm{i}.num_batches_tracked": () for i in range(4)},
    "aggregator.agg1.conv1.weight": (16, 1, 3, 3), "aggregator.agg1.pointwise_conv.weight": (16, 16, 1, 1),
    "aggregator.agg2.conv1.weight": (16, 1, 5, 5), "aggregator.agg2.pointwise_conv.weight": (16, 16, 1, 1),
    "aggregator.agg3.conv1.weight": (16, 1, 7, 7), "aggregator.agg3.pointwise_conv.weight": (16, 16, 1, 1),
    "aggregator.agg0.conv.conv1.weight": (48, 1, 3, 3), "aggregator.agg0.conv.pointwise_conv.weight": (16, 48, 1, 1),
    "aggregator.agg0.norm.weight": (16,), "aggregator.agg0.norm.bias": (16,),
    "crpe.conv_list.0.weight": (16, 1, 3, 3), "crpe.conv_list.0.bias": (16,),
    "crpe.conv_list.1.weight": (24, 1, 5, 5), "crpe.conv_list.1.bias": (24,),
    "crpe.conv_list.2.weight": (24, 1, 7, 7), "crpe.conv_list.2.bias": (24,),
}  # fmt: skip


def random_state(table):
    return {k: torch.randint(1, 5, ()) if shape == () else torch.randn(shape) for k, shape in table.items()}


def test_official_state_dict_keys_and_shapes():
    op = EfficientAtt(80, qkv_bias=True)
    assert {k: tuple(t.shape) for k, t in op.state_dict().items()} == OFFICIAL_EFFICIENT_ATT_80
    state = random_state(OFFICIAL_EFFICIENT_ATT_80)
    op.load_state_dict(state, strict=True)
    assert torch.equal(op.aggregator.agg3.conv1.weight, state["aggregator.agg3.conv1.weight"])
    assert {name for name, _ in op.named_buffers()} <= set(op.state_dict())  # no hidden constants


def test_gma_without_projection_has_the_gma_block_keys():
    """At a width divisible by 10 the layer is the official GMA_Block (cpe, norm1, att, norm2, mlp)."""
    block = {
        "cpe.proj.weight": (80, 1, 3, 3), "cpe.proj.bias": (80,), "norm1.weight": (80,), "norm1.bias": (80,),
        **{f"att.{k}": shape for k, shape in OFFICIAL_EFFICIENT_ATT_80.items()},
        "norm2.weight": (80,), "norm2.bias": (80,), "mlp.fc1.weight": (320, 80), "mlp.fc1.bias": (320,),
        "mlp.fc2.weight": (80, 320), "mlp.fc2.bias": (80,),
    }  # fmt: skip
    layer = GMA(80)
    assert {k: tuple(t.shape) for k, t in layer.state_dict().items()} == block
    layer.load_state_dict(random_state(block), strict=True)


# ---- the YOLO layer -------------------------------------------------------------------------------------


def efficient_att_params(d, kernels=(3, 5, 7)):
    s, ch = d // 5, d // 10
    aggregator = 4 * 2 * s + sum(s * k * k + s * s for k in kernels) + (3 * s * 9 + 3 * s * s + 2 * s)
    crpe = sum(heads * ch * (k * k + 1) for k, heads in ((3, 2), (5, 3), (7, 3)))
    return (3 * d * d + 3 * d) + (d * d + d) + aggregator + crpe


def gma_params(c1, d, mlp_ratio=4):
    hidden = int(c1 * mlp_ratio)
    projections = 2 * c1 * d if d != c1 else 0
    return 10 * c1 + 4 * c1 + efficient_att_params(d) + projections + (2 * c1 * hidden + hidden + c1)


@pytest.mark.parametrize(("c1", "dim"), [(80, 80), (64, 80), (128, 120), (256, 240), (40, 40), (8, 40)])
def test_inner_width_and_parameter_count(c1, dim):
    layer = GMA(c1)
    assert layer.dim == inner_width(c1) == dim
    assert isinstance(layer.proj_in, torch.nn.Linear) == (dim != c1)
    assert sum(p.numel() for p in layer.parameters()) == gma_params(c1, dim)


def test_inner_width_of_every_yolo_width():
    widths = {c1: inner_width(c1) for c1 in YOLO_CHANNELS}
    assert widths == {64: 80, 128: 120, 192: 200, 256: 240, 320: 320, 384: 400, 512: 520, 576: 560, 640: 640, 768: 760}
    assert all(abs(d - c1) <= 20 for c1, d in widths.items())


@pytest.mark.parametrize("c1", [64, 80])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gma_block_formula(c1, mode):
    """x + dwconv(x), then pre-LN (eps 1e-6) attention through the projections, then pre-LN GELU MLP."""
    layer = randomize_(GMA(c1, mlp_ratio=2).double(), seed=5).train(mode == "train")
    sd = {k: t.clone() for k, t in layer.state_dict().items()}
    x = torch.randn(2, c1, 5, 6, dtype=torch.float64)
    x1 = x + F.conv2d(x, sd["cpe.proj.weight"], sd["cpe.proj.bias"], padding=1, groups=c1)
    t = x1.flatten(2).transpose(1, 2)
    a = layer_norm(t, sd["norm1.weight"], sd["norm1.bias"], 1e-6)
    if c1 != layer.dim:
        a = a @ sd["proj_in.weight"].T
    att_sd = {k[4:]: v for k, v in sd.items() if k.startswith("att.")}
    a = gma_formula(att_sd, a, (5, 6), mode == "train")
    if c1 != layer.dim:
        a = a @ sd["proj_out.weight"].T
    t = t + a
    m = layer_norm(t, sd["norm2.weight"], sd["norm2.bias"], 1e-6) @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]
    t = t + F.gelu(m) @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"]
    torch.testing.assert_close(layer(x), t.transpose(1, 2).reshape(x.shape), rtol=1e-10, atol=1e-10)


def test_init():
    torch.manual_seed(0)
    layer = GMA(128)
    w_in, w_out = layer.proj_in.weight, layer.proj_out.weight  # (120, 128), (128, 120): semi-orthogonal
    torch.testing.assert_close(w_in @ w_in.T, torch.eye(120), atol=1e-5, rtol=0)
    torch.testing.assert_close(w_out.T @ w_out, torch.eye(120), atol=1e-5, rtol=0)
    for lin in (layer.att.qkv, layer.att.proj, layer.mlp.fc1, layer.mlp.fc2):
        assert 0.018 < lin.weight.std() < 0.022  # trunc_normal_(std=0.02) as in the reference _init_weights
        assert not lin.bias.any()
    assert layer.norm1.eps == layer.norm2.eps == 1e-6


def test_one_pixel_batch_one_trains():
    """The aggregator BatchNorms see q, k and v together, so even 1x1 maps at batch 1 have 3 values each."""
    layer = GMA(64).train()
    x = torch.randn(1, 64, 1, 1, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_kernels_shape_the_aggregator():
    layer = GMA(80, kernels=[5, 3, 7])  # a list works too
    assert layer.kernels == (5, 3, 7)
    shapes = [getattr(layer.att.aggregator, f"agg{i}").conv1.weight.shape[-1] for i in (1, 2, 3)]
    assert shapes == [5, 3, 7]


# ---- constraints ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"kernels": (3, 4, 7)}, "kernels"),
        ({"kernels": (3, 5)}, "kernels"),
        ({"kernels": (3.0, 5, 7)}, "kernels"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"dim": 64}, "dim"),
        ({"drop_path": 1.0}, "drop_path"),
    ],
)
def test_constraint_errors_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=rf"GMA: {arg}="):
        GMA(64, **kwargs)


def test_even_kernel_message_says_odd():
    with pytest.raises(ValueError, match="odd"):
        GMA(64, kernels=(3, 5, 6))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 64}, "divisible by 10"),
        ({"dim": 80, "num_heads": 4}, "num_heads must be 8"),
        ({"dim": 80, "kernels": (3, 5, 8)}, "odd"),
    ],
)
def test_core_op_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EfficientAtt(**kwargs)


def test_aggregator_needs_five_segments():
    with pytest.raises(ValueError, match="seg must be 5"):
        Aggregator(80, seg=4)


def test_spec_on_small_maps():
    assert SPEC.choices_for(64) == {"kernels": SPEC.hparam("kernels").choices, "mlp_ratio": (2, 4)}
    assert SPEC.choices_for(64, (20, 15))["kernels"] == SPEC.hparam("kernels").choices
    assert SPEC.choices_for(64, (1, 1))["kernels"] == ((3, 3, 3),)  # larger windows only read zero padding
    assert SPEC.choices_for(64, (3, 2))["kernels"] == ((3, 3, 3), (5, 5, 5), (3, 5, 5))
    with pytest.raises(ValueError, match="kernels"):
        SPEC.check(64, (2, 2), kernels=(3, 5, 7))
