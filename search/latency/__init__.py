"""Latency of one candidate: the fused eval model, timed on a deployment runtime, paired with a reference network.

    from search.latency import LatencySettings, measure_latency, prepare_reference, study_reference_ms
    settings = LatencySettings(backend="onnxruntime", imgsz=(640, 384)); settings.check()
    ref = prepare_reference(base_candidate, settings)          # once per meter
    res = measure_latency(candidate, settings, proxy_imgsz=128, reference=ref)
    res.ratio, res.ci_low, res.ci_high, res.reference_ms         # candidate / base in the same window

Without a reference the candidate is timed alone (warm-up, then ``runs`` single runs; the median) as before.
``python -m search.latency MODEL.yaml|MODEL.pt`` runs the same protocol on any model.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager

from ..errors import SearchError
from .backends import BACKENDS, Runner, backend_version, make_runner
from .memory import peak_memory_mb
from .paired import PairedRatio, median_ci, pair_ratios, paired_ratio, study_reference_ms, time_paired

STRIDE = 32  # a YOLO input side must be a multiple of the largest stride

__all__ = ["BACKENDS", "LatencyResult", "LatencySettings", "PairedRatio", "Reference", "device_model",
           "measure_latency", "median_ci", "pair_ratios", "paired_ratio", "parse_imgsz", "peak_memory_mb",
           "prepare_reference", "study_reference_ms", "time_model", "time_paired"]


def parse_imgsz(text: str | int) -> int | tuple[int, int]:
    """``"640"`` -> 640, ``"640,384"`` -> (640, 384) as (height, width), Ultralytics' order; each a multiple of 32."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise SearchError(f"--latency-imgsz {text!r}: expected SIZE or HEIGHT,WIDTH in pixels, e.g. 640 or 640,384") from None
    if len(sides) not in (1, 2) or any(s < STRIDE or s % STRIDE for s in sides):
        raise SearchError(f"--latency-imgsz {text!r}: one or two sides, each a multiple of {STRIDE} (e.g. 640,384)")
    return sides[0] if len(sides) == 1 or sides[0] == sides[1] else (sides[0], sides[1])


def device_model(device: str) -> str:
    """The processor that runs the timing: the GPU's name, or the CPU model from /proc/cpuinfo."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured; part of a study's identity (latencies from other settings do not compare)."""

    device: str = "cpu"  # "cpu" or "cuda"
    imgsz: int | tuple[int, int] = 640  # side, or (height, width)
    warmup: int = 1  # untimed runs in the exclusive window (one more runs before it, for one-time costs)
    runs: int = 8  # most timed runs (with a reference: R C pairs)
    threads: int = 0  # CPU threads for the measurement; 0 = every core of the node
    backend: str = "torch"  # "torch", "onnxruntime" or "tensorrt"
    half: bool = False  # fp16 (CUDA only)
    batch: int = 1
    min_runs: int = 6  # paired: stop after this many pairs once the ratio's 95% interval is within ±ci
    ci: float = 0.01  # relative half-width of the ratio's interval that ends a paired measurement; 0 = all runs

    def __post_init__(self) -> None:
        if isinstance(self.imgsz, (list, tuple)):
            h, w = (int(s) for s in self.imgsz)
            object.__setattr__(self, "imgsz", h if h == w else (h, w))

    @property
    def hw(self) -> tuple[int, int]:
        return (self.imgsz, self.imgsz) if isinstance(self.imgsz, int) else self.imgsz

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 3, *self.hw)

    def as_dict(self) -> dict:
        d = asdict(self)
        if isinstance(self.imgsz, tuple):
            d["imgsz"] = list(self.imgsz)  # as JSON stores it, so a resumed study compares equal
        return d

    def check(self, gpu_available: bool | None = None) -> None:
        """Raise a one-line SearchError for settings that cannot run here (``gpu_available``: default, torch's)."""
        import importlib.util

        if self.backend not in BACKENDS:
            raise SearchError(f"--latency-backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.device not in ("cpu", "cuda"):
            raise SearchError(f"--latency-device {self.device!r}: choose cpu or cuda")
        if gpu_available is None:
            import torch

            gpu_available = torch.cuda.is_available()
        for name, value, low in (("batch", self.batch, 1), ("warmup", self.warmup, 0), ("runs", self.runs, 1),
                                 ("threads", self.threads, 0), ("min-runs", self.min_runs, 1)):
            if value < low:
                raise SearchError(f"--latency-{name} must be >= {low}, got {value}")
        if not 0 <= self.ci < 1:
            raise SearchError(f"latency ci must be in [0, 1), got {self.ci}")
        if any(s < STRIDE or s % STRIDE for s in self.hw):
            raise SearchError(f"--latency-imgsz {self.imgsz}: each side must be a multiple of {STRIDE}")
        if self.backend == "tensorrt":
            if importlib.util.find_spec("tensorrt") is None:
                raise SearchError("--latency-backend tensorrt needs the tensorrt package (pip install tensorrt) and "
                                  "a CUDA GPU; use torch or onnxruntime here")
            if not gpu_available:
                raise SearchError("--latency-backend tensorrt needs a CUDA GPU and none is visible; "
                                  "use torch or onnxruntime here")
            if self.device != "cuda":
                raise SearchError("--latency-backend tensorrt runs on the GPU: add --latency-device cuda")
        if self.device == "cuda" and not gpu_available:
            raise SearchError("--latency-device cuda but no CUDA GPU is visible; use --latency-device cpu")
        if self.half and self.device != "cuda":
            raise SearchError("--latency-half needs --latency-device cuda (fp16 inference is not timed on CPU)")
        if self.backend == "onnxruntime":
            if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
                raise SearchError("--latency-backend onnxruntime needs the onnx and onnxruntime packages "
                                  "(pip install -e .)")
            if self.device == "cuda":
                import onnxruntime

                if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                    raise SearchError("--latency-backend onnxruntime --latency-device cuda needs onnxruntime-gpu "
                                      "(this onnxruntime has no CUDAExecutionProvider)")

    def identity(self) -> dict:
        """The settings plus what else decides the numbers: the runtime's version and the processor's model.
        Call it where the timing runs (the meter's node: ``Executor.latency_identity()``)."""
        return {**self.as_dict(), "backend_version": backend_version(self.backend),
                "device_model": device_model(self.device)}


@dataclass
class LatencyResult:
    """Measured latency of one candidate, paired with the reference when there is one, its size and memory."""

    median_ms: float | None = None  # the candidate's own median of its timed runs
    p90_ms: float | None = None
    iqr_ms: float | None = None
    min_ms: float | None = None
    n: int = 0  # timed runs of the candidate (= pairs when paired)
    params: int | None = None
    gflops: float | None = None  # per image, at the latency size
    threads: int | None = None
    measure_s: float = 0.0  # the whole call: build, validation, export, timing
    exclusive_s: float = 0.0  # seconds the device was held exclusively (trainings parked)
    contended: list[str] = field(default_factory=list)  # trainings that did not pause in time (then not isolated)
    error: str | None = None
    ratio: float | None = None  # candidate / reference: median of per-pair ratios (None without a reference)
    ci_low: float | None = None
    ci_high: float | None = None
    ci_level: float | None = None  # the interval's exact coverage
    reference_ms: float | None = None  # the reference's median in this window
    backend: str = "torch"
    peak_mem_mb: float | None = None  # peak memory of tensors created by one torch forward at the latency size
    # The latency objective, set by the search: ratio x the study's reference latency (search/driver.py); the
    # candidate's own median when it was timed alone.
    latency_ms: float | None = None

    def objective_ms(self, study_reference_ms: float) -> float:
        """The latency objective: the paired ratio scaled to the study's reference latency."""
        if self.ratio is None:
            raise ValueError("this measurement has no reference, so no ratio")
        return self.ratio * study_reference_ms


@dataclass
class Reference:
    """The fixed network every candidate is timed against, prepared once (built, fused, exported, warm)."""

    run: Runner
    name: str
    params: int


def _fused(model):
    """Conv+BN fused, as deployed (Ultralytics models fuse themselves; other modules are timed as they are)."""
    return model.fuse(verbose=False).eval() if hasattr(model, "fuse") else model.eval()


def _runnable(model, settings: LatencySettings) -> Runner:
    import torch

    torch.set_num_threads(_threads(settings))
    return make_runner(model.eval(), settings.backend, settings.device, settings.shape, settings.half,
                       _threads(settings))


def _threads(settings: LatencySettings) -> int:
    return settings.threads or len(os.sched_getaffinity(0))


def prepare_reference(candidate_or_model, settings: LatencySettings, name: str = "base") -> Reference:
    """The reference for paired timing: a space Candidate (usually the base) or an nn.Module."""
    model = candidate_or_model
    if not hasattr(model, "forward"):
        from space import build_model

        model = build_model(candidate_or_model).model
        name = candidate_or_model.describe()
    params = sum(p.numel() for p in model.parameters())
    run = _runnable(_fused(model), settings)
    run()  # the export/session/engine and first-run costs are paid here, once
    return Reference(run, name, params)


def time_model(model, settings: LatencySettings, reference: Reference | None = None,
               exclusive: Callable[[], ContextManager[list[str]]] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> LatencyResult:
    """Time an eval-mode ``model`` (fused here) on ``settings.backend``; ``exclusive`` is entered only around the
    warm-up and timed runs and yields the trainings that failed to pause."""
    import numpy as np

    start = clock()
    params = sum(p.numel() for p in model.parameters())
    model = _fused(model)
    peak = _peak_memory(model, settings)
    run = _runnable(model, settings)
    run()  # one-time costs (allocations, kernel selection, ONNX session start) need no exclusive device
    paired: PairedRatio | None = None
    ref_times: list[float] = []
    with (exclusive() if exclusive else contextlib.nullcontext([])) as contended:
        held = clock()
        for _ in range(settings.warmup):
            if reference is not None:
                reference.run()  # its caches went cold while trainings ran
            run()
        if reference is not None:
            ref_times, times = time_paired(reference.run, run, min_pairs=min(settings.min_runs, settings.runs),
                                           max_pairs=settings.runs, rel_half_width=settings.ci, clock=clock)
            paired = paired_ratio(ref_times, times)
        else:
            # A plain loop of single, synchronised runs: torch.utils.benchmark's blocked_autorange picks its own
            # sample count and batches runs into blocks, but the median and p90 need each run's own time.
            times = []
            for _ in range(settings.runs):
                t0 = clock()
                run()
                times.append((clock() - t0) * 1000)
        exclusive_s = clock() - held
    q25, q50, q75, q90 = (float(v) for v in np.percentile(times, [25, 50, 75, 90]))
    result = LatencyResult(median_ms=q50, p90_ms=q90, iqr_ms=q75 - q25, min_ms=min(times), n=len(times),
                           params=params, threads=_threads(settings), exclusive_s=exclusive_s,
                           contended=list(contended or []), backend=settings.backend, peak_mem_mb=peak)
    if paired is not None:
        result.ratio, result.ci_low, result.ci_high = paired.ratio, paired.ci_low, paired.ci_high
        result.ci_level, result.reference_ms = paired.confidence, float(np.median(ref_times))
    result.measure_s = clock() - start
    return result


def _peak_memory(model, settings: LatencySettings) -> float:
    """Peak tensor memory of one torch forward at the latency shape (before the backend takes the model)."""
    import torch

    dev = "cuda" if settings.device == "cuda" else "cpu"
    dtype = torch.float16 if settings.half else torch.float32
    model = model.to(dev).to(dtype).eval()
    x = torch.zeros(settings.shape, device=dev, dtype=dtype)
    with torch.inference_mode():
        return round(peak_memory_mb(lambda: model(x), dev), 2)


def measure_latency(candidate, settings: LatencySettings, proxy_imgsz: int,
                    exclusive: Callable[[], ContextManager[list[str]]] | None = None,
                    reference: Reference | None = None) -> LatencyResult:
    """Validate ``candidate`` (space.validated_model: builds, finite forward at ``proxy_imgsz``, params, GFLOPs at
    the latency size), then time it with :func:`time_model`, paired with ``reference`` when given."""
    import modules
    from space import SpaceError, validated_model

    modules.register()
    start = time.perf_counter()
    import torch

    torch.set_num_threads(_threads(settings))
    h, w = settings.hw
    try:
        model, stats = validated_model(candidate, imgsz=proxy_imgsz, flops_imgsz=h if h == w else proxy_imgsz)
    except SpaceError as err:
        return LatencyResult(error=f"invalid candidate: {err}", measure_s=time.perf_counter() - start)
    except Exception as err:  # space.validated_model wraps only ValueError; Ultralytics' parser also raises TypeError etc.
        return LatencyResult(error=f"invalid candidate: does not build: {type(err).__name__}: {err}",
                             measure_s=time.perf_counter() - start)
    gflops = stats.gflops if h == w else _gflops_hw(model, h, w)
    result = time_model(model, settings, reference, exclusive)
    result.gflops = gflops
    result.measure_s = time.perf_counter() - start
    return result


def _gflops_hw(model, h: int, w: int) -> float:
    """GFLOPs of one forward at a rectangular ``h`` x ``w`` (space.count_gflops counts squares only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, h, w))
    return counter.get_total_flops() / 1e9
