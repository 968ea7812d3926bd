"""``--latency-estimator table``: a candidate's latency predicted from per-block costs timed once per machine.

nn-Meter's idea on our small space. A candidate is the base plus placements (slot, module, mode,
hyper-parameters; the slot fixes the feature size and width). The cost of one placement is what it adds to the
base: ``ratio(base + that placement) - 1``, timed paired with the base in accepted windows, once, and cached in a
JSON file keyed by the processor, the runtime and the latency settings (``table_path``). A candidate's ratio is
``1 + the sum of its placements' costs``; its interval sums the costs' intervals (the errors are not assumed to
cancel). On a shared machine this times each block once in a quiet moment instead of every candidate in whatever
moment it arrives; what it cannot see is an interaction between two placements (``bench/latency.py --table``
measures that error).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from space import make_candidate

TABLE_LAYOUT = 1


def placement_key(placement) -> str:
    """A placement's table key: slot, module, mode and hyper-parameters (a space.Placement)."""
    hparams = json.dumps([[k, list(v) if isinstance(v, tuple) else v] for k, v in placement.hparams])
    return f"{placement.slot}|{placement.module}|{placement.mode}|{hparams}"


def table_path(directory: str | os.PathLike, identity: dict[str, Any], base_hash: str) -> Path:
    """The cache file for one base on one processor and runtime at one latency setting."""
    timing = {k: identity.get(k) for k in ("device", "imgsz", "threads", "backend", "half", "batch", "statistic",
                                            "backend_version", "device_model")}
    blob = json.dumps({"layout": TABLE_LAYOUT, "base": base_hash, **timing}, sort_keys=True, default=str)
    return Path(directory) / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"


class BlockTable:
    """Per-placement costs (ratio over the base, minus 1) with their intervals, read from and written to one file."""

    def __init__(self, path: str | os.PathLike, about: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.about = dict(about or {})
        self.costs: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
                self.costs = stored.get("costs", {})
                self.about = {**self.about, **stored.get("about", {})}
            except (OSError, ValueError, AttributeError):  # a truncated cache is re-timed, never trusted
                self.costs = {}

    def get(self, placement) -> dict[str, Any] | None:
        return self.costs.get(placement_key(placement))

    def put(self, placement, ratio: float, ci_low: float, ci_high: float, windows: int) -> None:
        self.costs[placement_key(placement)] = {"cost": ratio - 1, "low": ci_low - 1, "high": ci_high - 1,
                                                "windows": windows, "timed": round(time.time(), 1)}
        self._write()

    @property
    def reference_ms(self) -> float | None:
        """The base's median time over the windows that timed the table's costs (the table's time scale)."""
        return self.about.get("reference_ms")

    def note_reference(self, reference_ms: float | None) -> None:
        if reference_ms and not self.about.get("reference_ms"):
            self.about["reference_ms"] = round(reference_ms, 4)

    def predict(self, placements, extra: dict[str, dict[str, Any]] | None = None) -> tuple[float, float, float]:
        """(ratio, low, high) of a candidate with ``placements``, each in the table or in ``extra`` (costs used
        once, not cached)."""
        costs = {**self.costs, **(extra or {})}
        parts = [costs[placement_key(p)] for p in placements]
        return (1 + sum(p["cost"] for p in parts), 1 + sum(p["low"] for p in parts),
                1 + sum(p["high"] for p in parts))

    def _write(self) -> None:
        """Atomically: a crash mid-write leaves the previous table, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".table-")
        with os.fdopen(fd, "w") as f:
            json.dump({"layout": TABLE_LAYOUT, "about": self.about, "costs": self.costs}, f, indent=1)
        os.replace(tmp, self.path)


def predicted(candidate, base, table: BlockTable, time_single: Callable[[Any], Any]) -> dict[str, Any]:
    """The table's ratio for ``candidate`` (a space.Candidate of ``base``), timing each placement the table lacks
    with ``time_single(single_placement_candidate) -> LatencyResult`` (paired, accepted windows).

    Returns ratio, ci_low, ci_high, accepted (every cost came from an accepted window), timed (placements timed
    now), windows (their raw windows) and error (a placement that could not be timed)."""
    timed, windows, accepted = [], [], True
    if table.reference_ms is None:  # the table's time scale: the base timed against itself once
        res = time_single(make_candidate(base))
        if res.error or not res.reference_ms:
            return {"error": f"table: timing the base failed: {res.error or 'no reference time'}"}
        table.note_reference(res.reference_ms)
        windows += res.windows
    uncached: dict[str, dict[str, Any]] = {}  # contended costs: used for this candidate, timed again next time
    for p in candidate.placements:
        if table.get(p) is not None:
            continue
        res = time_single(make_candidate(base, {p.slot: p}))
        if res.error or res.ratio is None:
            return {"error": f"table: timing {p.describe()} alone failed: {res.error or 'no ratio'}"}
        windows += res.windows
        table.note_reference(res.reference_ms)
        if res.accepted:
            table.put(p, res.ratio, res.ci_low, res.ci_high, len(res.windows))
        else:
            uncached[placement_key(p)] = {"cost": res.ratio - 1, "low": res.ci_low - 1, "high": res.ci_high - 1}
            accepted = False
        timed.append(p.describe())
    ratio, low, high = table.predict(candidate.placements, uncached)
    return {"ratio": ratio, "ci_low": low, "ci_high": high, "accepted": accepted, "timed": timed,
            "windows": windows, "reference_ms": table.reference_ms, "error": None}
