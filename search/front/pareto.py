"""The front of a study: which trials it may hold (trusted latencies, no copies, no values typed by hand), the
non-dominated ones among them, the base trial every front is compared with, and hypervolume."""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from .. import objectives as obj
from ..storage.study import REMEASURED_ATTR, completed_trials, outside_changes


def objectives_of(study: optuna.Study) -> tuple[obj.Objective, ...]:
    """The study's objective table, from its metric names (set when the study was created)."""
    return obj.parse(study.metric_names)


def pareto_trials(study: optuna.Study, objectives: Sequence[obj.Objective],
                  include_by_hand: bool = False) -> list[FrozenTrial]:
    """Optuna's ``best_trials`` rule over :func:`front_trials`: without the copies dedup made (they share their
    source's values), without trials whose latency is not trusted yet and, unless ``include_by_hand``, without
    trials completed by hand in the dashboard (their values were typed, not measured), listed by
    :func:`search.objectives.sort_key` (fastest first by default)."""
    by_hand = set() if include_by_hand else {
        int(n) for n, kind in outside_changes(study).items() if kind == "completed-by-hand"}
    kept = [t for t in front_trials(study, objectives) if t.number not in by_hand]
    front = _nondominated(kept, study.directions)
    return sorted((t for t in front if "reused_from" not in t.user_attrs), key=obj.sort_key(objectives))


def front_trials(study: optuna.Study, objectives: Sequence[obj.Objective]) -> list[FrozenTrial]:
    """The completed trials a front may hold, with the values it compares. A trial whose latency was recorded
    contended (no window passed the meter's acceptance rule) counts only once a re-measure at the end of the run
    passed, with that latency (a finished trial's values cannot change, so the study keeps it in
    ``REMEASURED_ATTR``); a copy made by dedup follows its source."""
    remeasured = study.user_attrs.get(REMEASURED_ATTR) or {}
    index = next((i for i, o in enumerate(objectives) if o.name == "latency_ms"), None)
    out = []
    for t in completed_trials(study):
        source = str(t.user_attrs.get("reused_from", t.number))
        if not t.user_attrs.get("latency_contended"):
            out.append(t)
            continue
        again = remeasured.get(source)
        if again is None or not again.get("accepted"):
            continue
        if index is not None:
            t = copy.copy(t)
            values = list(t.values)
            values[index] = again["latency_ms"]
            t.values = values
        out.append(t)
    return out


def _nondominated(trials: list[FrozenTrial], directions) -> list[FrozenTrial]:
    """Optuna's rule for ``best_trials`` (feasible trials only, then non-dominated) over a subset of trials."""
    from optuna.study._multi_objective import _get_pareto_front_trials_by_trials

    return _get_pareto_front_trials_by_trials(trials, directions, consider_constraint=True)


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float],
                objectives: Sequence[obj.Objective]) -> float:
    """Hypervolume that ``points`` (objective values in the objectives' own directions) dominate up to
    ``reference``; points not better than the reference in every objective add nothing.

    Optuna's samplers and hypervolume plot compute it with ``optuna._hypervolume.compute_hypervolume`` (exact, any
    number of objectives), which Optuna does not export publicly; this is the project's one use of it, and
    tests/test_objectives.py checks it against an independent formula so an Optuna change fails loudly there.
    """
    sign = np.array([-1.0 if o.maximize else 1.0 for o in objectives])
    ref = np.asarray(reference, dtype=float) * sign
    return loss_hypervolume(np.asarray(points, dtype=float).reshape(-1, len(objectives)) * sign, ref)


def loss_hypervolume(losses: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume of minimised loss vectors below ``reference`` (the search strategy scores many candidates with it).

    Two objectives take a numpy staircase (Optuna's general routine costs about a millisecond a call, and the
    strategy scores ~100 children per proposal); more go to ``optuna._hypervolume.compute_hypervolume``."""
    from optuna._hypervolume import compute_hypervolume

    inside = losses[(losses < reference).all(1)] if len(losses) else losses
    if not len(inside):
        return 0.0
    if inside.shape[1] == 2:
        ordered = inside[np.argsort(inside[:, 0], kind="stable")]
        best_y = np.minimum.accumulate(ordered[:, 1])  # the staircase's height from each x to the next
        widths = np.diff(np.append(ordered[:, 0], reference[0]))
        return float(np.sum(widths * (reference[1] - best_y)))
    return float(compute_hypervolume(inside, reference))


def base_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's reference: the completed trial of the base itself (placement none)."""
    return next((t for t in completed_trials(study) if t.params.get("placement") == "none"
                 and "reused_from" not in t.user_attrs), None)
