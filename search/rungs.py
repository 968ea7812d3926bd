"""Asynchronous successive halving ranked by Pareto dominance (MO-ASHA, Schmucker et al. 2021).

Every candidate trains to rung 0 (``rungs[0]`` epochs). As results arrive, a candidate at rung ``k`` is promoted
to rung ``k + 1`` when it is among the best ``floor(n_k / eta)`` of the ``n_k`` results at rung ``k``, ranked by
non-dominated sorting on all objectives at that rung, ties within a front broken by crowding distance (NSGA-II).
Like ASHA, nobody waits for a rung to fill: :meth:`Ladder.next_promotion` is asked whenever a worker is free, and
a candidate that is not promotable now may become so later, when more results at its rung make ``n_k / eta``
larger. Optuna prunes single-objective studies only and Ray's schedulers take one metric, so this is built here;
the rule is small enough that a dependency (Syne Tune's ``MOASHA``) would add more than it saves.

Pure bookkeeping: no study, no training. The driver records results and asks what to promote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np


def parse_rungs(text: str) -> tuple[int, ...]:
    """``"1,3,9"`` -> (1, 3, 9): strictly increasing positive epoch counts."""
    try:
        rungs = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--rungs {text!r}: expected increasing epoch counts, e.g. 1,3,9") from None
    if not rungs or rungs[0] < 1 or any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise ValueError(f"--rungs {text!r}: expected strictly increasing positive epoch counts, e.g. 1,3,9")
    return rungs


def pareto_ranks(losses: np.ndarray) -> np.ndarray:
    """Non-domination rank of each row of ``losses`` (all minimised): 0 for the front, 1 for the next, ...

    Optuna has this as a private function (``optuna.study._multi_objective._fast_non_domination_rank``); rungs hold
    tens of points, so the plain O(n^2) peeling below is fast and keeps a private API out of the promotion rule.
    """
    n = len(losses)
    ranks = np.full(n, -1)
    rank = 0
    left = np.arange(n)
    while len(left):
        pts = losses[left]
        dominated = np.array([np.any(np.all(pts <= p, axis=1) & np.any(pts < p, axis=1)) for p in pts])
        ranks[left[~dominated]] = rank
        left = left[dominated]
        rank += 1
    return ranks


def crowding_distance(losses: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance within one front: boundary points get infinity, the rest the normalised sum of
    their neighbours' gaps along each objective."""
    n, m = losses.shape
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(losses[:, j], kind="stable")
        span = losses[order[-1], j] - losses[order[0], j]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (losses[order[2:], j] - losses[order[:-2], j]) / span
    return dist


def promotion_order(losses: np.ndarray) -> np.ndarray:
    """Indices of ``losses`` best first: by Pareto rank, then by crowding distance (larger first), then by index."""
    ranks = pareto_ranks(losses)
    crowd = np.zeros(len(losses))
    for r in np.unique(ranks):
        members = np.flatnonzero(ranks == r)
        crowd[members] = crowding_distance(losses[members])
    return np.array(sorted(range(len(losses)), key=lambda i: (ranks[i], -crowd[i], i)), dtype=int)


@dataclass
class Ladder:
    """Results per rung and who has been promoted; ``maximize[j]`` says whether objective ``j`` is maximised."""

    rungs: tuple[int, ...]
    eta: int
    maximize: tuple[bool, ...]
    results: list[dict[Hashable, tuple[float, ...]]] = field(default_factory=list)  # per rung: candidate -> values
    promoted: list[set[Hashable]] = field(default_factory=list)  # per rung: candidates sent on from it

    def __post_init__(self) -> None:
        if self.eta < 2:
            raise ValueError(f"--eta must be at least 2, got {self.eta}")
        self.results = self.results or [{} for _ in self.rungs]
        self.promoted = self.promoted or [set() for _ in self.rungs]

    @property
    def top(self) -> int:
        return len(self.rungs) - 1

    def record(self, key: Hashable, rung: int, values: Sequence[float]) -> None:
        """Candidate ``key`` finished rung ``rung`` with these objective values."""
        self.results[rung][key] = tuple(float(v) for v in values)

    def mark_promoted(self, key: Hashable, rung: int) -> None:
        self.promoted[rung].add(key)

    def promotable(self, rung: int) -> list[Hashable]:
        """Candidates at ``rung`` (below the top) in its best ``floor(n / eta)`` not promoted yet, best first."""
        if rung >= self.top:
            return []
        keys = list(self.results[rung])
        k = len(keys) // self.eta
        if k == 0:
            return []
        sign = np.array([-1.0 if m else 1.0 for m in self.maximize])
        losses = np.array([self.results[rung][key] for key in keys]) * sign
        best = [keys[i] for i in promotion_order(losses)[:k]]
        return [key for key in best if key not in self.promoted[rung]]

    def next_promotion(self) -> tuple[Hashable, int] | None:
        """The promotion to start when a worker is free: from the highest rung that has one (ASHA's rule), as
        (candidate, rung it finished); None means start a new candidate at rung 0."""
        for rung in range(self.top - 1, -1, -1):
            ready = self.promotable(rung)
            if ready:
                return ready[0], rung
        return None

    def hopeless(self, key: Hashable, rung: int, candidates: int) -> bool:
        """True when ``key``'s result at ``rung`` can never be promoted in a search of at most ``candidates``
        candidates (its checkpoint may be deleted): it is at the top, was promoted already, or is dominated by at
        least as many results as the rung can ever promote. Dominators only accumulate, and each ranks ahead of it,
        so this never turns false again."""
        if rung >= self.top or key in self.promoted[rung]:
            return True
        cap = candidates
        for _ in range(rung):
            cap //= self.eta
        slots = cap // self.eta
        sign = np.array([-1.0 if m else 1.0 for m in self.maximize])
        mine = np.array(self.results[rung][key]) * sign
        others = np.array([v for k, v in self.results[rung].items() if k != key]).reshape(-1, len(sign)) * sign
        dominators = int(np.sum(np.all(others <= mine, axis=1) & np.any(others < mine, axis=1))) if len(others) else 0
        return dominators >= slots
