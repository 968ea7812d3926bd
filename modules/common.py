"""Small building blocks shared by several attention families."""

from __future__ import annotations

import torch
from torch import nn


GATE_EPS = 1e-5  # a gate holds its branch shut when every value is at most this in magnitude


def residual_gates(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that keep ``module``'s residual branches shut at initialisation, as the papers start them:
    normalisation weights and layer scales (``gamma*``) whose every value is within ``GATE_EPS`` of zero (CGA's and
    CoT's zero-initialised BN weights, DualViT's 1e-6 layer scales). Found by value, so call it on a fresh layer;
    STA and GMA have none (they start as small non-zero branches)."""
    gates = []
    for _, sub in module.named_modules():
        for pname, param in sub.named_parameters(recurse=False):
            norm_weight = pname == "weight" and isinstance(sub, (nn.modules.batchnorm._NormBase, nn.LayerNorm,
                                                                 nn.GroupNorm))
            if (norm_weight or pname.startswith("gamma")) and param.detach().abs().max() <= GATE_EPS:
                gates.append(param)
    return gates


class DropPath(nn.Module):
    """Per-sample stochastic depth: zeroes whole residual branches, rescales kept ones by 1/keep (identity in
    eval mode or when ``drop_prob`` is 0)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep
