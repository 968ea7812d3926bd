"""How much a study can trust its own rankings: rank correlations between fidelities and seed noise.

Kendall's tau and Spearman's rho are written out here because scipy is not a dependency of this project (Optuna,
Ultralytics and Ray do not need it); the study reports them from its own promotions and confirmation runs, and
``bench/proxy_fidelity.py`` uses the same functions.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Hashable, Mapping, Sequence


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean rank), as Spearman's rho needs."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (tie-corrected). Written out because scipy is not a dependency of this project."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx * dy > 0:
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom else float("nan")


def spearman_rho(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def tau_on_separated_pairs(x: list[float], y: list[float], min_gap: float) -> tuple[float, int]:
    """Kendall's tau over the pairs whose ``y`` values differ by more than ``min_gap`` (the pairs the long
    schedule tells apart beyond seed noise), and how many pairs that is."""
    concordant = discordant = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if abs(y[i] - y[j]) > min_gap and x[i] != x[j]:
                if (x[i] - x[j]) * (y[i] - y[j]) > 0:
                    concordant += 1
                else:
                    discordant += 1
    pairs = concordant + discordant
    return ((concordant - discordant) / pairs if pairs else float("nan")), pairs


def rung_taus(rungs: Sequence[int], results: Mapping[Hashable, Mapping[int, float]]) -> list[dict]:
    """Kendall's tau of a score between consecutive rungs, over the candidates that reached both.

    ``results`` maps a candidate to {rung epochs: score}. Returns one row per pair of consecutive rungs."""
    rows = []
    for lo, hi in itertools.pairwise(rungs):
        both = [r for r in results.values() if lo in r and hi in r]
        tau = kendall_tau_b([r[lo] for r in both], [r[hi] for r in both]) if len(both) >= 2 else float("nan")
        rows.append({"from_epochs": lo, "to_epochs": hi, "candidates": len(both), "kendall_tau": tau})
    return rows


def seed_sd(scores: Sequence[float]) -> float | None:
    """Sample standard deviation of one network's scores over seeds (None below two seeds)."""
    return statistics.stdev(scores) if len(scores) >= 2 else None
