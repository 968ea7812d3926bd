"""Super token attention (STViT, Huang et al., CVPR 2023) as a YOLO layer.

The core op :class:`StokenAttention` and its refine :class:`Attention` keep the official class names,
argument names and parameter names (hhb072/STViT ``models/stvit.py``), so an official state dict loads with
``strict=True``; :class:`STA` is the official ``StokenAttentionLayer`` block with a YOLO signature.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import DropPath
from .registry import HParam, ModuleSpec, check_hparams, divisor_of, int_tuple, positive_int, probability, width_ratio

__all__ = ["SPEC", "STA", "Attention", "Fold", "StokenAttention", "Unfold"]

# stoken_size 1 is global MHSA over every pixel; above this many pixels its attention matrix is too large.
_GLOBAL_MAX_PIXELS = 1600
_HEAD_CHOICES = (1, 2, 4, 8)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a ``B×C×H×W`` tensor (eps 1e-6; the ``nn.LayerNorm`` is ``.norm`` as in STViT)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


class ResDWC(nn.Module):
    """``x + dwconv_k(x)``: residual depthwise convolution (STViT's positional encoding and MLP mixer)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Mlp(nn.Module):
    """STViT MLP on ``B×C×H×W``: 1x1 conv -> act -> dropout -> ``x + dw3x3(x)`` -> 1x1 conv -> dropout."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features = out_features or in_features
        self.hidden_features = hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act1 = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop = nn.Dropout(drop)
        self.conv = ResDWC(hidden_features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act1(self.fc1(x)))
        return self.drop(self.fc2(self.conv(x)))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a ``B×C×H×W`` map with 1x1-conv projections (STViT).

    Args:
        dim: channels C (``dim % num_heads == 0``).
        window_size: unused, kept for the official signature.
        num_heads: heads; head_dim = dim // num_heads.
        qkv_bias: bias of the qkv projection.
        qk_scale: logit scale, default ``head_dim ** -0.5``.
        attn_drop, proj_drop: dropout on the attention weights / the output.

    ``qkv`` is ``Conv2d(dim, 3*dim, 1)`` whose output channels are grouped per head as
    ``[q_h0, k_h0, v_h0, q_h1, ...]`` (each head_dim wide), the official layout, so official weights load unchanged.
    Softmax is over the keys. Shapes: ``B×C×H×W -> B×C×H×W``.
    """

    def __init__(
        self,
        dim: int,
        window_size: Any = None,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        head_dim = self.dim // self.num_heads
        # (B, heads, N, 3*head_dim): per head the channels are q, k, v in that order.
        qkv = self.qkv(x).reshape(b, self.num_heads, 3 * head_dim, h * w).transpose(-1, -2)
        q, k, v = (t.contiguous() for t in qkv.split(head_dim, dim=-1))  # SDPA is ~2x faster on contiguous input
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)  # (B, heads, N, head_dim)
        return self.proj_drop(self.proj(out.transpose(-1, -2).reshape(b, c, h, w)))


class _Neighbourhood3x3(nn.Module):
    """Base of :class:`Unfold`/:class:`Fold`: a parameter-free 3x3 gather/scatter (zero outside the grid).

    STViT implements both as convolutions with a fixed identity kernel stored as a frozen parameter ``weights``.
    Here they are pad-and-slice copies and sums (the same values; no constant that could drift once Ultralytics
    unfreezes frozen parameters; 5-10x faster than the transposed convolution on CPU). An official state dict's ``weights``
    entry is accepted on loading (and checked to be that identity kernel), so it loads with ``strict=True``.
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weights"
        if key in state_dict:
            given = state_dict.pop(key)
            identity = torch.eye(9).reshape(9, 1, 3, 3)
            if given.shape != identity.shape or not torch.equal(given.detach().cpu().float(), identity):
                error_msgs.append(f"{key}: expected STViT's fixed 3x3 identity kernel of shape (9, 1, 3, 3)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class Unfold(_Neighbourhood3x3):
    """3x3 neighbourhood of every cell: ``B×C×H×W -> B×(H·W)×C×9``; slot ``3i + j`` holds offset ``(i-1, j-1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, H+2, W+2, C)
        slots = [xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]
        return torch.stack(slots, dim=-1).reshape(b, h * w, c, 9)


class Fold(_Neighbourhood3x3):
    """Adjoint of :class:`Unfold`: ``B×(H·W)×C×9 -> B×C×H×W``, each slot added to the cell it came from."""

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, c, _ = x.shape
        h, w = grid
        x = x.reshape(b, h, w, c, 9)
        out = None
        for k in range(9):
            i, j = divmod(k, 3)
            # slot k of cell (y, x) belongs to cell (y + i - 1, x + j - 1); place it on a 1-cell padded canvas
            shifted = F.pad(x[..., k], (0, 0, j, 2 - j, i, 2 - i))
            out = shifted if out is None else out + shifted
        return out[:, 1 : h + 1, 1 : w + 1].permute(0, 3, 1, 2)


class StokenAttention(nn.Module):
    """Super token attention: sparse pixel-to-super-token association, attention among super tokens, upsampling.

    Args:
        dim: channels C.
        stoken_size: pixels per super token, ``(h, w)`` or an int for ``(s, s)``; ``(1, 1)`` is global MHSA.
        n_iter: affinity iterations (>= 1).
        refine: refine the super tokens (else they are mapped back as they are).
        refine_attention: refine with :class:`Attention` (else a 1x1 -> dw5x5 -> 1x1 conv stack).
        num_heads, qkv_bias, qk_scale, attn_drop, proj_drop: of the refine :class:`Attention`.

    Shapes: ``B×C×H×W -> B×C×H×W`` for any H, W >= 1. The map is zero padded bottom/right to a multiple of the
    super-token size (padded pixels take part, unmasked, as in the reference) and cropped back. The pixel-token
    affinity and its iterations are computed without gradient; gradients reach the input only through the
    affinity-weighted pooling and upsampling. Not zero or identity at init.

    Differences from the official code, all numerically identical in float32/float64 (verified against
    hhb072/STViT to float64 round-off, outputs and gradients): an int ``stoken_size`` is accepted; the identity
    unfold/fold convolutions (frozen parameters there, which the Ultralytics trainer would unfreeze) are
    parameter-free pad/slice gathers (:class:`Unfold`, :class:`Fold`); ``avg_pool2d`` replaces the equivalent
    ``adaptive_avg_pool2d``; the affinity is stored transposed (softmax over dim -2) and the refine attention
    uses ``scaled_dot_product_attention`` (both for speed); the affinity softmax and the ``1e-12``-eps
    normalisation run in at least float32 (in fp16 the eps would round to 0).
    """

    def __init__(
        self,
        dim: int,
        stoken_size: int | Sequence[int],
        n_iter: int = 1,
        refine: bool = True,
        refine_attention: bool = True,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if positive_int(stoken_size) and int_tuple(stoken_size, length=2):
            raise ValueError(f"StokenAttention: stoken_size must be an int >= 1 or a pair (h, w) of them, got {stoken_size!r}")
        stoken_size = _pair(stoken_size)
        if positive_int(n_iter):
            raise ValueError(f"StokenAttention: n_iter must be an int >= 1, got {n_iter!r}")
        self.n_iter = n_iter
        self.stoken_size = stoken_size
        self.refine = refine
        self.refine_attention = refine_attention
        self.scale = dim**-0.5  # affinity logits use the full channel count, not a head dim
        self.unfold = Unfold()
        self.fold = Fold()
        if refine:
            if refine_attention:
                self.stoken_refine = Attention(
                    dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop
                )
            else:
                self.stoken_refine = nn.Sequential(
                    nn.Conv2d(dim, dim, 1, 1, 0), nn.Conv2d(dim, dim, 5, 1, 2, groups=dim), nn.Conv2d(dim, dim, 1, 1, 0)
                )

    def stoken_forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h0, w0 = x.shape
        sh, sw = self.stoken_size
        pad_b, pad_r = (-h0) % sh, (-w0) % sw
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        grid = hh, ww = (h0 + pad_b) // sh, (w0 + pad_r) // sw
        # (B, hh*ww, C, sh*sw): the pixels of each grid cell. The affinity is kept as (B, n, 9, sh*sw), i.e.
        # transposed w.r.t. STViT, because a softmax over a short last axis of 9 is ~20x slower on CPU.
        pixels = x.reshape(b, c, hh, sh, ww, sw).permute(0, 2, 4, 1, 3, 5).reshape(b, hh * ww, c, sh * sw)
        # Normalisation precision: at least float32 so the 1e-12 eps survives under fp16/bf16.
        norm_dtype = torch.promote_types(x.dtype, torch.float32)

        with torch.no_grad():
            tokens = F.avg_pool2d(x, (sh, sw))
            for it in range(self.n_iter):
                logits = (self.unfold(tokens).transpose(-1, -2) @ pixels) * self.scale  # (B, n, 9, sh*sw)
                affinity = logits.to(norm_dtype).softmax(-2)
                # total affinity each super token receives from the pixels of the cells that see it
                affinity_sum = self.fold(affinity.sum(-1, keepdim=True).transpose(-1, -2), grid)
                affinity = affinity.to(pixels.dtype)
                if it < self.n_iter - 1:
                    pooled = self.fold(pixels @ affinity.transpose(-1, -2), grid)
                    tokens = (pooled.to(norm_dtype) / (affinity_sum + 1e-12)).to(pooled.dtype)

        # affinity-weighted mean of the pixels: differentiable w.r.t. the pixels only
        pooled = self.fold(pixels @ affinity.transpose(-1, -2), grid)  # (B, C, hh, ww)
        tokens = (pooled.to(norm_dtype) / (affinity_sum + 1e-12)).to(pooled.dtype)
        if self.refine:
            tokens = self.stoken_refine(tokens)
        out = self.unfold(tokens) @ affinity  # (B, n, C, sh*sw): each pixel mixes its 9 neighbour tokens
        out = out.reshape(b, hh, ww, c, sh, sw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh * sh, ww * sw)
        if pad_b or pad_r:
            out = out[:, :, :h0, :w0]
        return out

    def direct_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stoken_refine(x) if self.refine else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stoken_size[0] > 1 or self.stoken_size[1] > 1:
            return self.stoken_forward(x)
        return self.direct_forward(x)


def _default_heads(c1: int) -> int:
    """STViT's head_dim 64: ``c1 // 64`` heads, lowered to the nearest divisor of c1 (at least 1)."""
    heads = max(1, c1 // 64)
    while c1 % heads:
        heads -= 1
    return heads


def _reject(c1: int, hw: tuple[int, int] | None, name: str, value: Any) -> str | None:
    """Why ``value`` is impossible for argument ``name`` at ``c1`` channels (and on an ``hw`` map), or None."""
    if name == "stoken_size":
        if positive_int(value) and int_tuple(value, length=2):
            return "must be a positive int or a pair (h, w) of positive ints (pixels per super token)"
        if hw is not None:
            sh, sw = _pair(value)
            h, w = hw
            if sh == sw == 1 and h * w > _GLOBAL_MAX_PIXELS:
                mb = (h * w) ** 2 * 4 / 2**20
                return (
                    f"stoken_size 1 is global attention over all {h}x{w}={h * w} pixels, whose attention matrix "
                    f"takes {mb:.0f} MiB per head per image in float32; allowed only where h*w <= {_GLOBAL_MAX_PIXELS} "
                    "(e.g. 40x40); use stoken_size 2, 4 or 8 here"
                )
            if (sh, sw) != (1, 1) and math.ceil(h / sh) * math.ceil(w / sw) == 1:
                return (
                    f"a {h}x{w} map holds a single {sh}x{sw} super token, so the attention among super tokens "
                    "degenerates (softmax over one token); use a smaller stoken_size (grid of >= 2 super tokens) or 1"
                )
        return None
    if name == "n_iter":
        return positive_int(value, "number of pixel/super-token affinity iterations")
    if name == "num_heads":
        return None if value is None else divisor_of(c1, value, _HEAD_CHOICES, "or None for head_dim 64")
    if name == "mlp_ratio":
        return width_ratio(c1, value, "MLP hidden width")
    return None


class STA(nn.Module):
    """STViT block (``StokenAttentionLayer``) as a YOLO layer, ``B×c1×H×W -> B×c1×H×W`` for any H, W >= 1.

    ``x = x + dw3x3(x)``; ``x = x + g1 * StokenAttention(LayerNorm2d(x))``; ``x = x + g2 * Mlp(BatchNorm2d(x))``
    with Mlp = 1x1 -> GELU -> ``(x + dw3x3)`` -> 1x1; g1, g2 are layer scales (``layerscale=True``) or 1.

    Args:
        c1: input (= output) channels.
        stoken_size: pixels per super token (int or (h, w)); 1 = global MHSA. STViT uses 8 at stride 4 and 4 at
            stride 8 (a 7x7 grid at 224 px); choose so that the grid (H/s) is about 4-12.
        n_iter: affinity iterations.
        num_heads: heads of the super-token attention; None -> head_dim 64 as in the STViT presets
            (``c1 // 64``, lowered to a divisor of c1, at least 1).
        mlp_ratio: MLP hidden width = ``int(c1 * mlp_ratio)``.
        layerscale: learnable per-channel scales on both branches, initialised to ``init_values``.
        qkv_bias: bias in the qkv projection (True in all STViT presets).
        qk_scale, drop, attn_drop, drop_path: as in STViT (dropouts 0 by default).
        init_values: initial layer scale.

    Init: PyTorch default initialisation (as STViT, whose init touches only Linear/LayerNorm), so the block is
    not an identity: ``x + dw3x3(x)`` plus O(1) attention and MLP branches; with ``layerscale=True`` it starts
    as ``x + dw3x3(x)`` up to branches scaled by ``init_values`` (1e-5). Ultralytics' ``initialize_weights``
    later sets eps=1e-3, momentum=0.03 on ``norm2`` (STViT: 1e-5, 0.1).

    Adaptations (all output-preserving, see :class:`StokenAttention`): an int ``stoken_size``; STViT's frozen
    identity unfold/fold kernels are parameter-free gathers. Parameter and submodule names equal
    ``StokenAttentionLayer``'s, so its state dict loads with ``strict=True``. Every H, W runs as in the reference
    (zero pad + crop); sizes that leave a single super token (e.g. s=8 on 5x5) or make global attention huge
    (s=1 above 1600 pixels) are refused by the search through ``_reject`` with the map size, not here.
    """

    def __init__(
        self,
        c1: int,
        stoken_size: int | Sequence[int] = 8,
        n_iter: int = 1,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        layerscale: bool = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float = 1e-5,
    ):
        super().__init__()
        hparams = {"stoken_size": stoken_size, "n_iter": n_iter, "num_heads": num_heads, "mlp_ratio": mlp_ratio}
        check_hparams("STA", _reject, c1, None, hparams)
        for name, p in (("drop", drop), ("attn_drop", attn_drop), ("drop_path", drop_path)):
            reason = probability(p)
            if reason:
                raise ValueError(f"STA: {name}={p!r} {reason}")
        if qk_scale is not None and not qk_scale > 0:
            raise ValueError(f"STA: qk_scale={qk_scale!r} must be positive or None (head_dim ** -0.5)")
        if num_heads is None:
            num_heads = _default_heads(c1)
        self.c1 = c1
        self.layerscale = layerscale
        self.pos_embed = ResDWC(c1, 3)
        self.norm1 = LayerNorm2d(c1)
        self.attn = StokenAttention(
            c1,
            stoken_size=stoken_size,
            n_iter=n_iter,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(c1)
        self.mlp2 = Mlp(in_features=c1, hidden_features=int(c1 * mlp_ratio), out_features=c1, drop=drop)
        if layerscale:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(1, c1, 1, 1))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(1, c1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(x)
        a = self.attn(self.norm1(x))
        if self.layerscale:
            a = self.gamma_1 * a
        x = x + self.drop_path(a)
        m = self.mlp2(self.norm2(x))
        if self.layerscale:
            m = self.gamma_2 * m
        return x + self.drop_path(m)


SPEC = ModuleSpec(
    name="STA",
    layer=STA,
    hparams=(
        HParam(
            "stoken_size",
            (1, 2, 4, 8),
            8,
            "pixels per super token (square); 1 = global MHSA (only where h*w <= 1600); a size leaving a single "
            "super token on the map is rejected",
        ),
        HParam("n_iter", (1, 2), 1, "pixel/super-token affinity iterations (STViT: 1)"),
        HParam("num_heads", _HEAD_CHOICES, None, "heads of the super-token attention, must divide c1; None = c1 // 64"),
        HParam("mlp_ratio", (2.0, 3.0, 4.0), 4.0, "MLP hidden width / c1 (STViT: 4)"),
    ),
    reject=_reject,
    doc="Super token attention block (STViT): sparse super-token association + MHSA among super tokens + conv MLP.",
)
