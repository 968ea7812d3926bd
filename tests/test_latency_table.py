"""``--latency-estimator table``: additivity of per-placement costs on a tiny space, the cache and its keys."""

import itertools

import pytest

import space
from search.latency import LatencyResult, LatencySettings
from search.latency.table import BlockTable, placement_key, predicted, table_path

COST = {("N3", "CGA"): 0.10, ("N3", "CoT"): 0.25, ("N4", "CGA"): 0.04, ("N4", "CoT"): 0.12}


@pytest.fixture(scope="module")
def tiny():
    """Two slots x two modules of yolov8n (default hyper-parameters): 4 single and 4 double placements."""
    base = space.load_base("yolov8n.yaml")
    singles = {(slot, module): space.Placement(slot, module, "insert", ()) for slot, module in COST}
    return base, singles


class SyntheticMachine:
    """Times a candidate as the base plus each placement's cost, plus ``interaction`` for every pair of
    placements, with an accepted, narrow interval: what the table must add up."""

    def __init__(self, interaction: float = 0.0) -> None:
        self.interaction = interaction
        self.timed: list[str] = []

    def ratio(self, candidate) -> float:
        n = len(candidate.placements)
        return (1 + sum(COST[(p.slot, p.module)] for p in candidate.placements)
                + self.interaction * n * (n - 1) / 2)

    def time_single(self, candidate) -> LatencyResult:
        self.timed.append(candidate.describe())
        r = self.ratio(candidate)
        return LatencyResult(ratio=r, ci_low=r - 0.005, ci_high=r + 0.005, reference_ms=40.0, accepted=True,
                             windows=[{"seconds": 0.5, "candidate_ms": [40 * r] * 6}])


def test_the_prediction_of_every_candidate_is_the_sum_of_its_placements_costs(tmp_path, tiny):
    base, singles = tiny
    table = BlockTable(tmp_path / "t.json")
    machine = SyntheticMachine()
    for (a, b) in itertools.product(["CGA", "CoT"], repeat=2):
        candidate = space.make_candidate(base, {"N3": singles[("N3", a)], "N4": singles[("N4", b)]})
        out = predicted(candidate, base, table, machine.time_single)
        assert out["error"] is None and out["accepted"]
        assert out["ratio"] == pytest.approx(machine.ratio(candidate), abs=1e-12)
        assert out["ci_low"] == pytest.approx(out["ratio"] - 0.01) and out["ci_high"] == pytest.approx(out["ratio"] + 0.01)
        assert out["reference_ms"] == 40.0
    assert sorted(machine.timed) == sorted(["base", "N3:CGA", "N3:CoT", "N4:CGA", "N4:CoT"]), \
        "each block is timed once (and the base once, for the time scale), however many candidates use it"


def test_an_interaction_between_placements_is_the_tables_error(tmp_path, tiny):
    base, singles = tiny
    machine = SyntheticMachine(interaction=0.03)
    table = BlockTable(tmp_path / "t.json")
    double = space.make_candidate(base, {"N3": singles[("N3", "CoT")], "N4": singles[("N4", "CGA")]})
    out = predicted(double, base, table, machine.time_single)
    assert machine.ratio(double) - out["ratio"] == pytest.approx(0.03)


def test_the_table_is_cached_on_disk_and_a_truncated_file_is_timed_again(tmp_path, tiny):
    base, singles = tiny
    path = tmp_path / "t.json"
    one = space.make_candidate(base, {"N3": singles[("N3", "CGA")]})
    predicted(one, base, BlockTable(path), SyntheticMachine().time_single)
    again = SyntheticMachine()
    out = predicted(one, base, BlockTable(path), again.time_single)
    assert again.timed == [] and out["ratio"] == pytest.approx(1.10)
    path.write_text(path.read_text()[:20])  # a crash mid-write of an older version
    fresh = SyntheticMachine()
    predicted(one, base, BlockTable(path), fresh.time_single)
    assert fresh.timed == ["base", "N3:CGA"]


def test_a_contended_cost_is_used_once_and_not_cached(tmp_path, tiny):
    base, singles = tiny
    path = tmp_path / "t.json"
    machine = SyntheticMachine()

    def contended(candidate):
        res = machine.time_single(candidate)
        res.accepted = candidate.describe() == "base"
        return res

    one = space.make_candidate(base, {"N4": singles[("N4", "CoT")]})
    out = predicted(one, base, BlockTable(path), contended)
    assert out["ratio"] == pytest.approx(1.12) and not out["accepted"]
    assert placement_key(singles[("N4", "CoT")]) not in BlockTable(path).costs


def test_the_cache_key_names_the_machine_runtime_and_timing_settings(tmp_path):
    ident = {**LatencySettings().identity(), "node": "x"}
    a = table_path(tmp_path, ident, "base1")
    assert a == table_path(tmp_path, {**ident, "node": "y"}, "base1"), "the hostname is not part of it"
    assert a != table_path(tmp_path, ident, "base2")
    assert a != table_path(tmp_path, {**ident, "device_model": "another CPU"}, "base1")
    assert a != table_path(tmp_path, {**ident, "backend_version": "0.0"}, "base1")
    assert a != table_path(tmp_path, {**ident, "threads": 7}, "base1")
