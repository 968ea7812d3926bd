"""Shared helpers for the attention-layer tests."""

from __future__ import annotations

import torch
from torch import nn

# Channel counts YOLO layers have at P3/P4/P5 over the n…x scales of yolov8 and yolo11.
YOLO_CHANNELS = (64, 128, 192, 256, 320, 384, 512, 576, 640, 768)

# Feature-map sizes a YOLO layer meets: 256 px stride probe, 640 mosaic, 640x480 letterbox, 160 px proxy,
# Ultralytics' one-stride-tall FLOPs strips, and the degenerate 1x1.
YOLO_SIZES = (
    (32, 32), (16, 16), (8, 8),  # stride probe P3/P4/P5
    (80, 80), (40, 40), (20, 20),  # 640 mosaic
    (60, 80), (15, 20),  # 640x480 letterbox (P3, P5)
    (20, 20), (10, 10), (5, 5),  # 160 px proxy
    (1, 20), (1, 4), (1, 1),  # FLOPs strips and the smallest map
)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Give every parameter and BatchNorm running statistic random O(1) values.

    Several layers start as an identity or output exact zeros (zero-init BN, layer scales of 1e-6), which
    makes an unrandomised numerical comparison vacuous. Non-persistent buffers (fixed constants such as
    index tables) are left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def fitting_hparams(spec, c1: int, hw: tuple[int, int]) -> tuple[tuple[str, object], ...]:
    """Hyper-parameters for a layer of ``spec`` on an ``hw`` map: the default where the spec accepts it there,
    else its first accepted choice (e.g. a smaller semantic grid on a 2x2 map). Only non-defaults are listed, as
    sorted ``(name, value)`` pairs (the form of ``Placement.hparams``)."""
    fitting = {}
    for name, values in spec.choices_for(c1, hw).items():
        default = spec.hparam(name).default
        if spec.reject(c1, hw, name, default) is not None:
            assert values, f"{spec.name}: no {name} fits a {hw} map at c1={c1}"
            fitting[name] = values[0]
    return tuple(sorted(fitting.items()))
