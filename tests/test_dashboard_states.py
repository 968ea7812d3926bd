"""A trial finished from optuna-dashboard at each stage the driver holds it (issue 22): while its latency is
measured, while it waits at a rung, while it is confirmed. Only that trial stops; every other trial goes on.

The dashboard's Fail / Complete is one storage call (``optuna_dashboard``'s tell handler calls
``storage.set_trial_state_values``); here a second storage on the same SQLite file makes exactly that call at the
stage under test, from inside the driver's pool (test_dashboard_writer.py drives a real server during a real search).
"""

from dataclasses import replace

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from search.engine.work import InProcessPool
from search.storage import study as st
from space import SpaceConfig, build_space, load_base
from test_driver import LATENCY, SCHEDULE, make_driver, new_study, rung_driver, storage_of


pytestmark = pytest.mark.slow  # real trainings, in this process

class Dashboard:
    """The dashboard's tell, on its own connection to the study's database."""

    def __init__(self, tmp_path) -> None:
        self.storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")

    def tell(self, study: optuna.Study, number: int, state: TrialState, values=None) -> None:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        self.storage.set_trial_state_values(trial_id, state, values)


class ActingPool(InProcessPool):
    """InProcessPool that calls ``act()`` just before (or, ``after``, just after) the work of (kind, key) runs:
    something outside the driver happens while it holds that trial at that stage."""

    def __init__(self, when: tuple[str, object], act, after: bool = False) -> None:
        super().__init__(LATENCY, workers=1)
        self.when, self.act, self.after, self.acted = when, act, after, False

    def wait(self, timeout_s: float):
        due = self._queue and not self.acted and (self._queue[0][1], self._queue[0][0]) == self.when
        if due and not self.after:
            self.acted = True
            self.act()
        events = super().wait(timeout_s)
        if due and self.after:
            self.acted = True
            self.act()
        return events


@pytest.fixture(scope="module")
def two_places():
    return build_space(load_base("yolov8n.yaml"), SpaceConfig(slots=("N4", "N5"), modules={"CGA": {}},
                                                              modes=("insert",), min_layers=1, max_layers=1))


@pytest.mark.parametrize("state", [TrialState.FAIL, TrialState.COMPLETE])
def test_finished_while_its_latency_is_measured(tmp_path, coco128, two_places, state):
    study = new_study(tmp_path, enqueue_base=False)
    dashboard = Dashboard(tmp_path)
    values = [0.5, 1.0, 1.0] if state == TrialState.COMPLETE else None
    pool = ActingPool(("latency", 0), lambda: dashboard.tell(study, 0, state, values))
    driver = make_driver(study, two_places, tmp_path, coco128, budget=2, pool=pool, lookahead=0)
    driver.run()
    trials = study.get_trials(deepcopy=False)
    assert pool.acted and trials[0].state == state and trials[0].values == values, "the dashboard's word stands"
    assert ("train", 0) not in pool.log, "its training never started"
    assert st.outside_changes(study) == {"0": "stopped-from-dashboard" if state == TrialState.FAIL
                                         else "completed-by-hand"}
    others = [t for t in trials[1:] if t.state == TrialState.COMPLETE]
    assert len(others) >= (2 if state == TrialState.FAIL else 1), "the other trials went on to the budget"
    assert all("latency_ms" in t.user_attrs for t in others), "the meter timed every later candidate"


def test_failed_while_it_waits_at_a_rung(tmp_path, coco128):
    space = build_space(load_base("yolov8n.yaml"), SpaceConfig(slots=("N5",), modules={"CGA": {}},
                                                               modes=("insert",), min_layers=1, max_layers=1))
    study = new_study(tmp_path, enqueue_base=False)
    driver = rung_driver(study, space, tmp_path, coco128, budget=3)
    while not driver.rungs.paused:  # until a candidate waits between rungs
        driver._step()
    (number,) = driver.rungs.paused
    checkpoint = driver.rungs.paused[number].checkpoint
    Dashboard(tmp_path).tell(study, number, TrialState.FAIL)
    driver.run()
    stopped = study.trials[number]
    assert stopped.state == TrialState.FAIL and st.outside_changes(study) == {str(number): "stopped-from-dashboard"}
    assert not any(job.resume == checkpoint for jobs in driver.pool.jobs.values() for job in jobs), \
        "a stopped candidate is never promoted"
    assert checkpoint and not (tmp_path / checkpoint).exists(), "its rung checkpoint is deleted"
    assert len(st.counted_trials(study)) == 3, "the others fill the budget"
    resumed = rung_driver(study, space, tmp_path, coco128, budget=4)  # a later run rebuilds the ladder
    assert all(number not in results for results in resumed.rungs.ladder.results), "and it stays off the ladder"


def test_the_dashboard_cannot_finish_a_trial_under_confirmation(tmp_path, coco128):
    """Confirmation retrains COMPLETE trials: the dashboard's tell is refused (as its API answers), and the
    confirmation goes on to record every seed."""
    base_only = build_space(load_base("yolov8n.yaml"), SpaceConfig(max_layers=0))
    study = new_study(tmp_path)
    refused = []

    def act() -> None:
        with pytest.raises(UpdateFinishedTrialError):
            Dashboard(tmp_path).tell(study, 0, TrialState.FAIL)
        refused.append(0)

    pool = ActingPool(("train", ("confirm", 0, 1)), act)
    driver = make_driver(study, base_only, tmp_path, coco128, budget=1, pool=pool,
                         schedule=replace(SCHEDULE, epochs=1))
    driver.run()
    driver.confirm(seeds=1)
    assert refused and study.trials[0].state == TrialState.COMPLETE
    assert study.user_attrs[st.CONFIRM_ATTR]["0"]["offsets"] == [1] and not st.outside_changes(study)


class DashboardServer:
    """optuna-dashboard's own application (``optuna_dashboard.wsgi``) served on localhost from a thread."""

    def __init__(self, storage) -> None:
        import threading
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        import optuna_dashboard

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args) -> None:
                pass

        self.server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(storage), handler_class=Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def get(self, path: str):
        import requests

        return requests.get(self.url + path, timeout=30).json()

    def close(self) -> None:
        self.server.shutdown()


def test_rung_results_are_plotted_in_the_dashboard_while_candidates_wait(tmp_path, coco128):
    """Issue 21: each rung below the top has a companion study, ``d · rung 1``, with one COMPLETE trial per result
    at that rung (the candidate's parameters), readable through the dashboard's API while the candidates wait;
    the main study still tells only top-rung results."""
    space = build_space(load_base("yolov8n.yaml"), SpaceConfig(slots=("N4", "N5"), modules={"CGA": {}},
                                                               modes=("insert",), min_layers=1, max_layers=1))
    study = new_study(tmp_path, enqueue_base=False)
    driver = rung_driver(study, space, tmp_path, coco128, budget=3)
    for _ in range(200):  # until the first candidate has its rung-1 result: alone at its rung, it waits there
        if driver.rungs.ladder.results[0]:
            break
        driver._step()
    assert driver.rungs.paused, "a candidate waits at rung 1"
    waiting = {n: st.rung_results(study.trials[n])[1] for n in driver.rungs.ladder.results[0]}
    server = DashboardServer(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}"))
    try:
        studies = {s["study_name"]: s["study_id"] for s in server.get("/api/studies")["study_summaries"]}
        assert set(studies) == {"d", "d · rung 1"}
        shown = server.get(f"/api/studies/{studies['d · rung 1']}")
        assert shown["objective_names"] == ["mAP50-95", "latency_ms", "params"]
        by_trial = {int(next(a["value"] for a in t["user_attrs"] if a["key"] == "trial")): t for t in shown["trials"]}
        assert set(by_trial) == set(waiting)
        for number, values in waiting.items():
            t = by_trial[number]
            assert t["state"] == "Complete" and t["values"] == pytest.approx(values)
            assert {p["name"]: p["param_internal_value"] for p in t["params"]} == pytest.approx(
                {k: study.trials[number].distributions[k].to_internal_repr(v)
                 for k, v in study.trials[number].params.items()})
        main = server.get(f"/api/studies/{studies['d']}")
        assert all(t["state"] == "Running" and not t.get("values") for t in main["trials"]
                   if t["number"] in driver.rungs.paused), "the main study holds top-rung results only"
    finally:
        server.close()
    assert st.study_names(f"sqlite:///{tmp_path / 'study.db'}") == ["d"], "companions are not studies to resume"
    driver.run()  # to the budget: a promoted candidate's top-rung result goes to the main study only
    companion = optuna.load_study(study_name="d · rung 1", storage=storage_of(tmp_path))
    assert len(companion.trials) == len(st.counted_trials(study)), "every candidate's rung-1 result, once"
