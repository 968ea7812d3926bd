"""Paired timing against a reference network: the estimator and the alternating protocol, both free of any model.

Machine speed on a shared host drifts by tens of percent over minutes, but slowly: a candidate timed alternately
with a fixed reference sees the same machine as the reference. Each candidate run is divided by the mean of the
two reference runs around it (R C R C ... R), which cancels any drift that is linear over one pair, and the
median of those ratios is the estimate (robust to a run hit by a burst of another tenant).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class PairedRatio:
    """candidate / reference: the median of per-pair ratios, its distribution-free confidence interval and n."""

    ratio: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float  # the interval's exact coverage (order statistics of n ratios)

    @property
    def rel_half_width(self) -> float:
        """Half the interval's width relative to the ratio (0.01 = ±1%)."""
        return (self.ci_high - self.ci_low) / (2 * self.ratio)


def pair_ratios(reference: Sequence[float], candidate: Sequence[float]) -> list[float]:
    """Per-pair ratios of R C R C ... R timings: each candidate time over the mean of its two neighbours.

    ``reference`` may also be as long as ``candidate`` (R C R C ...): the last pair then uses its one reference.
    """
    n = len(candidate)
    if n == 0 or len(reference) not in (n, n + 1):
        raise ValueError(f"paired timings need n candidate and n or n+1 reference times, got {n} and {len(reference)}")
    if min(reference) <= 0 or min(candidate) <= 0:
        raise ValueError("timings must be positive")
    around = [(reference[i] + reference[i + 1]) / 2 if i + 1 < len(reference) else reference[i] for i in range(n)]
    return [c / r for c, r in zip(candidate, around)]


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The median's distribution-free interval from order statistics: (low, high, exact coverage).

    Written out (a binomial tail, a few lines) because scipy is not a dependency and numpy has no binomial CDF.
    With fewer than 6 values no pair of order statistics reaches 95%; the widest one (min, max) is returned
    with its lower coverage.
    """
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    j = 1  # 1-based rank of the lower bound; the interval is [x_(j), x_(n+1-j)]
    while j + 1 <= (n + 1) // 2 and 1 - 2 * _below(n, j + 1) >= confidence:
        j += 1
    return x[j - 1], x[n - j], 1 - 2 * _below(n, j)


def _below(n: int, j: int) -> float:
    """P(B < j) for B ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(j)) / 2**n


def paired_ratio(reference: Sequence[float], candidate: Sequence[float], confidence: float = 0.95) -> PairedRatio:
    """The paired estimate from R C R C ... R timings (any unit): median per-pair ratio with its interval."""
    ratios = pair_ratios(reference, candidate)
    low, high, coverage = median_ci(ratios, confidence)
    return PairedRatio(statistics.median(ratios), low, high, len(ratios), coverage)


def time_paired(run_reference: Callable[[], object], run_candidate: Callable[[], object], *, min_pairs: int,
                max_pairs: int, rel_half_width: float, confidence: float = 0.95,
                clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], list[float]]:
    """Run R C R C ... R and return (reference, candidate) times in ms; stops after ``min_pairs`` or more pairs
    once the ratio's interval is within ±``rel_half_width`` (0 = always ``max_pairs``).

    ``clock`` is injectable so a test can run the protocol on a synthetic drifting clock. Each ``run_*`` must
    return only when its work is done (synchronised on GPUs).
    """
    if not 1 <= min_pairs <= max_pairs:
        raise ValueError(f"need 1 <= min_pairs <= max_pairs, got {min_pairs} and {max_pairs}")

    def timed(run: Callable[[], object]) -> float:
        t0 = clock()
        run()
        return (clock() - t0) * 1000

    reference, candidate = [timed(run_reference)], []
    while len(candidate) < max_pairs:
        candidate.append(timed(run_candidate))
        reference.append(timed(run_reference))
        if len(candidate) >= min_pairs and rel_half_width > 0:
            if paired_ratio(reference, candidate, confidence).rel_half_width <= rel_half_width:
                break
    return reference, candidate


def study_reference_ms(reference_medians: Sequence[float], settle: int = 5) -> float:
    """The study's reference latency: the median of the reference's window medians so far, fixed to the first
    ``settle`` windows once there are that many (so trials measured hours apart are scaled alike).

    The latency objective of a trial is its paired ratio times this value.
    """
    if not reference_medians:
        raise ValueError("no reference window measured yet")
    if settle < 1:
        raise ValueError(f"settle must be >= 1, got {settle}")
    return float(statistics.median(reference_medians[:settle]))
