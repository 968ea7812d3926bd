"""Latency of one candidate: the fused eval model, timed on a deployment runtime, paired with a reference network.

    from search.latency import LatencySettings, measure_latency, prepare_reference, study_reference_ms
    settings = LatencySettings(backend="onnxruntime", imgsz=(640, 384)); settings.check()
    ref = prepare_reference(base_candidate, settings)          # once per meter
    res = measure_latency(candidate, settings, proxy_imgsz=128, reference=ref)
    res.ratio, res.ci_low, res.ci_high, res.reference_ms         # candidate / base in the same window
    res.accepted, res.windows                                     # the acceptance rule's verdict, every raw run

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

import modules
from space import SpaceError, build_model, validated_model

from ..errors import SearchError
from .audit import cpu_snapshot, foreign_usage
from .backends import BACKENDS, Runner, backend_version, make_runner
from .memory import peak_memory_mb
from .paired import study_reference_ms, time_paired
from .window import DEFAULT_STATISTIC, STATISTICS, Acceptance, Window, aa_control, best_window, estimate

STRIDE = 32  # a YOLO input side must be a multiple of the largest stride
ESTIMATORS = ("paired", "table")

__all__ = ["BACKENDS", "ESTIMATORS", "STATISTICS", "Acceptance", "LatencyResult", "LatencySettings", "Reference",
           "Window", "device_model", "estimate", "insert_only", "measure_latency", "parse_imgsz", "peak_memory_mb",
           "paired_windows", "prepare_reference", "study_reference_ms", "time_model", "time_paired"]


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
    runs: int = 12  # most timed runs (with a reference: R C pairs)
    # CPU threads for the measurement; 0 = every core of the node. One by default: on a shared 2-core machine the
    # same pair's ratio moved by 5-7% between quiet windows with two threads and by 0.5-1.5% with one, and with one
    # foreign busy core a two-thread forward took 20x longer (bench/latency.py, README "Latency").
    threads: int = 1
    backend: str = "torch"  # "torch", "onnxruntime" or "tensorrt"
    half: bool = False  # fp16 (CUDA only)
    batch: int = 1
    min_runs: int = 6  # paired: stop after this many pairs once the ratio's 95% interval is within ±ci
    # Paired windows: the ratio's 95% interval must be within ±ci (it also ends a window early) and the window's
    # A/A control within aa_tolerance of 1, else the window is timed again later, ``tries`` windows in all
    # (search/latency/window.py). ci 0: every window runs all pairs and is accepted as it is.
    ci: float = 0.02
    statistic: str = DEFAULT_STATISTIC
    # "paired": every candidate timed against the base; "table": predicted from per-placement costs timed once per
    # machine and runtime and cached (search/latency/table.py)
    estimator: str = "paired"
    aa_tolerance: float = 0.03
    tries: int = 3

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
                                 ("threads", self.threads, 0), ("min-runs", self.min_runs, 1),
                                 ("tries", self.tries, 1)):
            if value < low:
                raise SearchError(f"--latency-{name} must be >= {low}, got {value}")
        if not 0 <= self.ci < 1:
            raise SearchError(f"latency ci must be in [0, 1), got {self.ci}")
        if not 0 < self.aa_tolerance < 1:
            raise SearchError(f"--latency-aa-tolerance must be in (0, 1), got {self.aa_tolerance}")
        if self.estimator not in ESTIMATORS:
            raise SearchError(f"--latency-estimator {self.estimator!r}: choose one of {', '.join(ESTIMATORS)}")
        if self.statistic not in STATISTICS:
            raise SearchError(f"--latency-statistic {self.statistic!r}: choose one of {', '.join(STATISTICS)}")
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

    def acceptance(self) -> Acceptance:
        """The rule a paired window must pass (search/latency/window.py)."""
        return Acceptance(max_half_width=self.ci or 0.999, aa_tolerance=self.aa_tolerance, tries=self.tries,
                          check=self.ci > 0)

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
    ratio: float | None = None  # candidate / reference by settings.statistic (None without a reference)
    ci_low: float | None = None
    ci_high: float | None = None
    ci_level: float | None = None  # the interval's coverage
    reference_ms: float | None = None  # the reference's median in the recorded window
    aa: float | None = None  # the recorded window's A/A control (1 in a quiet window)
    accepted: bool = True  # False: no window passed settings.acceptance(); the ratio is the narrowest window's
    rejected: list[str] = field(default_factory=list)  # why the recorded window was not accepted
    foreign_cpu_s: float | None = None  # CPU used by other processes during the recorded window's timed runs
    windows: list[dict] = field(default_factory=list)  # every window's raw runs and verdict (Window.as_dict)
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
        model = build_model(candidate_or_model).model
        name = candidate_or_model.describe()
    params = sum(p.numel() for p in model.parameters())
    run = _runnable(_fused(model), settings)
    run()  # the export/session/engine and first-run costs are paid here, once
    return Reference(run, name, params)


def time_model(model, settings: LatencySettings, reference: Reference | None = None,
               exclusive: Callable[[], ContextManager[list[str]]] | None = None,
               clock: Callable[[], float] = time.perf_counter, *, insert_only: bool = False,
               sleep: Callable[[float], None] = time.sleep) -> LatencyResult:
    """Time an eval-mode ``model`` (fused here) on ``settings.backend``; ``exclusive`` is entered only around the
    warm-up and timed runs and yields the trainings that failed to pause.

    With a ``reference``, paired windows are timed until one passes ``settings.acceptance()`` (``insert_only``: a
    candidate that only adds layers must not time faster than the reference), ``settings.tries`` windows at most
    with a backoff between them (``sleep``); ``clock`` and ``sleep`` are injectable for synthetic-time tests."""
    import numpy as np

    start = clock()
    params = sum(p.numel() for p in model.parameters())
    model = _fused(model)
    peak = _peak_memory(model, settings)
    run = _runnable(model, settings)
    run()  # one-time costs (allocations, kernel selection, ONNX session start) need no exclusive device
    if reference is None:
        with (exclusive() if exclusive else contextlib.nullcontext([])) as contended:
            held = clock()
            for _ in range(settings.warmup):
                run()
            # A plain loop of single, synchronised runs: torch.utils.benchmark's blocked_autorange picks its own
            # sample count and batches runs into blocks, but the median and p90 need each run's own time.
            times = []
            for _ in range(settings.runs):
                t0 = clock()
                run()
                times.append((clock() - t0) * 1000)
            exclusive_s = clock() - held
        contended = list(contended or [])
        chosen = None
    else:
        windows = paired_windows(run, reference.run, settings, exclusive, clock, sleep, insert_only)
        exclusive_s = sum(w.seconds for w in windows)
        contended = sorted({t for w in windows for t in w.contended})
        chosen = best_window(windows)
        times = chosen.candidate_ms
    q25, q50, q75, q90 = (float(v) for v in np.percentile(times, [25, 50, 75, 90]))
    result = LatencyResult(median_ms=q50, p90_ms=q90, iqr_ms=q75 - q25, min_ms=min(times), n=len(times),
                           params=params, threads=_threads(settings), exclusive_s=exclusive_s,
                           contended=contended, backend=settings.backend, peak_mem_mb=peak)
    if chosen is not None:
        result.ratio, result.ci_low, result.ci_high, result.ci_level = chosen.ratio, chosen.ci_low, chosen.ci_high, 0.95
        result.reference_ms = float(np.median(chosen.reference_ms))
        result.aa, result.accepted, result.rejected = chosen.aa, chosen.accepted, list(chosen.rejected)
        result.foreign_cpu_s = chosen.foreign_cpu_s
        result.windows = [w.as_dict() for w in windows]
    result.measure_s = clock() - start
    return result


def paired_windows(run: Runner, run_reference: Runner, settings: LatencySettings,
                   exclusive: Callable[[], ContextManager[list[str]]] | None = None,
                   clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
                   insert_only: bool = False) -> list[Window]:
    """Paired windows until one passes ``settings.acceptance()``, at most ``settings.tries``, with the acceptance
    rule's backoff between them (trainings run meanwhile; the next window may be quieter)."""
    acceptance = settings.acceptance()
    windows: list[Window] = []
    for attempt in range(acceptance.tries):
        if attempt:
            sleep(acceptance.backoff(attempt - 1))
        window = _paired_window(run, run_reference, settings, exclusive, clock)
        window.rejected = acceptance.reasons(window, insert_only)
        windows.append(window)
        if window.accepted:
            break
    return windows


def _paired_window(run: Runner, run_reference: Runner, settings: LatencySettings,
                   exclusive: Callable[[], ContextManager[list[str]]] | None,
                   clock: Callable[[], float]) -> Window:
    """One exclusive window of R C R C ... R runs, with the CPU other processes used during its timed runs."""
    with (exclusive() if exclusive else contextlib.nullcontext([])) as contended:
        held = clock()
        for _ in range(settings.warmup):
            run_reference()  # its caches went cold while trainings ran
            run()
        before, wall = cpu_snapshot(), time.time()
        ref_ms, cand_ms = time_paired(run_reference, run, min_pairs=min(settings.min_runs, settings.runs),
                                      max_pairs=settings.runs, rel_half_width=settings.ci,
                                      statistic=settings.statistic, clock=clock)
        after = cpu_snapshot()
        seconds = clock() - held
    usage = foreign_usage(before, after)
    est = estimate(ref_ms, cand_ms, settings.statistic)
    return Window(ref_ms, cand_ms, started=round(wall, 3), seconds=round(seconds, 4), contended=list(contended or []),
                  foreign_cpu_s=usage.seconds, foreign=[list(u) for u in usage.top], ratio=est.ratio,
                  ci_low=est.ci_low, ci_high=est.ci_high, aa=aa_control(ref_ms, settings.statistic))


def insert_only(candidate) -> bool:
    """Whether a space Candidate only adds layers to its base (so it cannot be faster than the base)."""
    placements = getattr(candidate, "placements", ())
    return bool(placements) and all(p.mode == "insert" for p in placements)


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
                    reference: Reference | None = None,
                    table: Callable[[object], dict] | None = None) -> LatencyResult:
    """Validate ``candidate`` (space.validated_model: builds, finite forward at ``proxy_imgsz``, params, GFLOPs at
    the latency size), then time it with :func:`time_model`, paired with ``reference`` when given; with ``table``
    (search/latency/table.py ``predicted``, bound to a table) its ratio is predicted instead of timed."""
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
    if table is not None:
        result = _predicted(model, settings, table(candidate))
    else:
        result = time_model(model, settings, reference, exclusive, insert_only=insert_only(candidate))
    result.gflops = gflops
    result.measure_s = time.perf_counter() - start
    return result


def _predicted(model, settings: LatencySettings, prediction: dict) -> LatencyResult:
    """A LatencyResult from a table prediction (search/latency/table.py): the ratio and interval predicted, the
    own median as that ratio times the table's reference time, the windows of the placements timed for it."""
    result = LatencyResult(params=sum(p.numel() for p in model.parameters()), threads=_threads(settings),
                           backend=settings.backend, peak_mem_mb=_peak_memory(_fused(model), settings))
    if prediction.get("error"):
        result.error = prediction["error"]
        return result
    result.ratio, result.ci_low, result.ci_high = prediction["ratio"], prediction["ci_low"], prediction["ci_high"]
    result.ci_level, result.accepted, result.windows = 0.95, prediction["accepted"], prediction["windows"]
    result.reference_ms = prediction.get("reference_ms")
    if result.reference_ms:
        result.median_ms = result.ratio * result.reference_ms
    result.n = sum(len(w["candidate_ms"]) for w in result.windows)
    result.exclusive_s = sum(w["seconds"] for w in result.windows)
    if not result.accepted:
        result.rejected = ["a placement's cost was timed in no accepted window"]
    return result


def _gflops_hw(model, h: int, w: int) -> float:
    """GFLOPs of one forward at a rectangular ``h`` x ``w`` (space.count_gflops counts squares only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, h, w))
    return counter.get_total_flops() / 1e9
