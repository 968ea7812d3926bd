"""Cascaded group attention (EfficientViT, Liu et al., CVPR 2023) as a YOLO layer.

Re-implemented from the description of ``microsoft/Cream`` ``EfficientViT/classification/model/efficientvit.py``
(and the detection variant in ``EfficientViT/downstream/efficientvit.py``). The core ops keep the official class,
argument and parameter names, so an official ``state_dict`` loads with ``strict=True`` and computes the same
function; the deliberate differences are listed in each class docstring:

* the window is **always** partitioned (maps smaller than the window are zero-padded to one window, where the
  reference crashes), so one fixed relative-position bias table serves every feature-map size;
* the gathered bias is never cached (the reference's eval-mode ``self.ab`` goes stale after ``load_state_dict``
  and is not moved by ``.to()``/``.half()``; its ``eval()`` returns None);
* the value dimension is derived as ``dim // num_heads`` (the only value the cascade admits) and ``kernels`` is
  cycled to ``num_heads`` entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import HParam, ModuleSpec, check_hparams, divisor_of, freeze, int_tuple, positive_int, width_ratio

__all__ = ["CGA", "SPEC", "CascadedGroupAttention", "Conv2d_BN", "FFN", "LocalWindowAttention", "Residual"]

_HEADS = (2, 3, 4)
_KEY_DIMS = (8, 16, 32)
_KERNELS = ((5, 5, 5, 5), (7, 5, 3, 3), (3, 3, 3, 3), (7, 7, 7, 7))
_WINDOWS = (5, 7, 10)


class Conv2d_BN(nn.Sequential):
    """Bias-free ``Conv2d`` followed by ``BatchNorm2d`` (submodules ``c`` and ``bn``).

    Args:
        a, b: input and output channels.
        ks, stride, pad, dilation, groups: as in ``nn.Conv2d``.
        bn_weight_init: initial BN weight; 0 makes the block output exactly 0 at init (BN bias starts at 0).
    """

    def __init__(
        self,
        a: int,
        b: int,
        ks: int = 1,
        stride: int = 1,
        pad: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class Residual(nn.Module):
    """``x + m(x)`` (official name; its branch drop is 0 in every EfficientViT block, so it is left out)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class FFN(nn.Module):
    """Pointwise feed-forward ``ed -> h -> ed`` (Conv2d_BN, ReLU, Conv2d_BN); outputs exactly 0 at init."""

    def __init__(self, ed: int, h: int) -> None:
        super().__init__()
        self.pw1 = Conv2d_BN(ed, h)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(h, ed, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


def _offset_index(resolution: int) -> torch.Tensor:
    """``(R², R²)`` index of the ``(|dy|, |dx|)`` offset between two tokens of an R×R window.

    Offsets are numbered ``|dy| * R + |dx|``, which is the order the official table enumerates them in
    (first appearance over the token pairs of the top-left token), so official ``attention_biases`` load as is.
    """
    r = torch.arange(resolution)
    y, x = r.repeat_interleave(resolution), r.repeat(resolution)
    return (y[:, None] - y[None]).abs() * resolution + (x[:, None] - x[None]).abs()


def _check_op_args(dim: int, key_dim: int, num_heads: int, kernels: Sequence[int], attn_ratio: float | None) -> None:
    # The layer's own rules (with dim as c1), so the op and the YOLO layer refuse the same values.
    check_hparams("CascadedGroupAttention", _reject, dim, None,
                  {"num_heads": num_heads, "key_dim": key_dim, "kernels": freeze(kernels)})
    d = dim // num_heads
    if attn_ratio is not None and abs(attn_ratio * key_dim - d) > 1e-6:
        raise ValueError(
            f"attn_ratio={attn_ratio} gives a value dim of {attn_ratio * key_dim:g} per head, but the cascade adds "
            f"each head's output to the next head's input chunk of dim/num_heads={d} channels; "
            f"use attn_ratio={d / key_dim:g} (= dim / (num_heads * key_dim)) or None"
        )


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention on one R×R window, ``B×dim×R×R -> B×dim×R×R``.

    The input is split into ``num_heads`` channel chunks; head i sees chunk i plus the output of head i-1,
    projects it with its own Conv2d_BN to q, k (``key_dim`` each) and v (``dim // num_heads``), filters q with a
    depthwise ``kernels[i]``×``kernels[i]`` Conv2d_BN, and attends over the R² tokens with logits
    ``q·k * key_dim**-0.5 + attention_biases[i, offset(|dy|, |dx|)]``. The concatenated head outputs go through
    ReLU and a Conv2d_BN projection whose BN weight starts at 0, so **the op outputs exactly 0 at init**.

    Args:
        dim: channels. key_dim: q/k channels per head. num_heads: heads; must divide ``dim``.
        attn_ratio: v channels per head over ``key_dim``. The cascade only works with ``dim / (num_heads *
            key_dim)``, which None (the default here; officially 4) derives; a contradicting value raises.
        resolution: window side R; the input must be R×R (use LocalWindowAttention for other sizes).
        kernels: odd depthwise kernel per head; cycled when shorter than ``num_heads`` (officially an IndexError).

    Unlike the reference, the bias gather is not cached in eval mode (gathered each forward), so ``eval()``
    returns the module and ``.to()``/``.half()``/``load_state_dict`` after ``eval()`` stay correct.
    ``attention_bias_idxs`` is a non-persistent buffer; an official state_dict carrying it still loads
    (the key is checked against the rebuilt table and dropped).
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float | None = None,
        resolution: int = 14,
        kernels: Sequence[int] = (5, 5, 5, 5),
    ) -> None:
        super().__init__()
        _check_op_args(dim, key_dim, num_heads, kernels, attn_ratio)
        if resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.d = dim // num_heads
        self.attn_ratio = self.d / key_dim
        self.resolution = resolution
        self.kernels = tuple(int(kernels[i % len(kernels)]) for i in range(num_heads))

        self.qkvs = nn.ModuleList(Conv2d_BN(dim // num_heads, 2 * key_dim + self.d) for _ in range(num_heads))
        self.dws = nn.ModuleList(Conv2d_BN(key_dim, key_dim, k, 1, k // 2, groups=key_dim) for k in self.kernels)
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(self.d * num_heads, dim, bn_weight_init=0.0))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", _offset_index(resolution), persistent=False)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Official checkpoints store the (constant) index table; accept it when it is the one rebuilt here.
        idxs = state_dict.pop(prefix + "attention_bias_idxs", None)
        if idxs is not None and not torch.equal(idxs.to(self.attention_bias_idxs), self.attention_bias_idxs):
            error_msgs.append(
                f"{prefix}attention_bias_idxs {tuple(idxs.shape)} does not match the offset table of "
                f"resolution={self.resolution} {tuple(self.attention_bias_idxs.shape)}"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H != self.resolution or W != self.resolution:
            raise ValueError(f"CascadedGroupAttention(resolution={self.resolution}) got a {H}x{W} input")
        bias = self.attention_biases[:, self.attention_bias_idxs]  # heads, N, N; never cached (see docstring)
        chunks = x.chunk(self.num_heads, dim=1)
        outs = []
        feat = chunks[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + chunks[i]  # the cascade: head i refines head i-1's output
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.d], dim=1)
            q = dw(q)
            attn = torch.baddbmm(bias[i], q.flatten(2).transpose(1, 2), k.flatten(2), alpha=self.scale)
            attn = attn.softmax(dim=-1)  # B, N(query), N(key)
            feat = torch.bmm(v.flatten(2), attn.transpose(1, 2)).view(B, self.d, H, W)
            outs.append(feat)
        return self.proj(torch.cat(outs, dim=1))


class LocalWindowAttention(nn.Module):
    """Cascaded group attention inside non-overlapping windows, ``B×dim×H×W -> B×dim×H×W`` for any H, W ≥ 1.

    The input is zero-padded at the bottom/right to a multiple of the window, split into windows, each window
    runs one CascadedGroupAttention (padded tokens take part as keys/values and in the BN batch statistics, as
    in the reference), and the result is stitched back and cropped. Outputs exactly 0 at init.

    Args:
        dim, key_dim, num_heads, attn_ratio, kernels: as in CascadedGroupAttention.
        resolution: nominal feature-map side; the window is ``min(window_resolution, resolution)`` as in the
            official classification model (it only shrinks the window; any input size is accepted).
        window_resolution: window side.

    Adaptation: the reference runs one un-partitioned attention when H, W ≤ window, which only works at
    H == W == window (e.g. 5×5 with window 7 crashes) and the classification file asserts H == W ==
    resolution. Here the window is always partitioned, so a map smaller than the window becomes one padded
    window and the bias table keeps its fixed window² size for every input; where the reference runs, the
    outputs are the same.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float | None = None,
        resolution: int = 14,
        window_resolution: int = 7,
        kernels: Sequence[int] = (5, 5, 5, 5),
    ) -> None:
        super().__init__()
        if window_resolution < 1:
            raise ValueError(f"window_resolution must be a positive int, got {window_resolution}")
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        self.window_resolution = min(window_resolution, resolution)
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio, self.window_resolution, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        w = self.window_resolution
        pad_b, pad_r = -H % w, -W % w
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        nh, nw = (H + pad_b) // w, (W + pad_r) // w
        if nh == nw == 1:
            x = self.attn(x)
        else:
            x = x.view(B, C, nh, w, nw, w).permute(0, 2, 4, 1, 3, 5).reshape(B * nh * nw, C, w, w)
            x = self.attn(x)
            x = x.view(B, nh, nw, C, w, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, nh * w, nw * w)
        if pad_b or pad_r:
            x = x[:, :, :H, :W]
        return x


class CGA(nn.Module):
    """EfficientViT block with cascaded group attention as a YOLO layer, ``B×c1×H×W -> B×c1×H×W``.

    ``x -> +dw3x3 -> +FFN -> +LocalWindowAttention -> +dw3x3 -> +FFN`` (each ``+`` a residual), the official
    ``EfficientViTBlock`` with submodules ``dw0, ffn0, mixer, dw1, ffn1`` (official block weights load as is).
    Every residual branch ends in a BatchNorm with weight and bias 0, so **the layer is exactly the identity at
    init** (in train and eval mode) until training moves those BN weights.

    Args:
        c1: channels (in = out).
        key_dim: q/k channels per head.
        num_heads: attention heads; must divide c1. Value channels per head are ``c1 // num_heads``.
        window_resolution: attention window side; any H×W works (padded bottom/right, smaller maps become
            one padded window).
        kernels: odd depthwise kernel per head on q, cycled to ``num_heads`` entries.
        ffn_ratio: FFN hidden width over c1 (official 2).

    The ``attn_ratio`` and ``resolution`` arguments of the official block are derived: attn_ratio =
    c1 / (num_heads * key_dim) and the window is used as given.
    """

    def __init__(
        self,
        c1: int,
        key_dim: int = 16,
        num_heads: int = 4,
        window_resolution: int = 7,
        kernels: Sequence[int] = (5, 5, 5, 5),
        ffn_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        kernels = freeze(kernels)
        searched = dict(key_dim=key_dim, num_heads=num_heads, window_resolution=window_resolution, kernels=kernels)
        check_hparams("CGA", _reject, c1, None, searched)
        reason = width_ratio(c1, ffn_ratio, "FFN hidden width")
        if reason:
            raise ValueError(f"CGA: ffn_ratio={ffn_ratio!r} {reason}")
        hidden = int(c1 * ffn_ratio)
        self.dw0 = Residual(Conv2d_BN(c1, c1, 3, 1, 1, groups=c1, bn_weight_init=0.0))
        self.ffn0 = Residual(FFN(c1, hidden))
        attn = LocalWindowAttention(c1, key_dim, num_heads, None, window_resolution, window_resolution, kernels)
        self.mixer = Residual(attn)
        self.dw1 = Residual(Conv2d_BN(c1, c1, 3, 1, 1, groups=c1, bn_weight_init=0.0))
        self.ffn1 = Residual(FFN(c1, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


def _reject(c1: int, hw: tuple[int, int] | None, name: str, value: Any) -> str | None:
    """Why ``name=value`` is impossible for a CGA layer of ``c1`` channels (on an ``hw`` map), or None.

    At a known map size a window larger than the map is rejected when a smaller window choice already covers
    the whole map: it would compute the same global attention over extra zero-padded tokens (which take part
    as keys/values), e.g. windows 7 and 10 on a 5×5 map.
    """
    if name == "num_heads":
        return divisor_of(c1, value, _HEADS, why="the input is split into num_heads chunks")
    if name == "key_dim":
        return positive_int(value, "q/k channels per head")
    if name == "window_resolution":
        reason = positive_int(value, "attention window side")
        if reason is None and hw is not None:
            side = max(hw)
            cover = [c for c in _WINDOWS if side <= c < value]
            if cover:
                return (
                    f"on a {hw[0]}x{hw[1]} map a window of {min(cover)} already covers the whole map; "
                    f"{value} only adds zero-padded tokens (use a window <= {min(cover)})"
                )
        return reason
    if name == "kernels":
        # odd: an even kernel shifts the 'same' padding
        return int_tuple(value, odd=True, example="depthwise kernel per head, cycled to num_heads")
    return None


SPEC = ModuleSpec(
    name="CGA",
    layer=CGA,
    hparams=(
        HParam("key_dim", _KEY_DIMS, 16, "q/k channels per head (official 16)"),
        HParam("num_heads", _HEADS, 4, "attention heads; must divide c1"),
        HParam("window_resolution", _WINDOWS, 7, "attention window side (official 7)"),
        HParam("kernels", _KERNELS, (5, 5, 5, 5), "odd depthwise kernel on q per head, cycled to num_heads"),
    ),
    reject=_reject,
    doc="EfficientViT cascaded group attention block (dw3x3, FFN, windowed CGA, dw3x3, FFN); identity at init.",
)
