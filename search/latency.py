"""Latency of one candidate: fused eval model, batch 1, warm-up then N timed forwards on one device."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured; part of a study's identity (latencies from other settings do not compare)."""

    device: str = "cpu"  # "cpu" or "cuda"
    imgsz: int = 640
    warmup: int = 3
    runs: int = 15
    threads: int = 0  # CPU threads for the measurement; 0 = every core of the node

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LatencyResult:
    """Measured latency (ms) with its spread, the model's size, and any contention or error."""

    median_ms: float | None = None
    p90_ms: float | None = None
    iqr_ms: float | None = None
    min_ms: float | None = None
    n: int = 0
    params: int | None = None
    gflops: float | None = None
    threads: int | None = None
    measure_s: float = 0.0
    contended: list[str] = field(default_factory=list)  # trainings that did not pause in time (then not isolated)
    error: str | None = None


def measure_latency(candidate, settings: LatencySettings, proxy_imgsz: int,
                    exclusive: Callable[[], ContextManager[list[str]]] | None = None) -> LatencyResult:
    """Validate ``candidate`` (space.validated_model: builds, finite forward, params, GFLOPs at the latency size), then
    time it. ``exclusive`` is entered only around the timed loop; it yields the trainings that failed to pause."""
    import numpy as np
    import torch

    import modules
    from space import SpaceError, validated_model

    modules.register()
    start = time.perf_counter()
    threads = settings.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    try:
        model, stats = validated_model(candidate, imgsz=proxy_imgsz, flops_imgsz=settings.imgsz)
    except SpaceError as err:
        return LatencyResult(error=f"invalid candidate: {err}", measure_s=time.perf_counter() - start)
    except Exception as err:  # space.validated_model wraps only ValueError; Ultralytics' parser also raises TypeError etc.
        return LatencyResult(error=f"invalid candidate: does not build: {type(err).__name__}: {err}",
                             measure_s=time.perf_counter() - start)
    device = torch.device("cuda:0" if settings.device == "cuda" else "cpu")
    model = model.fuse(verbose=False).eval().to(device)
    x = torch.zeros(1, 3, settings.imgsz, settings.imgsz, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    with torch.inference_mode():
        with (exclusive() if exclusive else contextlib.nullcontext([])) as contended:
            for _ in range(settings.warmup):
                model(x)
            sync()
            # A plain loop of single, synchronised runs: torch.utils.benchmark's blocked_autorange picks its own
            # sample count and batches runs into blocks, but the median and p90 need each run's own time.
            for _ in range(settings.runs):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append((time.perf_counter() - t0) * 1000)
    q25, q50, q75, q90 = (float(v) for v in np.percentile(times, [25, 50, 75, 90]))
    return LatencyResult(median_ms=q50, p90_ms=q90, iqr_ms=q75 - q25, min_ms=min(times),
                         n=len(times), params=stats.params, gflops=stats.gflops, threads=threads,
                         measure_s=time.perf_counter() - start, contended=list(contended or []))

