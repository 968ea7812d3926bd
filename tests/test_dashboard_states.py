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
from test_driver import LATENCY, SCHEDULE, make_driver, new_study, rung_driver


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
