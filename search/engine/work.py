"""What the driver hands work to: the :class:`WorkPool` interface, its :class:`Event`, and :class:`InProcessPool`.

The driver only submits latency measurements and trainings and polls for finished ones, so any pool with these
four methods runs a search: :class:`search.engine.executor.Executor` on Ray (the real one), or :class:`InProcessPool`,
which runs the same real functions synchronously in this process (driver tests and debugging, no Ray).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..latency import LatencySettings, Reference, measure_latency, prepare_reference
from ..training.proxy import TrainJob, run_training


@dataclass
class Event:
    """A finished piece of work: ``kind`` is "latency" (``result`` a LatencyResult), "train" or "base" (a
    TrainResult), or "retry" (a worker died and its training was submitted again)."""

    key: Any
    kind: str
    result: Any
    info: dict = field(default_factory=dict)


class WorkPool(Protocol):
    """Where the driver's work runs. ``workers`` trainings may run at once."""

    workers: int

    def submit_latency(self, key: Any, candidate, proxy_imgsz: int) -> None: ...

    def submit_train(self, key: Any, job: TrainJob, kind: str = "train") -> None: ...

    def wait(self, timeout_s: float) -> list[Event]: ...

    def checkpoint(self) -> None:
        """Called by the driver between two pieces of its own work (a latency window may need the CPU)."""

    def cancel(self, key: Any) -> None: ...

    def cancel_all(self) -> list[Any]: ...


class InProcessPool:
    """Runs each submitted piece of work in this process, one per :meth:`wait`, in submission order.

    The functions are the real ones (``measure_latency``, ``run_training``), so a driver test exercises real
    candidates and trainings; only the parallelism of Ray is missing, which makes the order deterministic."""

    def __init__(self, latency: LatencySettings, workers: int = 1, reference=None) -> None:
        """``reference``: the base as a space Candidate; when given, candidates are timed paired with it."""
        self.workers = workers
        self._latency = latency
        self._reference_candidate = reference
        self._reference: Reference | None = None
        self._queue: deque[tuple[Any, str, Callable[[], Any]]] = deque()
        self.log: list[tuple[str, Any]] = []  # (kind, key) in the order the work ran
        self.jobs: dict[Any, list[TrainJob]] = {}  # every training submitted, by key

    def submit_latency(self, key: Any, candidate, proxy_imgsz: int) -> None:
        self._queue.append((key, "latency", lambda: measure_latency(candidate, self._latency, proxy_imgsz,
                                                                    reference=self._paired_with())))

    def _paired_with(self) -> Reference | None:
        if self._reference is None and self._reference_candidate is not None:
            self._reference = prepare_reference(self._reference_candidate, self._latency)
        return self._reference

    def submit_train(self, key: Any, job: TrainJob, kind: str = "train") -> None:
        self.jobs.setdefault(key, []).append(job)
        self._queue.append((key, kind, lambda: run_training(job)))

    def wait(self, timeout_s: float) -> list[Event]:
        if not self._queue:
            return []
        key, kind, work = self._queue.popleft()
        self.log.append((kind, key))
        return [Event(key, kind, work())]

    def checkpoint(self) -> None:
        """Nothing runs beside the driver here: latencies are timed inside :meth:`wait`."""

    def cancel(self, key: Any) -> None:
        self._queue = deque(item for item in self._queue if item[0] != key)

    def cancel_all(self) -> list[Any]:
        keys = [key for key, _, _ in self._queue]
        self._queue.clear()
        return keys
