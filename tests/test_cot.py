"""CoT (CoTNet) numerics against formulas written here, official state-dict names, constraints, batch-1 training."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from modules.cot import SPEC, CoT, CotLayer, LocalConvolution, local_aggregation
from layer_utils import randomize_

torch.set_num_threads(1)
F64 = torch.float64
TOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# dynamic local aggregation


def _aggregation_loop(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """out[b,c,y,x] = sum_{i,j} w[b, c % Cw, i*k+j, y, x] * x[b, c, y+i-p, x+j-p], zero outside the map."""
    b, c, h, wd = x.shape
    cw = w.shape[1] // (k * k)
    w = w.view(b, cw, k * k, h, wd)
    share = torch.arange(c) % cw  # interleaved sharing: channel c uses kernel c % (C/8)
    p = k // 2
    out = torch.zeros_like(x)
    for y in range(h):
        for xx in range(wd):
            for i in range(k):
                for j in range(k):
                    yi, xj = y + i - p, xx + j - p
                    if 0 <= yi < h and 0 <= xj < wd:
                        out[:, :, y, xx] += w[:, share, i * k + j, y, xx] * x[:, :, yi, xj]
    return out


@pytest.mark.parametrize(
    ("c", "cw", "k", "hw"),
    [
        (16, 2, 3, (4, 5)), (24, 3, 5, (3, 4)), (16, 2, 5, (1, 1)),
        (16, 2, 3, (1, 4)), (8, 1, 1, (3, 3)), (16, 2, 7, (2, 3)),
    ],
)
def test_local_aggregation_equals_explicit_gather(c, cw, k, hw):
    x = torch.randn(2, c, *hw, generator=_gen(0), dtype=F64)
    w = torch.randn(2, cw * k * k, *hw, generator=_gen(1), dtype=F64)
    expected = _aggregation_loop(x, w, k)
    assert _rel(local_aggregation(x, w, k), expected) < TOL
    # the module form takes the reference's 6-D weight view (B, heads=1, Cw, k*k, H, W)
    op = LocalConvolution(c, c, k, stride=1, padding=(k - 1) // 2)
    assert _rel(op(x, w.view(2, 1, cw, k * k, *hw)), expected) < TOL
    assert list(op.parameters()) == [] and list(op.buffers()) == []


def test_local_aggregation_shares_kernels_interleaved():
    # with one non-zero kernel group, only channels c with c % Cw == that group respond
    c, cw, k = 16, 2, 3
    x = torch.ones(1, c, 3, 3, dtype=F64)
    w = torch.zeros(1, cw, k * k, 3, 3, dtype=F64)
    w[:, 1, 4] = 1.0  # centre tap of kernel group 1
    out = local_aggregation(x, w.view(1, -1, 3, 3), k)
    assert torch.equal(out[0, 1::2], torch.ones(c // 2, 3, 3, dtype=F64))
    assert torch.equal(out[0, 0::2], torch.zeros(c // 2, 3, 3, dtype=F64))


def test_local_convolution_rejects_unsupported_configs():
    with pytest.raises(ValueError, match="padding"):
        LocalConvolution(16, 16, 3, padding=0)
    with pytest.raises(ValueError, match="stride"):
        LocalConvolution(16, 16, 3, stride=2, padding=1)


# ---------------------------------------------------------------------------------------------------------------
# CotLayer and the CoT block against a functional re-statement


def _bn(t, s, name, training):
    # running statistics are cloned so the formula's update can be compared with the module's
    rm, rv = s[name + ".running_mean"].clone(), s[name + ".running_var"].clone()
    out = F.batch_norm(t, rm, rv, s[name + ".weight"], s[name + ".bias"], training, 0.1, 1e-5)
    return out, {name + ".running_mean": rm, name + ".running_var": rv}


def _cot_formula(x, s, k, training, prefix=""):
    """CoT as in the paper/official code, from the state dict ``s``; returns (output, updated running stats)."""
    s = {n[len(prefix):]: v for n, v in s.items() if n.startswith(prefix)}
    b, c, h, w = x.shape
    stats = {}

    def bn(t, name, train=training):
        out, st = _bn(t, s, name, train)
        stats.update(st)
        return out

    key = F.relu(bn(F.conv2d(x, s["key_embed.0.weight"], padding=k // 2, groups=4), "key_embed.1"))
    e = F.relu(bn(F.conv2d(torch.cat([x, key], 1), s["embed.0.weight"]), "embed.1"))
    e = F.conv2d(e, s["embed.3.weight"], s["embed.3.bias"])
    e = F.group_norm(e, c // 8, s["embed.4.weight"], s["embed.4.bias"], 1e-5)  # (B, C/8 * k*k, H, W)
    val = bn(F.conv2d(x, s["conv1x1.0.weight"]), "conv1x1.1")
    # im2col gather of the values, kernels broadcast to channels c -> c % (C/8)
    cols = F.unfold(val, k, padding=k // 2).view(b, c, k * k, h, w)
    kern = e.view(b, c // 8, k * k, h, w)[:, torch.arange(c) % (c // 8)]
    dyn = F.silu(bn((cols * kern).sum(2), "bn"))

    gap = (dyn + key).mean((2, 3), keepdim=True)
    z = F.conv2d(gap, s["se.0.weight"], s["se.0.bias"])
    z = F.relu(bn(z, "se.1", training and b > 1))  # batch 1: running statistics (the fix under test)
    z = F.conv2d(z, s["se.3.weight"], s["se.3.bias"])
    a_dyn, a_key = z[:, 0::2], z[:, 1::2]  # SE output channels interleave (channel, radix)
    out = dyn * torch.sigmoid(a_dyn - a_key) + key * torch.sigmoid(a_key - a_dyn)  # = 2-way softmax
    return out, stats


def _check_against_formula(m, x, k, training, prefix=""):
    m.train(training)
    before = {n: v.clone() for n, v in m.state_dict().items()}
    expected, stats = _cot_formula(x, before, k, training, prefix)
    got = m(x)
    after = m.state_dict()
    if training:
        for name, value in stats.items():
            assert _rel(after[prefix + name], value) < TOL, name
    else:
        assert all(torch.equal(after[n], before[n]) for n in before)
    return got, expected


@pytest.mark.parametrize(
    ("dim", "k", "shape"),
    [
        (16, 3, (2, 16, 6, 5)), (32, 5, (3, 32, 4, 4)), (16, 5, (2, 16, 1, 1)),
        (16, 3, (2, 16, 1, 4)), (40, 3, (2, 40, 3, 2)),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_cotlayer_equals_formula(dim, k, shape, training):
    torch.manual_seed(0)
    m = randomize_(CotLayer(dim, k).to(F64), seed=dim + k)
    x = torch.randn(*shape, generator=_gen(3), dtype=F64)
    got, expected = _check_against_formula(m, x, k, training)
    assert got.shape == x.shape
    assert _rel(got, expected) < TOL


@pytest.mark.parametrize(("c1", "k", "e", "shape"), [(64, 3, 4, (2, 64, 5, 6)), (64, 5, 2, (2, 64, 3, 3))])
@pytest.mark.parametrize("training", [False, True])
def test_cot_block_equals_formula(c1, k, e, shape, training):
    m = randomize_(CoT(c1, k, e).to(F64), seed=1)
    m.train(training)
    s = {n: v.clone() for n, v in m.state_dict().items()}
    x = torch.randn(*shape, generator=_gen(4), dtype=F64)
    t, _ = _bn(F.conv2d(x, s["conv1.weight"]), s, "bn1", training)
    t, _ = _cot_formula(F.relu(t), s, k, training, prefix="conv2.")
    t, _ = _bn(F.conv2d(t, s["conv3.weight"]), s, "bn3", training)
    assert _rel(m(x), F.relu(t + x)) < TOL


def test_cot_starts_as_relu_and_uses_cotnet_init():
    m = CoT(64)
    assert torch.count_nonzero(m.bn3.weight) == 0  # zero_init_last_bn of CoTNet's ResNet
    x = torch.randn(2, 64, 7, 5, generator=_gen(5))
    for training in (True, False):
        m.train(training)
        assert torch.equal(m(x), x.relu())
    # kaiming normal, fan_out, relu gain: std sqrt(2 / fan_out) on the (large) value conv of the operator
    w = CoT(512).conv2.conv1x1[0].weight.detach()
    assert abs(float(w.std()) / (2 / 128) ** 0.5 - 1) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# batch of one in training (the reference raises in the SE BatchNorm)


def test_batch_one_training_uses_running_stats_in_se_bn_only():
    m = randomize_(CotLayer(16, 3).to(F64), seed=7)
    x = torch.randn(1, 16, 5, 4, generator=_gen(6), dtype=F64, requires_grad=True)
    se_before = {n: v.clone() for n, v in m.se[1].state_dict().items()}
    got, expected = _check_against_formula(m, x, 3, True)
    assert _rel(got, expected) < TOL
    assert all(torch.equal(v, m.se[1].state_dict()[n]) for n, v in se_before.items())  # SE BN not updated
    assert int(m.bn.num_batches_tracked) == 1  # the other BNs trained normally
    got.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())
    # the plain BatchNorm the reference uses cannot do this
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.BatchNorm2d(4).train()(torch.randn(1, 4, 1, 1))


def test_batch_two_training_unchanged_by_batch_one_fix():
    # for batch >= 2 the SE branch must be exactly the reference's plain ``self.se(gap)`` Sequential call
    m = randomize_(CotLayer(16, 3).to(F64), seed=8).train()
    plain = randomize_(CotLayer(16, 3).to(F64), seed=8).train()
    plain._se = plain.se  # instance attribute shadows the method: the unmodified reference path
    x = torch.randn(2, 16, 4, 4, generator=_gen(9), dtype=F64)
    assert torch.equal(m(x), plain(x))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), plain.state_dict().values()))
    assert int(m.se[1].num_batches_tracked) == 1


def test_cot_block_batch_one_training():
    m = CoT(64).train()
    y = m(torch.randn(1, 64, 6, 6))
    y.sum().backward()
    assert y.shape == (1, 64, 6, 6) and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------------------------
# official state-dict names (JDAI-CV/CoTNet models/cotnet.py CotLayer(64, 3) and Bottleneck(64, 16))

_BN64, _BN32 = (64,), (32,)
OFFICIAL_COTLAYER_64_K3 = {
    "key_embed.0.weight": (64, 16, 3, 3),
    **{f"key_embed.1.{n}": _BN64 for n in ("weight", "bias", "running_mean", "running_var")},
    "key_embed.1.num_batches_tracked": (),
    "embed.0.weight": (32, 128, 1, 1),
    **{f"embed.1.{n}": _BN32 for n in ("weight", "bias", "running_mean", "running_var")},
    "embed.1.num_batches_tracked": (),
    "embed.3.weight": (72, 32, 1, 1),
    "embed.3.bias": (72,),
    "embed.4.weight": (72,),
    "embed.4.bias": (72,),
    "conv1x1.0.weight": (64, 64, 1, 1),
    **{f"conv1x1.1.{n}": _BN64 for n in ("weight", "bias", "running_mean", "running_var")},
    "conv1x1.1.num_batches_tracked": (),
    **{f"bn.{n}": _BN64 for n in ("weight", "bias", "running_mean", "running_var")},
    "bn.num_batches_tracked": (),
    "se.0.weight": (32, 64, 1, 1),
    "se.0.bias": (32,),
    **{f"se.1.{n}": _BN32 for n in ("weight", "bias", "running_mean", "running_var")},
    "se.1.num_batches_tracked": (),
    "se.3.weight": (128, 32, 1, 1),
    "se.3.bias": (128,),
}
OFFICIAL_BOTTLENECK_64 = {  # Bottleneck(inplanes=64, planes=16): width 16, conv2 = CotLayer(16, 3)
    "conv1.weight": (16, 64, 1, 1),
    **{f"bn1.{n}": (16,) for n in ("weight", "bias", "running_mean", "running_var")},
    "bn1.num_batches_tracked": (),
    "conv3.weight": (64, 16, 1, 1),
    **{f"bn3.{n}": _BN64 for n in ("weight", "bias", "running_mean", "running_var")},
    "bn3.num_batches_tracked": (),
}

OFFICIAL_COTLAYER_16_K3 = {  # the block's operator; SE width max(16 * 2 // 4, 32) = 32
    "key_embed.0.weight": (16, 4, 3, 3),
    **{f"key_embed.1.{n}": (16,) for n in ("weight", "bias", "running_mean", "running_var")},
    "key_embed.1.num_batches_tracked": (),
    "embed.0.weight": (8, 32, 1, 1),
    **{f"embed.1.{n}": (8,) for n in ("weight", "bias", "running_mean", "running_var")},
    "embed.1.num_batches_tracked": (),
    "embed.3.weight": (18, 8, 1, 1),
    "embed.3.bias": (18,),
    "embed.4.weight": (18,),
    "embed.4.bias": (18,),
    "conv1x1.0.weight": (16, 16, 1, 1),
    **{f"conv1x1.1.{n}": (16,) for n in ("weight", "bias", "running_mean", "running_var")},
    "conv1x1.1.num_batches_tracked": (),
    **{f"bn.{n}": (16,) for n in ("weight", "bias", "running_mean", "running_var")},
    "bn.num_batches_tracked": (),
    "se.0.weight": (32, 16, 1, 1),
    "se.0.bias": (32,),
    **{f"se.1.{n}": (32,) for n in ("weight", "bias", "running_mean", "running_var")},
    "se.1.num_batches_tracked": (),
    "se.3.weight": (32, 32, 1, 1),
    "se.3.bias": (32,),
}


def _random_state(table):
    g = _gen(10)
    return {
        n: torch.tensor(3) if n.endswith("num_batches_tracked") else torch.rand(shape, generator=g) + 0.5
        for n, shape in table.items()
    }


def test_official_state_dict_keys_and_shapes():
    m = CotLayer(64, 3)
    assert {n: tuple(v.shape) for n, v in m.state_dict().items()} == OFFICIAL_COTLAYER_64_K3
    sd = _random_state(OFFICIAL_COTLAYER_64_K3)
    m.load_state_dict(sd, strict=True)
    assert all(torch.equal(m.state_dict()[n], v) for n, v in sd.items())
    assert sum(p.numel() for p in m.parameters()) == 26744  # as the official CotLayer(64, 3)


def test_official_bottleneck_state_dict_loads_into_block():
    table = {**OFFICIAL_BOTTLENECK_64, **{"conv2." + n: shape for n, shape in OFFICIAL_COTLAYER_16_K3.items()}}
    m = CoT(64)
    assert {n: tuple(v.shape) for n, v in m.state_dict().items()} == table
    m.load_state_dict(_random_state(table), strict=True)


# ---------------------------------------------------------------------------------------------------------------
# constraints


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        (dict(c1=36), "expansion"),  # width 9: not a multiple of 8
        (dict(c1=64, expansion=16), "expansion"),  # width 4
        (dict(c1=64, expansion=3), "expansion"),  # 64/3 not whole
        (dict(c1=64, expansion=0), "expansion"),
        (dict(c1=64, kernel_size=4), "kernel_size"),
        (dict(c1=64, kernel_size=0), "kernel_size"),
        (dict(c1=64, kernel_size=True), "kernel_size"),
        (dict(c1=0), "c1"),
    ],
)
def test_cot_constraint_errors_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        CoT(**kwargs)


def test_constraint_messages_give_valid_values():
    with pytest.raises(ValueError, match=r"expansion=4 .* c1=36.*multiple of 8.*c1 must be a multiple of 8"):
        CoT(36)
    with pytest.raises(ValueError, match=r"expansion=16.*expansions giving such a width at c1=64: \[1, 2, 4, 8\]"):
        CoT(64, expansion=16)
    with pytest.raises(ValueError, match="odd"):
        CoT(64, kernel_size=4)


def test_cotlayer_constraint_errors():
    with pytest.raises(ValueError, match="dim=36"):
        CotLayer(36, 3)
    with pytest.raises(ValueError, match="kernel_size=4"):
        CotLayer(64, 4)


def test_spec_matches_constructor_and_filters_choices():
    params = inspect.signature(CoT).parameters
    assert next(iter(params)) == "c1"
    for hp in SPEC.hparams:
        assert params[hp.name].default == hp.default
    assert SPEC.choices_for(64) == {"kernel_size": (3, 5), "expansion": (2, 4)}
    assert SPEC.choices_for(48) == {"kernel_size": (3, 5), "expansion": (2,)}  # 48/4 = 12 is not a multiple of 8
    # a 5x5 window on a map of at most 2x2 only adds zero-padded taps; 3x3 stays allowed down to 1x1
    assert SPEC.choices_for(64, (2, 2))["kernel_size"] == (3,)
    assert SPEC.choices_for(64, (1, 1))["kernel_size"] == (3,)
    assert SPEC.choices_for(64, (1, 20))["kernel_size"] == (3, 5)
    assert SPEC.choices_for(64, (5, 5))["kernel_size"] == (3, 5)
    with pytest.raises(ValueError, match="kernel_size"):
        SPEC.check(64, (2, 2), kernel_size=5)
