"""MO-ASHA promotion: Pareto rank first, crowding distance within a front, the best floor(n / eta) of a rung."""

import itertools

import numpy as np
import pytest

from search.engine.rungs import Ladder
from search.settings import parse_rungs
from search.front.ranks import crowding_distance, pareto_ranks, promotion_order


def brute_force_ranks(points: np.ndarray) -> list[int]:
    """Rank = length of the longest chain of dominators above a point (an independent definition)."""
    n = len(points)
    dom = [[bool(np.all(points[j] <= points[i]) and np.any(points[j] < points[i])) for j in range(n)] for i in range(n)]
    memo: dict[int, int] = {}

    def depth(i: int) -> int:
        if i not in memo:
            memo[i] = max((depth(j) + 1 for j in range(n) if dom[i][j]), default=0)
        return memo[i]

    return [depth(i) for i in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_pareto_ranks_match_the_dominance_chain_definition(seed):
    pts = np.random.default_rng(seed).integers(0, 6, size=(25, 3)).astype(float)  # many ties and duplicates
    assert pareto_ranks(pts).tolist() == brute_force_ranks(pts)


def test_promotion_order_on_known_fronts():
    # (loss1, loss2), both minimised. Front 0: a, b, c (a staircase); front 1: d, e; front 2: f.
    pts = np.array([[1, 9], [5, 5], [9, 1], [6, 9], [9, 6], [9.5, 9.5]], dtype=float)
    assert pareto_ranks(pts).tolist() == [0, 0, 0, 1, 1, 2]
    # Within front 0 the boundary points a, c are infinitely crowded, b is the interior one.
    assert promotion_order(pts).tolist() == [0, 2, 1, 3, 4, 5]
    assert np.isinf(crowding_distance(pts[:3])[[0, 2]]).all() and np.isfinite(crowding_distance(pts[:3])[1])


def test_ladder_promotes_the_top_third_asynchronously_by_pareto_rank():
    # Objectives: mAP (maximised), latency (minimised). Candidate i: a synthetic front with known ranks.
    ladder = Ladder(rungs=(1, 3, 9), eta=3, maximize=(True, False))
    results = {"a": (0.50, 10.0), "b": (0.60, 20.0), "c": (0.40, 30.0), "d": (0.30, 40.0), "e": (0.70, 50.0),
               "f": (0.20, 60.0)}
    ladder.record("a", 0, results["a"])
    ladder.record("b", 0, results["b"])
    assert ladder.next_promotion() is None, "two results: floor(2 / 3) = 0, nobody waits, a new candidate starts"
    ladder.record("c", 0, results["c"])  # dominated by a and b
    assert ladder.next_promotion() == ("a", 0), "front {a, b}: both boundary points, a first by insertion order"
    ladder.mark_promoted("a", 0)
    assert ladder.next_promotion() is None
    for key in "def":
        ladder.record(key, 0, results[key])
    # Six results: the best two are promoted. Front 0 is {a, b, e}; b and e follow a (crowding: all boundary or
    # interior: a and e are the boundary points of {a, b, e}).
    assert ladder.promotable(0) == ["e"]
    ladder.mark_promoted("e", 0)
    ladder.record("a", 1, (0.55, 10.0))
    ladder.record("e", 1, (0.72, 50.0))
    assert ladder.next_promotion() is None, "rung 1 holds 2: floor(2 / 3) = 0; rung 0 has promoted its 2"
    ladder.record("g", 0, (0.90, 5.0))  # dominates everything at rung 0
    assert ladder.promotable(0) == ["g"]


@pytest.mark.parametrize("capped, expected", [
    (False, [2, 3, 4, 5, 6, 7, 8]),  # ASHA: whoever is in the best floor(n / 3) when a worker asks: 7 of 9
    (True, [2, 5, 8]),  # capped: never more than floor(n / 3) promoted, 3 of 9, each the best when its turn came
])
def test_capped_promotion_sends_on_the_count_synchronous_halving_would(capped, expected):
    """Nine results at rung 0, each dominating every earlier one (known Pareto ranks: a chain), a worker asking
    for work after every result, as the driver does."""
    ladder = Ladder(rungs=(1, 3), eta=3, maximize=(True, False), capped=capped)
    promoted = []
    for i in range(9):
        ladder.record(i, 0, (0.1 * (i + 1), 10.0 - i))
        while (ready := ladder.next_promotion()) is not None:
            ladder.mark_promoted(ready[0], 0)
            promoted.append(ready[0])
    assert promoted == expected
    assert len(promoted) <= 9 // 3 or not capped


def test_hopeless_results_are_those_dominated_by_more_than_the_rung_can_ever_promote():
    ladder = Ladder(rungs=(1, 3), eta=3, maximize=(True, False))
    for i, v in enumerate([(0.9, 3.0), (0.8, 2.0), (0.7, 1.0), (0.1, 9.0)]):
        ladder.record(i, 0, v)
    # At most 6 candidates -> at most 2 promotions from rung 0. Candidate 3 is dominated by three: hopeless.
    assert ladder.hopeless(3, 0, candidates=6) and not ladder.hopeless(2, 0, candidates=6)
    # With 12 candidates, 4 promotions are possible: nobody is hopeless yet.
    assert not any(ladder.hopeless(i, 0, candidates=12) for i in range(4))
    assert ladder.hopeless(0, 1, candidates=6), "the top rung promotes nobody"


@pytest.mark.parametrize("text, error", [("3,1", "increasing"), ("0,3", "positive"), ("a", "expected"), ("", "expected")])
def test_bad_rungs_are_refused(text, error):
    with pytest.raises(ValueError, match=error):
        parse_rungs(text)


def test_rungs_parse():
    assert parse_rungs("1,3,9") == (1, 3, 9) and parse_rungs("5") == (5,)
    assert list(itertools.pairwise(parse_rungs("1,3,9"))) == [(1, 3), (3, 9)]
