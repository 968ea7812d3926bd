"""One exclusive timing window: its raw runs, the statistics that read them, and the rule that accepts it.

A window times the reference (the base) and the candidate alternately, R C R C ... R. Each candidate run is paired
with a reference level from the runs around it (their mean cancels a drift that is linear over one pair). Another
tenant only ever makes a run *slower*, so the statistics differ in how they shed slow runs:

- ``pair_median``: median of the per-pair ratios (the default);
- ``median_ratio``: the candidate's median over the reference's median;
- ``q25_ratio``: the same with lower quartiles (a slow run hardly moves a low quantile);
- ``min_ratio``: fastest over fastest;
- ``pair_hl``: Hodges-Lehmann estimate (median of Walsh averages) of the log per-pair ratios.

``bench/latency.py --statistics`` compares them on recorded windows against quiet re-timing;
:data:`DEFAULT_STATISTIC` is the one chosen there. Every statistic gets the same interval: a seeded bootstrap over pairs (deterministic, so a
recorded window always gives the same numbers).

The A/A control reads the reference runs alone: the even ones (R0 R2 R4 ...) bracket the odd ones (R1 R3 ...), so
the statistic applied to them should give 1. A window whose control is off by more than the tolerance, or whose
interval is wider than the target, is not accepted (:class:`Acceptance`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

# (reference level per pair, candidate run), each of shape (..., pairs) -> ratios of shape (...): a whole
# bootstrap is one call.
Statistic = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _pair_median(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.median(c / r, axis=-1)


def _median_ratio(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.median(c, axis=-1) / np.median(r, axis=-1)


def _q25_ratio(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.quantile(c, 0.25, axis=-1) / np.quantile(r, 0.25, axis=-1)


def _min_ratio(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return c.min(axis=-1) / r.min(axis=-1)


def _pair_hl(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    x = np.log(c / r)
    i, j = np.triu_indices(x.shape[-1])
    return np.exp(np.median((x[..., i] + x[..., j]) / 2, axis=-1))


STATISTICS: dict[str, Statistic] = {"pair_median": _pair_median, "median_ratio": _median_ratio,
                                    "q25_ratio": _q25_ratio, "min_ratio": _min_ratio, "pair_hl": _pair_hl}
# Chosen on recorded one-thread windows against quiet re-timing (bench/latency.py --statistics on
# bench/results/latency-dev-windows-1thread-*.json): at 12 pairs its error was median 0.5% / worst 1.9% in quiet
# windows and 0.7% / 2.8% beside a foreign busy core, with the ±2% interval met most often (73% / 67%);
# Hodges-Lehmann tied, the ratios of medians, quartiles and minima had worst errors of 4-12%.
DEFAULT_STATISTIC = "pair_median"
BOOTSTRAP = 400  # resamples for an interval; ~2 ms a window


def bracketed(reference: Sequence[float], candidate: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """R C R C ... R timings as aligned arrays: each candidate run with the mean of the reference runs around it.

    ``reference`` may also be as long as ``candidate`` (R C R C ...): the last pair then uses its one reference.
    """
    n = len(candidate)
    if n == 0 or len(reference) not in (n, n + 1):
        raise ValueError(f"paired timings need n candidate and n or n+1 reference times, got {n} and {len(reference)}")
    ref = np.asarray(reference, dtype=float)
    cand = np.asarray(candidate, dtype=float)
    if ref.min() <= 0 or cand.min() <= 0:
        raise ValueError("timings must be positive")
    around = (ref[:n] + ref[1:n + 1]) / 2 if len(ref) == n + 1 else np.append((ref[:-1] + ref[1:]) / 2, ref[-1])
    return around, cand


@dataclass(frozen=True)
class Estimate:
    """A ratio with its bootstrap interval (``level`` coverage) over ``n`` pairs."""

    ratio: float
    ci_low: float
    ci_high: float
    n: int
    level: float = 0.95

    @property
    def rel_half_width(self) -> float:
        """Half the interval's width relative to the ratio (0.02 = ±2%)."""
        return (self.ci_high - self.ci_low) / (2 * self.ratio)


def estimate(reference: Sequence[float], candidate: Sequence[float], statistic: str = DEFAULT_STATISTIC,
             level: float = 0.95, resamples: int = BOOTSTRAP) -> Estimate:
    """The ratio candidate / reference of R C R C ... R timings by ``statistic``, with a seeded percentile
    bootstrap interval over pairs."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown latency statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
    f = STATISTICS[statistic]
    r, c = bracketed(reference, candidate)
    ratio = float(f(r, c))
    n = len(c)
    if n < 2:
        return Estimate(ratio, ratio, ratio, n, level)
    rng = np.random.default_rng(n)  # seeded: a recorded window always gives the same interval
    idx = rng.integers(0, n, size=(resamples, n))
    boot = f(r[idx], c[idx])
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(ratio, float(min(low, ratio)), float(max(high, ratio)), n, level)


def aa_control(reference: Sequence[float], statistic: str = DEFAULT_STATISTIC) -> float | None:
    """The A/A ratio of a window: the odd reference runs against the even ones around them (1 in a quiet window);
    None with fewer than 5 reference runs."""
    ref = list(reference)
    if len(ref) < 5:
        return None
    even, odd = ref[0::2], ref[1::2]
    if len(even) == len(odd):  # R0 R1 R2 R3: the last odd run has one bracket on the left only
        odd = odd[:-1]
    return float(STATISTICS[statistic](*bracketed(even, odd)))


@dataclass
class Window:
    """One exclusive window's raw runs (ms), what was computed from them and why it was (not) accepted."""

    reference_ms: list[float]
    candidate_ms: list[float]
    started: float = 0.0  # wall clock (time.time) at the first timed run
    seconds: float = 0.0  # the window's length, from closing the gate to reopening it
    contended: list[str] = field(default_factory=list)  # trainings that did not park before the window timed
    foreign_cpu_s: float = 0.0  # CPU seconds that processes other than the meter used during the timed runs
    foreign: list[list] = field(default_factory=list)  # the largest of those: [name, pid, cpu seconds]
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    aa: float | None = None
    rejected: list[str] = field(default_factory=list)  # empty: accepted

    @property
    def accepted(self) -> bool:
        return not self.rejected

    @property
    def rel_half_width(self) -> float:
        if self.ratio is None or self.ci_low is None or self.ci_high is None:
            return math.inf
        return (self.ci_high - self.ci_low) / (2 * self.ratio)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("started", "seconds", "ratio", "ci_low", "ci_high", "aa", "rejected",
                                              "contended", "foreign_cpu_s", "foreign", "reference_ms",
                                              "candidate_ms")}


# What each reason of Acceptance.reasons starts with, and how a summary names it.
REJECTIONS = {"interval": "interval too wide", "A/A": "A/A control off",
              "insert-only": "insert-only candidate below the base"}


def rejection_kind(reason: str) -> str:
    """The summary's name for one of :meth:`Acceptance.reasons` (the reason itself if it is of no known kind)."""
    return next((label for prefix, label in REJECTIONS.items() if reason.startswith(prefix)), reason)


@dataclass(frozen=True)
class Acceptance:
    """When a window's ratio is trusted, and how often a rejected one is timed again.

    A window is rejected when its interval's half-width exceeds ``max_half_width``, when its A/A control is off by
    more than ``aa_tolerance``, or when a candidate that only adds layers (``insert_only``) times faster than the
    base beyond its interval. A rejected window is timed again after ``backoff_s[k]`` seconds (trainings run
    meanwhile), ``tries`` windows in all; then the trial is recorded contended with the narrowest window."""

    max_half_width: float = 0.02
    aa_tolerance: float = 0.03
    tries: int = 3
    backoff_s: tuple[float, ...] = (2.0, 8.0)
    check: bool = True  # False: every window is accepted (``--latency-ci 0``)

    def __post_init__(self) -> None:
        if self.tries < 1:
            raise ValueError(f"tries must be >= 1, got {self.tries}")
        if not 0 < self.max_half_width < 1 or not 0 < self.aa_tolerance < 1:
            raise ValueError("max_half_width and aa_tolerance must be in (0, 1)")
        if any(b < 0 for b in self.backoff_s):
            raise ValueError(f"backoff_s must be >= 0, got {self.backoff_s}")

    def reasons(self, window: Window, insert_only: bool = False) -> list[str]:
        """Why ``window`` is not accepted (empty: accepted)."""
        out: list[str] = []
        if not self.check:
            return out
        if window.rel_half_width > self.max_half_width:
            out.append(f"interval ±{window.rel_half_width:.1%} > ±{self.max_half_width:.0%}")
        if window.aa is not None and abs(window.aa - 1) > self.aa_tolerance:
            out.append(f"A/A control {window.aa:.3f}")
        if insert_only and window.ci_high is not None and window.ci_high < 1:
            out.append(f"insert-only candidate below the base ({window.ci_high:.3f} < 1)")
        return out

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th rejected window (0-based) before the next one."""
        if not self.backoff_s:
            return 0.0
        return self.backoff_s[min(attempt, len(self.backoff_s) - 1)]


def best_window(windows: Sequence[Window]) -> Window:
    """The window a trial records: the first accepted one, else the narrowest interval."""
    accepted = [w for w in windows if w.accepted]
    return accepted[0] if accepted else min(windows, key=lambda w: w.rel_half_width)


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation (sample sd / mean); nan for fewer than two values."""
    return statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else math.nan
