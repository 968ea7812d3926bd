"""Rank correlations the study reports about itself, against their textbook definitions."""

import math

import pytest

from search.front.fidelity import kendall_tau_b, rung_taus, seed_sd, spearman_rho, tau_on_separated_pairs


def test_kendall_tau_b_on_known_orderings():
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau_b([1, 2, 3, 4], [40, 30, 20, 10]) == -1.0
    # 5 concordant, 1 discordant pair, no ties: (5 - 1) / 6
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # tau-b with a tie in x: n0 = 6, n1 = 1, n2 = 0: (C - D) / sqrt((n0 - n1) * (n0 - n2)) = (5 - 0) / sqrt(5 * 6)
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))


def test_spearman_and_separated_pairs():
    assert spearman_rho([1, 2, 3], [3, 2, 1]) == -1.0
    tau, pairs = tau_on_separated_pairs([1, 2, 3], [0.10, 0.11, 0.50], min_gap=0.05)
    assert pairs == 2 and tau == 1.0


def test_rung_taus_use_only_candidates_that_reached_both_rungs():
    results = {"a": {1: 0.1, 3: 0.2, 9: 0.5}, "b": {1: 0.2, 3: 0.3, 9: 0.4}, "c": {1: 0.3, 3: 0.1}, "d": {1: 0.0}}
    rows = rung_taus((1, 3, 9), results)
    assert rows[0] == {"from_epochs": 1, "to_epochs": 3, "candidates": 3, "kendall_tau": pytest.approx(-1 / 3)}
    assert rows[1]["candidates"] == 2 and rows[1]["kendall_tau"] == -1.0
    assert seed_sd([0.5]) is None and seed_sd([0.5, 0.7]) == pytest.approx(math.sqrt(0.02))


def test_a_rung_pair_one_candidate_reached_reads_as_not_defined_not_nan():
    from search.front.confirm import describe

    rows = rung_taus([1, 3], {"a": {1: 0.3, 3: 0.4}, "b": {1: 0.2}})
    report = {"objective": "mAP50-95", "rung_kendall_tau": rows, "seed_sd": None,
              "epochs": {"spent_on_candidates": 4, "candidates": 2, "confirmation": 0, "all_at_top_rung": 6}}
    assert describe(report)[0] == ("Kendall tau of mAP50-95 between rungs 1 and 3 epochs: "
                                   "not defined over 1 candidate(s)")
