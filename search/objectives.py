"""The objectives a study optimises, as one table: name, direction, where the value comes from, how it prints.

Everything that handles a trial's values (the study's directions and metric names, the tell, reuse, the progress
bar, the Pareto files, the hypervolume, the plots, the summary) iterates over :data:`OBJECTIVES` entries chosen with
``--objectives``; nothing indexes ``values[0]``. Adding an objective is one row here (plus, if it needs a new
measurement, a field on :class:`~search.training.proxy.TrainResult` or :class:`~search.latency.LatencyResult`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import SearchError

if TYPE_CHECKING:  # types only: latency and training import torch, and they import this table
    from .latency import LatencyResult
    from .training.proxy import TrainResult


@dataclass(frozen=True)
class Objective:
    """One optimised quantity. ``needs_training`` objectives come from the proxy training (``from_train``); the
    others from the latency meter's measurement (``from_latency``), known before training, so infeasible
    candidates still get them. ``floor`` is the worst value a maximised objective can take (the hypervolume's
    reference and what an untrained, infeasible candidate is told)."""

    name: str
    direction: str  # "maximize" or "minimize"
    unit: str
    fmt: str  # format spec of one value, e.g. ".4f"
    doc: str
    from_train: Callable[["TrainResult"], float | None] | None = None
    from_latency: Callable[["LatencyResult"], float | None] | None = None
    floor: float = 0.0

    @property
    def needs_training(self) -> bool:
        return self.from_train is not None

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def show(self, value: float | None) -> str:
        return "-" if value is None else f"{value:{self.fmt}}"

    def label(self) -> str:
        return f"{self.name} ({self.unit}, {'higher' if self.maximize else 'lower'} is better)"


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("mAP50-95", "maximize", "mAP", ".4f", "box mAP50-95 of the proxy training's final validation",
              from_train=lambda r: r.map50_95),
    Objective("mAP50", "maximize", "mAP", ".4f", "box mAP50 of the proxy training's final validation",
              from_train=lambda r: r.map50),
    Objective("latency_ms", "minimize", "ms", ".2f", "inference latency: the paired ratio to the base times the "
              "study's reference latency (search/latency)",
              from_latency=lambda r: r.latency_ms if r.latency_ms is not None else r.median_ms),
    Objective("params", "minimize", "parameters", ".0f", "parameter count of the fused model",
              from_latency=lambda r: None if r.params is None else float(r.params)),
    Objective("gflops", "minimize", "GFLOPs", ".3f", "GFLOPs of one forward at the latency size",
              from_latency=lambda r: r.gflops),
    Objective("peak_mem_mb", "minimize", "MB", ".1f", "inference peak memory at the latency size (meter)",
              from_latency=lambda r: r.peak_mem_mb),
)}
DEFAULT = ("mAP50-95", "latency_ms")


def parse(names: str | Sequence[str]) -> tuple[Objective, ...]:
    """``"mAP50-95,latency_ms,params"`` (or a sequence of names) -> the table's entries, in that order."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in items if n not in OBJECTIVES]
    if unknown:
        raise SearchError(f"--objectives: unknown objective(s) {', '.join(unknown)}; choose 2-4 of "
                          f"{', '.join(OBJECTIVES)}")
    if len(set(items)) != len(items):
        raise SearchError(f"--objectives: {','.join(items)} names an objective twice")
    if not 2 <= len(items) <= 4:
        raise SearchError(f"--objectives: choose 2-4 objectives, got {len(items)} ({','.join(items) or 'none'})")
    chosen = tuple(OBJECTIVES[n] for n in items)
    if not any(o.needs_training for o in chosen):
        raise SearchError(f"--objectives: {','.join(items)} needs no training; include mAP50-95 or mAP50")
    return chosen


def names(objectives: Sequence[Objective]) -> list[str]:
    return [o.name for o in objectives]


def directions(objectives: Sequence[Objective]) -> list[str]:
    return [o.direction for o in objectives]


def values(objectives: Sequence[Objective], latency: "LatencyResult", train: "TrainResult | None") -> list[float]:
    """The values to tell Optuna. ``train`` None: the candidate was not trained (infeasible): training objectives
    get their floor, so it never enters a front."""
    out = []
    for o in objectives:
        if o.needs_training:
            value = o.from_train(train) if train is not None else o.floor
        else:
            value = o.from_latency(latency)
        if value is None:
            raise SearchError(f"objective {o.name}: no value was measured ({o.doc})")
        out.append(float(value))
    return out


def sort_key(objectives: Sequence[Objective]) -> Callable[[Any], float]:
    """How fronts are listed: by the first minimised objective (latency by default), ascending; else by the
    first objective, best first."""
    i = next((k for k, o in enumerate(objectives) if not o.maximize), 0)
    sign = -1.0 if objectives[i].maximize else 1.0
    return lambda t: sign * t.values[i]


def reference_point(objectives: Sequence[Objective], points: Sequence[Sequence[float]]) -> list[float]:
    """Hypervolume reference: a maximised objective's floor (mAP 0), 10 % beyond the worst value of a minimised one."""
    ref = []
    for i, o in enumerate(objectives):
        if o.maximize:
            ref.append(o.floor)
        else:
            ref.append(float(max((p[i] for p in points), default=1.0)) * 1.1)
    return ref
