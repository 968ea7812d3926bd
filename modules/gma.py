"""GMA: group-mix attention of GroupMixFormer (Ge et al., 2023) as a YOLO layer.

The core op :class:`EfficientAtt` and its helpers keep the official class, argument and parameter names of
``AILab-CVC/GroupMixFormer`` (``models/groupmixformer.py``), so an official ``state_dict`` loads with
``strict=True`` and gives the same output. Its ``SyncBatchNorm`` layers are plain ``BatchNorm2d`` here (same
keys, identical in a single process); under Ultralytics ``initialize_weights`` sets them to eps 1e-3,
momentum 0.03 like every other ``BatchNorm2d`` of the detector.

:class:`GMA` is the reference ``GMA_Block`` on ``B×C×H×W`` maps. The operator only exists for widths divisible
by 10 (five equal channel segments, eight heads over four of them); YOLO widths (multiples of 8 such as 64,
128, 256) run it at the nearest multiple of 40 through bias-free 1x1 projections around the attention op.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .common import DropPath
from .registry import HParam, ModuleSpec, check_hparams, freeze, int_tuple, is_int, probability, width_ratio

__all__ = ["GMA", "EfficientAtt", "Aggregator", "Agg_0", "SeparableConv2d", "ConvRelPosEnc", "SPEC"]

# The crpe head split of the reference: window size -> number of heads. It covers exactly 8 heads.
CRPE_WINDOWS = {3: 2, 5: 3, 7: 3}
NUM_HEADS = sum(CRPE_WINDOWS.values())


class SeparableConv2d(nn.Module):
    """Depthwise ``kernel_size`` conv followed by a pointwise 1x1 conv (no bias by default).

    Args: as ``nn.Conv2d``; the depthwise conv keeps ``in_channels``, the pointwise one maps to ``out_channels``.
    Shapes: ``B×in×H×W -> B×out×H'×W'``. Init: PyTorch's default conv init.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = False,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size, stride, padding, dilation, groups=in_channels, bias=bias
        )
        self.pointwise_conv = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.conv1(x))


class Agg_0(nn.Module):  # noqa: N801 - official name, kept for state-dict compatibility
    """The non-attention branch: the fifth channel segment of q, k and v mixed by a separable 3x3 conv.

    Args: ``seg_dim`` channels per segment. Shapes: ``B×3·seg_dim×H×W -> B×(H·W)×seg_dim`` (tokens).
    The output is LayerNorm (eps 1e-5, over channels) then Hardswish. Init: PyTorch defaults.
    """

    def __init__(self, seg_dim: int):
        super().__init__()
        self.conv = SeparableConv2d(seg_dim * 3, seg_dim, 3, 1, 1)
        self.norm = nn.LayerNorm(seg_dim)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x).flatten(2).transpose(1, 2)))


class Aggregator(nn.Module):
    """Group-mix token aggregation of q, k and v, which arrive stacked on the batch axis (``3B``).

    Channels are cut into ``seg`` = 5 equal segments: segment 0 passes unchanged, segments 1-3 go through
    separable convs of ``kernels`` (reference 3, 5, 7); each then BatchNorm + Hardswish. The BatchNorms see
    q, k and v in one call, so in training their batch statistics are pooled over all three. Segment 4 of
    q, k and v together feeds :class:`Agg_0`.

    Args:
        dim: channels C of q (and of k, v); C % 5 == 0.
        seg: number of segments; only 5 runs (the reference's default of 4 cannot, its forward needs five).
        kernels: kernel sizes of the three separable-conv segments, odd so that H×W is kept.
    Shapes: ``forward(x (3B, N, C), (H, W), num_head)`` -> ``(3, B, num_head, N, 4C/5/num_head)`` for the
    attention and ``(B, N, C/5)`` from :class:`Agg_0`. Init: PyTorch defaults (BN weight 1, bias 0).
    """

    def __init__(self, dim: int, seg: int = 5, kernels: Sequence[int] = (3, 5, 7)):
        super().__init__()
        if seg != 5:
            raise ValueError(f"Aggregator: seg must be 5 (identity, three conv segments, Agg_0), got {seg}")
        if dim % seg:
            raise ValueError(f"Aggregator: dim={dim} must be divisible by seg={seg}")
        kernels = freeze(kernels)
        reason = int_tuple(kernels, length=3, odd=True)
        if reason:
            raise ValueError(f"Aggregator: kernels {reason}, got {kernels}")
        self.dim = dim
        self.seg = seg
        self.kernels = kernels
        seg_dim = dim // seg

        self.norm0 = nn.BatchNorm2d(seg_dim)
        self.act0 = nn.Hardswish()
        for i, k in enumerate(kernels, start=1):
            setattr(self, f"agg{i}", SeparableConv2d(seg_dim, seg_dim, k, 1, k // 2))
            setattr(self, f"norm{i}", nn.BatchNorm2d(seg_dim))
            setattr(self, f"act{i}", nn.Hardswish())
        self.agg0 = Agg_0(seg_dim)

    def forward(
        self, x: torch.Tensor, size: tuple[int, int], num_head: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b3, n, c = x.shape
        h, w = size
        b = b3 // 3
        seg_dim = c // self.seg
        parts = x.transpose(1, 2).reshape(b3, c, h, w).split(seg_dim, dim=1)

        # Agg_0 mixes the last segment of q, k and v of one image: channels [q | k | v].
        local = parts[4].reshape(3, b, seg_dim, h, w).transpose(0, 1).reshape(b, 3 * seg_dim, h, w)
        x_local = self.agg0(local)

        mixed = [self.act0(self.norm0(parts[0]))]
        mixed += [self.act1(self.norm1(self.agg1(parts[1])))]
        mixed += [self.act2(self.norm2(self.agg2(parts[2])))]
        mixed += [self.act3(self.norm3(self.agg3(parts[3])))]
        groups = torch.cat(mixed, dim=1)  # (3B, 4C/5, H, W); head j = channels [j·Ch, (j+1)·Ch)
        groups = groups.reshape(3, b, num_head, 4 * seg_dim // num_head, h * w).transpose(-1, -2)
        return groups, x_local


class ConvRelPosEnc(nn.Module):
    """Convolutional relative position encoding: ``q * dwconv(v)``, one depthwise window size per head group.

    Args:
        Ch: channels per head.
        h: number of heads (used when ``window`` is an int).
        window: an int (same window for all ``h`` heads) or a dict ``{window: heads}`` consumed in order.
    Shapes: ``forward(q, v (B, heads, N, Ch), (H, W))`` -> ``(B, heads, N, Ch)``. Init: PyTorch default
    (depthwise convs with bias).
    """

    def __init__(self, Ch: int, h: int, window: int | dict[int, int]):  # noqa: N803 - official argument name
        super().__init__()
        if isinstance(window, int):
            window = {window: h}
        if not isinstance(window, dict):
            raise ValueError(f"ConvRelPosEnc: window must be an int or a dict, got {type(window).__name__}")
        self.window = window
        self.head_splits = list(window.values())
        self.channel_splits = [heads * Ch for heads in self.head_splits]
        self.conv_list = nn.ModuleList(
            nn.Conv2d(ch, ch, k, padding=k // 2, groups=ch) for k, ch in zip(window, self.channel_splits)
        )

    def forward(self, q: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, heads, n, ch = q.shape
        h, w = size
        v_img = v.transpose(-1, -2).reshape(b, heads * ch, h, w)
        conv_v = torch.cat(
            [conv(part) for conv, part in zip(self.conv_list, v_img.split(self.channel_splits, dim=1))], dim=1
        )
        return q * conv_v.reshape(b, heads, ch, n).transpose(-1, -2)


class EfficientAtt(nn.Module):
    """Group-mix attention (the GMA op): aggregated q, k, v in linear-cost factorised attention plus Agg_0.

    q, k, v = ``qkv(x)`` are aggregated by :class:`Aggregator`; on the 4C/5 attention channels (8 heads of
    Ch = C/10) the output is ``scale · q (softmax_N(k)^T v) + q * dwconv(v)`` with the softmax over tokens and
    ``scale = (C // num_heads)^-0.5`` from the *full* width C, as in the reference; it is concatenated with
    the Agg_0 branch (C/5) and projected by ``proj``.

    Args:
        dim: width C, divisible by 10.
        num_heads: must be 8 (the crpe windows {3: 2, 5: 3, 7: 3} cover exactly 8 heads).
        qkv_bias: bias of ``qkv``. qk_scale: overrides the scale when truthy.
        attn_drop: accepted for signature compatibility; unused, as in the reference.
        proj_drop: dropout after ``proj``.
        kernels: aggregator kernel sizes (reference 3, 5, 7; an extension of the official signature).
    Shapes: ``forward(x (B, N, C), (H, W))`` with N = H·W -> ``(B, N, C)``; any H, W >= 1.
    Init: PyTorch defaults (the reference model re-initialises its Linear layers, see :class:`GMA`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        kernels: Sequence[int] = (3, 5, 7),
    ):
        super().__init__()
        if num_heads != NUM_HEADS:
            raise ValueError(
                f"EfficientAtt: num_heads must be {NUM_HEADS} (crpe windows {CRPE_WINDOWS}), got {num_heads}"
            )
        if dim % 10:
            raise ValueError(f"EfficientAtt: dim={dim} must be divisible by 10 (5 segments, 8 heads on 4 of them)")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.aggregator = Aggregator(dim=dim, seg=5, kernels=kernels)
        self.crpe = ConvRelPosEnc(Ch=dim // 5 * 4 // num_heads, h=num_heads, window=dict(CRPE_WINDOWS))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        # Rows of qkv are [q | k | v]; stack the three on the batch axis for the shared aggregator.
        qkv = self.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3).reshape(3 * b, n, c)
        qkv, x_agg0 = self.aggregator(qkv, size, self.num_heads)
        q, k, v = qkv.unbind(0)  # (B, heads, N, Ch) views of channel-major memory

        # Softmax over tokens, taken along the contiguous axis; q·(k^T v) computed transposed so the sum
        # with the crpe term below stays channel-major.
        context = k.transpose(-1, -2).softmax(dim=-1) @ v  # (B, heads, Ch, Ch)
        out = self.scale * (context.transpose(-1, -2) @ q.transpose(-1, -2)).transpose(-1, -2)
        out = out + self.crpe(q, v, size)
        out = torch.cat([out.transpose(1, 2).reshape(b, n, c // 5 * 4), x_agg0], dim=-1)
        return self.proj_drop(self.proj(out))


class ConvPosEnc(nn.Module):
    """Convolutional position encoding ``x + dwconv_k(x)`` on ``B×C×H×W`` (reference key ``proj``)."""

    def __init__(self, dim: int, k: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x)


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` then dropout, on tokens ``(..., in_features)``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))




def inner_width(c1: int) -> int:
    """Width the attention op runs at for a ``c1``-channel layer: ``c1`` when divisible by 10, else the
    nearest multiple of 40 (at least 40). No tie is possible: c1 ≡ 20 (mod 40) is divisible by 10."""
    return c1 if c1 % 10 == 0 else max(40, (c1 + 20) // 40 * 40)


def _reject(c1: int, hw: tuple[int, int] | None, name: str, value: Any) -> str | None:
    """Why ``name=value`` is impossible (or degenerate on an ``hw`` map) for a GMA layer of ``c1`` channels."""
    if name == "kernels":
        # odd, so same padding keeps H×W
        reason = int_tuple(value, length=3, odd=True, example="e.g. (3, 5, 7)")
        if reason is None and hw is not None:
            # A k×k window wider than 2·max(H, W)-1 only adds taps on zero padding: same operator as a
            # smaller kernel with more parameters. 3 is always allowed so the choice is never empty.
            useful = max(3, 2 * max(hw) - 1)
            if max(value) > useful:
                reason = f"kernels above {useful} only see zero padding on a {hw[0]}x{hw[1]} map; use sizes <= {useful}"
        return reason
    if name == "mlp_ratio":
        return width_ratio(c1, value, "MLP hidden width")
    if name == "dim":
        if value is None:
            return None
        if not is_int(value) or value < 10 or value % 10:
            return f"must be None (derived from c1: {inner_width(c1)}) or a positive multiple of 10"
        return None
    if name == "drop_path":
        return probability(value)
    return None


class GMA(nn.Module):
    """GroupMixFormer's ``GMA_Block`` as a YOLO layer: ``B×C×H×W -> B×C×H×W``.

    ``x = x + dwconv3x3(x)``; ``x = x + DropPath(proj_out(EfficientAtt(proj_in(LN(x)))))``;
    ``x = x + DropPath(Mlp(LN(x)))``, LayerNorms with eps 1e-6 over channels, ``qkv_bias=True`` and 8 heads
    as in every GroupMixFormer preset. ``num_heads`` is not an argument: the reference crpe head split
    {3: 2, 5: 3, 7: 3} fixes it at 8.

    Width adaptation: the op needs C % 10 == 0. When ``c1`` is divisible by 10 it runs at ``c1`` and there
    are no projections (state-dict keys are then exactly those of ``GMA_Block``). Otherwise it runs at the
    nearest multiple of 40 (64->80, 128->120, 192->200, 256->240, 384->400, 512->520, 576->560, 768->760)
    between bias-free linear 1x1 projections ``proj_in``/``proj_out`` (their biases would be redundant with
    those of ``qkv`` and ``proj``); multiples of 40 are what all GroupMixFormer presets use (segments of a
    multiple of 8 channels, head width a multiple of 4), whereas the nearest multiple of 10 gives odd or tiny
    heads (130 -> 13 channels per head). The residual stream, CPE, norms and MLP stay at ``c1``.

    Args:
        c1: input = output channels.
        mlp_ratio: MLP hidden width ``int(c1 * mlp_ratio)`` (presets 2 or 4).
        kernels: aggregator separable-conv kernel sizes, three odd ints (reference (3, 5, 7)).
        dim: width of the attention op; None derives it from ``c1`` as above.
        qkv_bias: bias of the qkv projection (True in all presets).
        drop_path: stochastic-depth rate of both residual branches.

    Init: as the reference model's ``_init_weights``: Linear weights truncated normal (std 0.02) with zero
    bias, LayerNorms weight 1 / bias 0, convs and BatchNorms PyTorch defaults; ``proj_in``/``proj_out``
    (semi-)orthogonal so the op sees inputs of the same scale as without them. The layer is not an identity
    at init: for unit-variance input ``|y - x| ≈ 0.6 |x|``, mostly from the CPE conv (PyTorch default init);
    the attention and MLP residuals are small (std-0.02 Linear weights).
    """

    def __init__(
        self,
        c1: int,
        mlp_ratio: float = 4,
        kernels: Sequence[int] = (3, 5, 7),
        dim: int | None = None,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        check_hparams(
            "GMA", _reject, c1, None, {"kernels": kernels, "mlp_ratio": mlp_ratio, "dim": dim, "drop_path": drop_path}
        )
        dim = inner_width(c1) if dim is None else dim
        self.c1, self.dim, self.kernels = c1, dim, freeze(kernels)
        self.cpe = ConvPosEnc(c1, k=3)
        self.norm1 = nn.LayerNorm(c1, eps=1e-6)
        self.proj_in = nn.Linear(c1, dim, bias=False) if dim != c1 else nn.Identity()
        self.att = EfficientAtt(dim, num_heads=NUM_HEADS, qkv_bias=qkv_bias, kernels=self.kernels)
        self.proj_out = nn.Linear(dim, c1, bias=False) if dim != c1 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(c1, eps=1e-6)
        self.mlp = Mlp(c1, int(c1 * mlp_ratio), act_layer=nn.GELU)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear) and (m is self.proj_in or m is self.proj_out):
            nn.init.orthogonal_(m.weight)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = self.cpe(x).flatten(2).transpose(1, 2)  # (B, N, C) tokens
        x = x + self.drop_path(self.proj_out(self.att(self.proj_in(self.norm1(x)), (h, w))))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(b, c, h, w)


SPEC = ModuleSpec(
    name="GMA",
    layer=GMA,
    hparams=(
        HParam("kernels", ((3, 5, 7), (3, 3, 3), (5, 5, 5), (7, 7, 7), (3, 5, 5)), (3, 5, 7),
               "aggregator separable-conv kernel sizes of channel segments 1-3 (reference (3, 5, 7); odd only)"),
        HParam("mlp_ratio", (2, 4), 4, "MLP hidden width = int(c1 * mlp_ratio) (GroupMixFormer presets use 2 or 4)"),
    ),
    reject=_reject,
    doc="Group-mix attention (GroupMixFormer GMA_Block): q/k/v aggregated by identity/separable-conv/Agg_0 "
    "segments, 8-head factorised linear attention with conv relative position encoding, pre-LN MLP. "
    "Runs at the nearest multiple of 40 through 1x1 projections when c1 is not divisible by 10.",
)
