"""Pareto ranks of loss vectors (every objective minimised): the order successive halving promotes in, and the
ranking the search strategy and confirmation share."""

from __future__ import annotations

import numpy as np


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
