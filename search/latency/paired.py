"""Paired timing against a reference network: the alternating protocol, free of any model.

Machine speed on a shared host drifts by tens of percent over minutes, but slowly: a candidate timed alternately
with a fixed reference sees the same machine as the reference. The protocol runs R C R C ... R; what is estimated
from those runs, and when a window is trusted, is in :mod:`search.latency.window`.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

from .window import DEFAULT_STATISTIC, estimate


def time_paired(run_reference: Callable[[], object], run_candidate: Callable[[], object], *, min_pairs: int,
                max_pairs: int, rel_half_width: float, statistic: str = DEFAULT_STATISTIC,
                clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], list[float]]:
    """Run R C R C ... R and return (reference, candidate) times in ms; stops after ``min_pairs`` or more pairs
    once the ``statistic``'s 95% interval is within ±``rel_half_width`` (0 = always ``max_pairs``).

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
            if estimate(reference, candidate, statistic).rel_half_width <= rel_half_width:
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
