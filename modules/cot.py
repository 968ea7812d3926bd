"""CoT — Contextual Transformer block (CoTNet, Li et al., TPAMI 2022) as a YOLO layer.

``CotLayer`` is the CoT operator of the official CoTNet repository (JDAI-CV/CoTNet, ``models/cotnet.py``) with
the same constructor arguments and submodule names, so an official ``state_dict`` loads with ``strict=True``.
Its CUDA/cupy ``LocalConvolution`` is replaced by a pure-PyTorch zero-padded gather (:func:`local_aggregation`)
that the repository's own test states is equal to the kernel. ``CoT`` is the CoTNet (ResNet) bottleneck around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import HParam, ModuleSpec, check_hparams, divisor_of, int_tuple

__all__ = ["CoT", "CotLayer", "LocalConvolution", "local_aggregation", "SPEC"]

SHARE_PLANES = 8  # channels per dynamic-kernel group are interleaved: channel c uses kernel c % (C/8)
KEY_GROUPS = 4  # groups of the static-context (key) k x k convolution


def local_aggregation(x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-pixel dynamic ``k x k`` aggregation with zero padding (CoTNet's ``aggregation_zeropad``, stride 1).

    ``x``: ``(B, C, H, W)``; ``weight``: ``(B, Cw * k * k, H, W)`` laid out ``[Cw, k*k]`` (or already viewed as
    ``(B, 1, Cw, k*k, H, W)``: one weight head, as CotLayer uses), ``C % Cw == 0``. Returns
    ``out[b, c, y, x] = sum_{i,j} weight[b, c % Cw, i*k+j, y, x] * x_pad[b, c, y+i, x+j]`` with ``x_pad``
    zero-padded by ``k // 2``: the ``C / Cw`` channel groups share the ``Cw`` kernels in interleaved order.
    """
    b, c, h, w = x.shape
    k, p = kernel_size, kernel_size // 2
    kk = k * k
    cw = weight.shape[2] if weight.dim() == 6 else weight.shape[1] // kk
    weight = weight.reshape(b, 1, cw, kk, h, w)
    # Padding + k*k shifted slices instead of F.unfold: no (C*k*k)xHxW im2col buffer, 2-6x faster on CPU,
    # and exports to ONNX as Pad/Slice/Mul/Add.
    xp = F.pad(x, (p, p, p, p)).reshape(b, c // cw, cw, h + 2 * p, w + 2 * p)
    out = xp[..., 0:h, 0:w] * weight[:, :, :, 0]
    for t in range(1, kk):
        i, j = divmod(t, k)
        out = out + xp[..., i : i + h, j : j + w] * weight[:, :, :, t]
    return out.reshape(b, c, h, w)


class LocalConvolution(nn.Module):
    """Parameter-free stand-in for CoTNet's cupy ``LocalConvolution`` (stride 1, dilation 1, zero padding only).

    Args:
        in_channels, out_channels: kept for signature compatibility (must be equal).
        kernel_size: odd window size ``k``.
        padding: must be ``(k - 1) // 2`` (the only value CoTNet uses).

    ``forward(x (B, C, H, W), weight (B, 1, C/8, k*k, H, W)) -> (B, C, H, W)``, see :func:`local_aggregation`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if in_channels != out_channels or stride != 1 or dilation != 1 or padding != (kernel_size - 1) // 2:
            raise ValueError(
                "LocalConvolution supports only in_channels == out_channels, stride 1, dilation 1 and padding "
                f"(kernel_size-1)//2, got in/out {in_channels}/{out_channels}, stride {stride}, dilation {dilation}, "
                f"padding {padding}"
            )
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return local_aggregation(x, weight, self.kernel_size)


class CotLayer(nn.Module):
    """CoT operator: static context ``K`` + dynamic context from ``[x, K]``, fused by radix-2 split attention.

    Args:
        dim: channels ``C`` (multiple of 8: ``C/8`` shared dynamic kernels; the key conv has 4 groups).
        kernel_size: odd size ``k`` of the key convolution and of the dynamic local aggregation.

    Shape: ``(B, C, H, W) -> (B, C, H, W)``, any ``H, W >= 1``. No residual inside (as in the reference).

    Same computation and parameter names as the official ``CotLayer``; the constants (share_planes 8, factor 2,
    radix 2, SE reduction 4 with at least 32 channels, key groups 4) are fixed as there. Adaptations: the cupy
    ``LocalConvolution`` is :func:`local_aggregation` (pure PyTorch: CPU/GPU, AMP, ONNX), Swish is ``nn.SiLU``, and
    a training batch of one sample — where the SE BatchNorm sees one value per channel and the reference raises
    "Expected more than 1 value per channel" — normalises that BatchNorm with its running statistics for that
    call (running statistics are not updated then); batches of two or more are unchanged.
    Init: PyTorch defaults, like the reference class (the ``CoT`` block applies CoTNet's model init).
    """

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        if dim < SHARE_PLANES or dim % SHARE_PLANES:
            raise ValueError(f"CotLayer: dim={dim} must be a positive multiple of {SHARE_PLANES} (share_planes)")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"CotLayer: kernel_size={kernel_size} must be odd and >= 1 (zero padding k//2)")
        self.dim = dim
        self.kernel_size = kernel_size
        k = kernel_size
        share_planes, factor = SHARE_PLANES, 2

        self.key_embed = nn.Sequential(
            nn.Conv2d(dim, dim, k, stride=1, padding=k // 2, groups=KEY_GROUPS, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )
        self.embed = nn.Sequential(
            nn.Conv2d(2 * dim, dim // factor, 1, bias=False),
            nn.BatchNorm2d(dim // factor),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim // factor, k * k * dim // share_planes, kernel_size=1),
            nn.GroupNorm(num_groups=dim // share_planes, num_channels=k * k * dim // share_planes),
        )
        self.conv1x1 = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1, bias=False), nn.BatchNorm2d(dim))
        self.local_conv = LocalConvolution(dim, dim, kernel_size=k, stride=1, padding=(k - 1) // 2, dilation=1)
        self.bn = nn.BatchNorm2d(dim)
        self.act = nn.SiLU(inplace=True)

        self.radix = 2
        attn_chs = max(dim * self.radix // 4, 32)
        self.se = nn.Sequential(
            nn.Conv2d(dim, attn_chs, 1),
            nn.BatchNorm2d(attn_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(attn_chs, self.radix * dim, 1),
        )

    def _se(self, gap: torch.Tensor) -> torch.Tensor:
        s = self.se[0](gap)
        bn = self.se[1]
        if self.training and s.shape[0] == 1 and bn.running_mean is not None:
            # One pooled sample has no batch statistics; normalise it like eval mode for this call only.
            s = F.batch_norm(s, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            s = bn(s)
        return self.se[3](self.se[2](s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.key_embed(x)  # static context
        weight = self.embed(torch.cat([x, k], dim=1))  # (B, k*k*C/8, H, W), laid out [C/8, k*k]
        v = self.local_conv(self.conv1x1(x), weight.view(b, 1, -1, self.kernel_size**2, h, w))
        v = self.act(self.bn(v))  # dynamic context

        # radix-2 split attention over [dynamic, static]; SE output channels are interleaved (c, radix)
        gap = (v + k).mean((2, 3), keepdim=True)
        attn = self._se(gap).view(b, c, self.radix).softmax(dim=2)
        return v * attn[:, :, 0, None, None] + k * attn[:, :, 1, None, None]


class CoT(nn.Module):
    """CoTNet bottleneck as a YOLO layer: ``relu(x + BN(conv1x1(CotLayer(relu(BN(conv1x1(x)))))))``.

    Args:
        c1: input = output channels ``C``.
        kernel_size: odd ``k`` of the CoT key conv and dynamic aggregation (reference 3).
        expansion: bottleneck ratio; the CoT operator runs at width ``C / expansion`` (reference ResNet 4), which
            must be a multiple of 8.

    Shape: ``(B, C, H, W) -> (B, C, H, W)`` for any ``H, W >= 1`` and batch >= 1 (see ``CotLayer`` for batch 1
    in training). Submodule names follow the reference ``Bottleneck`` (stride 1, no downsample, no SE/drop-path),
    so its ``state_dict`` loads with ``strict=True`` when ``C = 4 * planes``.

    Init as in CoTNet's ResNet: every conv kaiming-normal (fan_out, relu), norms weight 1 / bias 0, and the last
    BN (``bn3``) weight zeroed (``zero_init_last_bn=True``) — the layer outputs **exactly ``relu(x)``** at init
    (identity on non-negative inputs; negative inputs, e.g. from SiLU, are clipped to 0 by the final ReLU).
    """

    def __init__(self, c1: int, kernel_size: int = 3, expansion: int = 4) -> None:
        super().__init__()
        check_hparams("CoT", _reject, c1, None, {"kernel_size": kernel_size, "expansion": expansion})
        width = c1 // expansion
        self.c1, self.kernel_size, self.expansion, self.width = c1, kernel_size, expansion, width

        self.conv1 = nn.Conv2d(c1, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = CotLayer(width, kernel_size=kernel_size)
        self.conv3 = nn.Conv2d(width, c1, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c1)
        self.act3 = nn.ReLU(inplace=True)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act1(self.bn1(self.conv1(x))))
        return self.act3(self.bn3(self.conv3(y)) + x)


_EXPANSIONS = (1, 2, 4, 8)


def _reject(c1: int, hw: tuple[int, int] | None, name: str, value) -> str | None:
    """Why ``value`` is impossible for argument ``name`` of ``CoT`` at ``c1`` channels (and map ``hw``), or None."""
    if name == "kernel_size":
        if int_tuple((value,), odd=True):
            return "must be an odd int >= 1 (the window is zero-padded by k//2 on each side), e.g. 3 or 5"
        if hw is not None and value > 3 and value // 2 >= max(hw):
            return (f"on a {hw[0]}x{hw[1]} map the outer ring of a {value}x{value} window only ever sees zero "
                    f"padding (a {value - 2}x{value - 2} kernel with wasted parameters); use kernel_size <= "
                    f"{max(3, 2 * max(hw) - 1)}")
        return None
    if name == "expansion":
        reason = divisor_of(c1, value, _EXPANSIONS, "bottleneck ratio", why="the CoT width c1/expansion must be whole")
        if reason:
            return reason
        width = c1 // value
        if width % SHARE_PLANES:
            ok = [e for e in _EXPANSIONS if c1 % e == 0 and (c1 // e) % SHARE_PLANES == 0]
            hint = f"expansions giving such a width at c1={c1}: {ok}" if ok else "c1 must be a multiple of 8"
            return (f"the CoT width c1/expansion={width} must be a multiple of {SHARE_PLANES} (C/8 shared dynamic "
                    f"kernels, key conv groups {KEY_GROUPS}); {hint}")
        return None
    return None


SPEC = ModuleSpec(
    name="CoT",
    layer=CoT,
    hparams=(
        HParam("kernel_size", (3, 5), 3, "odd size of the CoT key conv and dynamic aggregation (reference 3)"),
        HParam("expansion", (2, 4), 4, "bottleneck ratio: CoT runs at width c1/expansion, a multiple of 8 (ref. 4)"),
    ),
    reject=_reject,
    doc="CoTNet bottleneck (conv1x1-BN-ReLU, CotLayer, conv1x1-BN, +x, ReLU); outputs relu(x) at init.",
)
