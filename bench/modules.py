"""Benchmark the five attention layers at yolov8n's P3/P4/P5 sizes for a 640 px input.

    python bench/modules.py [--device cpu|cuda] [--runs 20] [--threads N]

Per layer (default arguments) and feature size: parameters, GFLOPs (torch FlopCounterMode, 2 x MACs),
forward latency (eval, batch 1, fp32; median and p90 of --runs after warm-up, torch.utils.benchmark) and peak
memory of one forward. The baseline measured in the same run is Ultralytics' own attention block
(``PSABlock``, the attention of YOLO11's C2PSA) at the same width; the table prints each layer's time as a
ratio to it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import modules  # noqa: E402
from search.latency.memory import peak_memory_mb  # noqa: E402

SIZES = ((64, 80), (128, 40), (256, 20))  # (channels, map side) of yolov8n P3/P4/P5 at 640 px


def baseline(c: int) -> torch.nn.Module:
    from ultralytics.nn.modules.block import PSABlock

    return PSABlock(c, attn_ratio=0.5, num_heads=max(1, c // 64))


def measure(layer: torch.nn.Module, c: int, side: int, device: str, runs: int) -> dict:
    layer = layer.to(device).eval()
    x = torch.randn(1, c, side, side, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        layer(x)
    sync = "torch.cuda.synchronize()" if device == "cuda" else ""

    def forward():
        with torch.no_grad():
            layer(x)

    for _ in range(3):
        forward()
    timer = benchmark.Timer(stmt=f"forward(); {sync}", globals={"forward": forward, "torch": torch})
    samples = sorted(timer.timeit(1).median for _ in range(runs))  # one forward per sample, for a spread
    return {
        "params": sum(p.numel() for p in layer.parameters()),
        "gflops": counter.get_total_flops() / 1e9,
        "ms": 1e3 * samples[len(samples) // 2],
        "p90": 1e3 * samples[int(0.9 * (len(samples) - 1))],
        "peak_mb": peak_memory_mb(forward, device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=20, help="timed forwards per row (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"device={args.device} threads={args.threads} torch={torch.__version__} runs={args.runs}")
    header = f"{'layer':<9}{'C':>5}{'HxW':>8}{'params':>11}{'GFLOPs':>9}{'ms':>9}{'p90 ms':>9}{'peak MB':>9}{'x base':>8}"
    print(header)
    print("-" * len(header))
    for c, side in SIZES:
        base = measure(baseline(c), c, side, args.device, args.runs)
        rows = [("PSABlock", base)]
        for name, spec in modules.specs().items():
            rows.append((name, measure(spec.layer(c), c, side, args.device, args.runs)))
        for name, r in rows:
            print(f"{name:<9}{c:>5}{f'{side}x{side}':>8}{r['params']:>11,}{r['gflops']:>9.3f}{r['ms']:>9.2f}"
                  f"{r['p90']:>9.2f}{r['peak_mb']:>9.1f}{r['ms'] / base['ms']:>8.2f}")


if __name__ == "__main__":
    main()
