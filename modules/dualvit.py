"""DualViT: the dual-pathway (pixel tokens / semantic tokens) attention of the Dual Vision Transformer.

Yao et al., "Dual Vision Transformer", TPAMI 2023. Official code: YehLi/ImageNetModel,
``classification/dualvit.py`` (commit 0b4302e). This file re-implements the stage-1 ("dual") part:

* :class:`DualAttention` and :class:`DualBlock` — the official ops, same constructor arguments, parameter names
  and numerics (an official ``state_dict`` loads with ``strict=True``).
* :class:`SemanticInit` — the semantic-token initialisation that the reference keeps in its top-level model
  (``DualViT.__init__`` / ``forward_sep``), with an adaptive semantic grid (see its docstring).
* :class:`DualViT` — the YOLO layer ``B×C×H×W -> B×C×H×W``: semantic init + ``depth`` DualBlocks.

The semantic tokens are internal to one layer: every inserted layer initialises its own.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn

from .common import DropPath
from .registry import HParam, ModuleSpec, check_hparams, divisor_of, divisors_message, positive_int, width_ratio

__all__ = ["DualAttention", "DualBlock", "DualViT", "PVT2FFN", "SPEC", "SemanticInit", "grid_pool"]

LAYER_SCALE_INIT = 1e-6  # reference layer-scale init of every gamma
HEAD_DIM = 32  # reference head width (presets: heads = dim / 32)
BLOCK_NORM_EPS = 1e-6  # reference presets build block/stage norms with LayerNorm(eps=1e-6)
_HEAD_CHOICES = (1, 2, 4, 8)  # head counts error messages suggest


def _init_weights(m: nn.Module) -> None:
    """The reference initialisation: trunc-normal(0.02) linears, unit LayerNorms, He(fan_out) convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention over keys; (B, h, Nq, d) queries -> (B, Nq, h*d)."""
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).flatten(2)




class DualAttention(nn.Module):
    """Dual attention between N pixel tokens and M semantic tokens (official op, official parameter names).

    ``forward(x, H, W, semantics)`` with ``x`` (B, N, C) and ``semantics`` (B, M, C) returns ``(x', semantics')``:

    1. semantic self-attention ``s += γ1·MHSA(qkv_proxy(s))`` (``qkv_proxy`` = LayerNorm -> Linear(C, 3C));
    2. semantics read the pixels: ``s += γ2·Attn(q_proxy(q_proxy_ln(s)), kv_proxy(x))``;
    3. ``s += γ3·mlp_proxy(p_ln(s))`` (Linear(C, 4C) -> ReLU -> Linear(4C, C));
    4. pixels read only the M semantics: ``x' = proj(Attn(q(x), kv(proxy_ln(s))))``.

    Heads: ``num_heads`` (must divide ``dim``), scale ``(dim/num_heads)**-0.5``. The internal LayerNorms use
    eps 1e-5 as in the reference. ``H``, ``W`` are unused (kept for the official call signature). ``drop_path``
    applies to the three semantic updates. Cost O(N·M·C + M²·C).

    At init the semantic updates are scaled by γ1..3 = 1e-6, so ``semantics' = semantics`` to ~1e-6; ``x'`` is a
    full-size attention output (the block's γ1 makes the block an identity).
    """

    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DualAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5

        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

        self.q_proxy = nn.Linear(dim, dim)
        self.kv_proxy = nn.Linear(dim, 2 * dim)
        self.q_proxy_ln = nn.LayerNorm(dim)
        self.p_ln = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp_proxy = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(inplace=True), nn.Linear(4 * dim, dim))
        self.proxy_ln = nn.LayerNorm(dim)
        self.qkv_proxy = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3 * dim))

        self.gamma1 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.gamma2 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.gamma3 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.apply(_init_weights)

    def selfatt(self, semantics: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv_proxy(semantics).chunk(3, dim=-1))
        return _attend(q, k, v, self.scale)

    def forward(
        self, x: torch.Tensor, H: int, W: int, semantics: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.num_heads
        semantics = semantics + self.drop_path(self.gamma1 * self.selfatt(semantics))

        q_sem = _split_heads(self.q_proxy(self.q_proxy_ln(semantics)), h)
        k_pix, v_pix = (_split_heads(t, h) for t in self.kv_proxy(x).chunk(2, dim=-1))
        semantics = semantics + self.drop_path(self.gamma2 * _attend(q_sem, k_pix, v_pix, self.scale))
        semantics = semantics + self.drop_path(self.gamma3 * self.mlp_proxy(self.p_ln(semantics)))

        k_sem, v_sem = (_split_heads(t, h) for t in self.kv(self.proxy_ln(semantics)).chunk(2, dim=-1))
        x = self.proj(_attend(_split_heads(self.q(x), h), k_sem, v_sem, self.scale))
        return x, semantics


class DWConv(nn.Module):
    """Depthwise 3×3 conv (bias) applied to (B, H·W, C) tokens laid out on their H×W grid."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, H, W))
        return x.flatten(2).transpose(1, 2)


class PVT2FFN(nn.Module):
    """PVTv2 feed-forward on tokens: fc1 -> DWConv 3×3 on the H×W grid -> GELU -> fc2."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class DualBlock(nn.Module):
    """Official DualViT block on (B, H·W, C) pixel tokens and (B, M, C) semantic tokens.

    ``_x, s = DualAttention(norm1(x), s)``; ``x += γ1·_x``; ``x += γ2·PVT2FFN(norm2(x))`` with hidden width
    ``int(dim * mlp_ratio)``; both residual branches through DropPath(``drop_path``). ``norm_layer`` builds
    ``norm1``/``norm2`` (the reference presets pass ``LayerNorm(eps=1e-6)``; the default here is the official
    signature's ``nn.LayerNorm``). ``forward(x, H, W, semantics) -> (x, semantics)``.

    At init γ1 = γ2 = 1e-6: the block returns ``x`` to ~1e-7 relative and ``semantics`` to ~1e-6.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
        norm_layer: Any = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm2 = norm_layer(dim)
        self.attn = DualAttention(dim, num_heads, drop_path=drop_path)
        self.mlp = PVT2FFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.gamma1 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.gamma2 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.apply(_init_weights)

    def forward(
        self, x: torch.Tensor, H: int, W: int, semantics: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn_out, semantics = self.attn(self.norm1(x), H, W, semantics)
        x = x + self.drop_path(self.gamma1 * attn_out)
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), H, W))
        return x, semantics


def _bin_matrix(n: int, g: int, like: torch.Tensor) -> torch.Tensor:
    """(g, n) averaging matrix of adaptive pooling: row i averages [floor(i·n/g), ceil((i+1)·n/g)).

    Built from tensor ops, so a traced/exported graph stays valid for other input sizes.
    """
    i = torch.arange(g, device=like.device)
    start = i * n // g
    end = ((i + 1) * n + g - 1) // g
    j = torch.arange(n, device=like.device)
    inside = (j[None] >= start[:, None]) & (j[None] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def grid_pool(x: torch.Tensor, g: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, g)`` of a B×C×H×W map as two averaging matmuls, defined for every H, W >= 1.

    Same bins as ``nn.AdaptiveAvgPool2d(g)``; at H = W = 7g they are the reference's ``AvgPool2d(7, 7)``.
    Matmuls rather than adaptive pooling because ONNX cannot export adaptive pooling whose output size does not
    divide the input (e.g. 20×15 -> 8×8).
    """
    H, W = x.shape[-2:]
    return _bin_matrix(H, g, x) @ x @ _bin_matrix(W, g, x).transpose(0, 1)


class SemanticInit(nn.Module):
    """Initial semantic tokens of DualViT stage 1 from a B×C×H×W map -> (B, g², C).

    As in the reference model (``q``, ``q_embed``, ``kv``, ``scale``, ``se``, ``proxy_ln``): the map is average-
    pooled to a grid of tokens ``p``; g² learnable queries ``q_embed(q)`` (LayerNorm -> Linear, shared by the batch)
    attend single-head, scale ``C**-0.5``, to ``kv(p)``; the result ``a`` and ``p`` are fused by an SE gate
    ``w = softmax_over_2(se(mean_M(a + p)))`` (se = Linear(C, C) -> ReLU -> Linear(C, 2C)) as
    ``w0·a + w1·p``; then ``proxy_ln`` (LayerNorm eps 1e-5).

    Adaptation: the reference pools with ``AvgPool2d(7, 7)`` (M = ⌊H/7⌋·⌊W/7⌋, so M depends on the input size, and
    it crashes below 7 px) and bicubically resizes its 8×8 queries when M != 64. Here the pool is an adaptive
    g×g average (``grid_pool``) with g² learnable queries, so M = g² for every H, W >= 1 (a map smaller than g
    repeats pixels across bins). Identical (to float round-off) to the reference at the design point H = W = 56,
    g = 8, where both pool 7×7 cells and the reference uses its 8×8 queries unresized.

    ``q`` starts trunc-normal(0.02), linears trunc-normal(0.02) with zero bias, LayerNorms 1/0.
    """

    def __init__(self, dim: int, grid: int = 8) -> None:
        super().__init__()
        self.grid = grid
        self.scale = dim**-0.5
        self.q = nn.Parameter(torch.empty(grid * grid, dim))
        self.q_embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.kv = nn.Linear(dim, 2 * dim)
        self.proxy_ln = nn.LayerNorm(dim)
        self.se = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 2 * dim))
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.q, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        pooled = grid_pool(x, self.grid).flatten(2).transpose(1, 2)  # B, M, C
        k, v = self.kv(pooled).chunk(2, dim=-1)
        attn = ((self.q_embed(self.q) @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # B, M, M
        attended = attn @ v
        gate = self.se((attended + pooled).mean(dim=1)).unflatten(-1, (2, C)).softmax(dim=1)  # B, 2, C
        return self.proxy_ln(attended * gate[:, :1] + pooled * gate[:, 1:])


def _reject(c1: int, hw: tuple[int, int] | None, name: str, value: Any) -> str | None:
    """Why ``name=value`` is impossible for a DualViT layer of ``c1`` channels (on an ``hw`` map), or None."""
    if name == "num_heads":
        if value is None:
            heads = c1 // HEAD_DIM
            if heads < 1 or c1 % heads:
                return (
                    f"num_heads=None means c1 // {HEAD_DIM} = {heads} heads, which does not divide c1; pass num_heads "
                    f"explicitly ({divisors_message(c1, _HEAD_CHOICES)})"
                )
            return None
        return divisor_of(c1, value, _HEAD_CHOICES, f"or None for c1 // {HEAD_DIM}")
    if name == "mlp_ratio":
        return width_ratio(c1, value, "FFN hidden width")
    if name == "semantic_grid":
        reason = positive_int(value, "g; the layer keeps g*g semantic tokens")
        if reason is None and hw is not None and value > min(hw):
            return (
                f"a {value}x{value} semantic grid on a {hw[0]}x{hw[1]} map repeats pixels across grid cells "
                f"(degenerate duplicate tokens); use semantic_grid <= {min(hw)}"
            )
        return reason
    if name == "depth":
        return positive_int(value, "number of DualBlocks")
    return None


class DualViT(nn.Module):
    """DualViT stage-1 unit as a YOLO layer: B×C×H×W -> B×C×H×W (C = ``c1``).

    Tokens ``x`` (B, H·W, C) and semantics ``s = SemanticInit(map)`` (B, g², C) pass through ``depth``
    :class:`DualBlock` s (block norms LayerNorm eps 1e-6, as the reference presets); ``stage_norm=True`` adds the
    reference stage norm ``norm1`` (LayerNorm eps 1e-6) on the output tokens. The semantic tokens stay inside
    the layer (the reference's ``norm_proxy1`` only feeds later stages and is omitted).

    Args:
        c1: input = output channels.
        num_heads: attention heads (must divide c1); None -> c1 // 32 (reference head_dim 32).
        mlp_ratio: FFN hidden width factor (reference 8 in the dual stages).
        semantic_grid: g; g² semantic tokens from an adaptive g×g average pool (reference: 8×8 queries and a
            7×7 pool, i.e. the same at 56×56). Works for any H, W >= 1; see :class:`SemanticInit`.
        depth: number of DualBlocks.
        stage_norm: apply the reference stage norm to the output. Off by default: a per-pixel LayerNorm of a YOLO
            feature map would replace the layer's identity start by a normalisation (the reference's stage input
            is already LayerNorm-ed by its stem, so there it is nearly the identity).

    Init: with ``stage_norm=False`` the layer is an identity to ~1e-7 relative (every block's γ1, γ2 = 1e-6).

    State-dict mapping from the reference ``DualViT`` model (stage 1, g = 8): ``q``, ``q_embed.*``, ``kv.*``,
    ``proxy_ln.*``, ``se.*`` -> ``init.*``; ``block1.{j}.*`` -> ``blocks.{j}.*``; ``norm1.*`` -> ``norm.*``
    (stage_norm=True); ``norm_proxy1.*`` is dropped; ``pool`` has no parameters.
    """

    def __init__(
        self,
        c1: int,
        num_heads: int | None = None,
        mlp_ratio: float = 8,
        semantic_grid: int = 8,
        depth: int = 1,
        stage_norm: bool = False,
    ) -> None:
        super().__init__()
        check_hparams(
            "DualViT",
            _reject,
            c1,
            None,
            {"num_heads": num_heads, "mlp_ratio": mlp_ratio, "semantic_grid": semantic_grid, "depth": depth},
        )
        if not isinstance(stage_norm, bool):
            raise ValueError(f"DualViT: stage_norm must be a bool, got {stage_norm!r}")
        heads = c1 // HEAD_DIM if num_heads is None else num_heads
        norm_layer = partial(nn.LayerNorm, eps=BLOCK_NORM_EPS)
        self.init = SemanticInit(c1, semantic_grid)
        self.blocks = nn.ModuleList(DualBlock(c1, heads, mlp_ratio, norm_layer=norm_layer) for _ in range(depth))
        self.norm = norm_layer(c1) if stage_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        semantics = self.init(x)
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens, semantics = block(tokens, H, W, semantics)
        return self.norm(tokens).transpose(1, 2).reshape(B, C, H, W)


SPEC = ModuleSpec(
    name="DualViT",
    layer=DualViT,
    hparams=(
        HParam("num_heads", (2, 4, 8), None, "attention heads, must divide c1; default None = c1 // 32 (head_dim 32)"),
        HParam("mlp_ratio", (4, 8), 8, "PVTv2 FFN hidden width factor (reference 8 in the dual stages)"),
        HParam(
            "semantic_grid",
            (2, 4, 8),
            8,
            "g: g*g semantic tokens (adaptive g×g pool; reference 8 = 7×7 pool at 56×56); at a known map "
            "size g <= min(h, w)",
        ),
        HParam("depth", (1, 2), 1, "number of DualBlocks sharing the semantic tokens"),
    ),
    reject=_reject,
    doc="Dual Vision Transformer stage-1 unit: semantic-token init + DualBlocks (pixel <-> semantic attention); "
    "identity to ~1e-7 at init.",
)
