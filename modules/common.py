"""Small building blocks shared by several attention families."""

from __future__ import annotations

import torch
from torch import nn


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
