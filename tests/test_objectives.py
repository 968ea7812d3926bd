"""The objective table and the hypervolume behind every front's score."""

import itertools

import numpy as np
import pytest

from search import objectives as obj
from search.front import pareto
from search.errors import SearchError
from search.latency import LatencyResult
from search.training.proxy import TrainResult


def _union_volume(points: np.ndarray, ref: np.ndarray) -> float:
    """Volume of the union of the boxes [p, ref] (all minimised), by inclusion-exclusion: independent of Optuna."""
    total = 0.0
    for k in range(1, len(points) + 1):
        for subset in itertools.combinations(points, k):
            corner = np.max(subset, axis=0)  # the intersection of boxes [p, ref] is [max p, ref]
            total += (-1) ** (k + 1) * float(np.prod(np.clip(ref - corner, 0, None)))
    return total


@pytest.mark.parametrize("n_obj", [2, 3, 4])
def test_hypervolume_matches_inclusion_exclusion(n_obj):
    """Fails loudly if Optuna's private hypervolume routine (wrapped once in search.storage.study) changes behaviour."""
    rng = np.random.default_rng(n_obj)
    table = (obj.OBJECTIVES["mAP50-95"], obj.OBJECTIVES["latency_ms"], obj.OBJECTIVES["params"],
             obj.OBJECTIVES["gflops"])[:n_obj]
    values = rng.uniform(0.1, 0.9, size=(7, n_obj))
    ref = [0.0] + [1.0] * (n_obj - 1)
    # In minimisation form: mAP (maximised) is negated, its reference too.
    minimised = values * np.array([-1.0] + [1.0] * (n_obj - 1))
    expected = _union_volume(minimised, np.array([-0.0] + [1.0] * (n_obj - 1)))
    assert pareto.hypervolume(values.tolist(), ref, table) == pytest.approx(expected, rel=1e-9)
    # A point worse than the reference in one objective adds nothing.
    worse = [*values.tolist(), [0.95] + [1.5] * (n_obj - 1)]
    assert pareto.hypervolume(worse, ref, table) == pytest.approx(expected, rel=1e-9)
    assert pareto.hypervolume([], ref, table) == 0.0


def test_values_come_from_the_table_in_the_chosen_order():
    table = obj.parse("latency_ms,mAP50,params")
    lat = LatencyResult(median_ms=12.5, params=1000, gflops=0.5)
    train = TrainResult(map50_95=0.4, map50=0.6)
    assert obj.values(table, lat, train) == [12.5, 0.6, 1000.0]
    assert obj.values(table, lat, None) == [12.5, 0.0, 1000.0], "untrained: training objectives at their floor"
    assert obj.directions(table) == ["minimize", "maximize", "minimize"]
    with pytest.raises(SearchError, match="peak_mem_mb: no value was measured"):
        obj.values(obj.parse("mAP50-95,peak_mem_mb"), lat, train)


def test_reference_point_and_listing_order():
    table = obj.parse("mAP50-95,latency_ms,params")
    assert obj.reference_point(table, [[0.5, 10.0, 100.0], [0.6, 20.0, 50.0]]) == [0.0, 22.0, pytest.approx(110.0)]

    class T:
        def __init__(self, values):
            self.values = values

    trials = [T([0.5, 20.0, 1.0]), T([0.6, 10.0, 2.0])]
    assert [t.values[1] for t in sorted(trials, key=obj.sort_key(table))] == [10.0, 20.0], "fastest first"
    only_max = obj.parse("mAP50,mAP50-95")
    assert [t.values[0] for t in sorted(trials, key=obj.sort_key(only_max))] == [0.6, 0.5], "else best first"
