"""What a person sees while a search runs (issue 21): the estimate of the time left from measured epoch times, and
the one status line, live on a terminal (a pseudo-terminal here) and as plain periodic lines in a pipe."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time

import optuna
import pytest

from search import objectives as obj
from search.progress import EpochPlan, Progress, TrainingCost, promotions, spent
from search.storage import study as st

TABLE = obj.parse("mAP50-95,latency_ms")


def test_the_plan_counts_epochs_as_successive_halving_spends_them():
    plan = EpochPlan(rungs=(1, 3, 9), eta=3, budget=27, confirm_seeds=1, workers=2)
    # 27 candidates x 1 epoch, 9 go on for 2 more, 3 for 6 more; then 2 front trials and the base x 9 epochs.
    assert plan.expected(to_confirm=3) == 27 * 1 + 9 * 2 + 3 * 6 + 3 * 9
    assert EpochPlan((5,), 3, 10, 0, 1).expected(to_confirm=5) == 50, "one rung: every candidate the whole way"
    # 10 epochs spent at 5 s each, two at a time: (90 - 10) * 5 / 2.
    assert plan.seconds_left((10, 10), to_confirm=3, cost=TrainingCost(0.0, 5.0)) == 200
    assert plan.seconds_left((10, 10), to_confirm=3, cost=None) is None
    assert plan.seconds_left((500, 500), to_confirm=3, cost=TrainingCost(0.0, 5.0)) == 0


def test_a_training_costs_a_fixed_part_and_its_epochs_fitted_from_the_finished_ones():
    assert TrainingCost.fit([]) is None
    assert TrainingCost.fit([(1, 25.0), (1, 27.0)]) == TrainingCost(0.0, 26.0), "one length: all of it per epoch"
    fitted = TrainingCost.fit([(1, 25.0), (2, 40.0), (6, 100.0)])  # 10 s a training + 15 s an epoch
    assert fitted.per_training == pytest.approx(10.0) and fitted.per_epoch == pytest.approx(15.0)
    assert TrainingCost.fit([(2, 60.0), (1, 180.0)]) == TrainingCost(0.0, 80.0), "a fit that is not positive"
    # rungs 1,3 of 6 candidates: 6 x 1 + 2 x 2 = 10 epochs in 6 + 2 = 8 trainings; 4 of each done, two at a time.
    plan = EpochPlan(rungs=(1, 3), eta=3, budget=6, confirm_seeds=0, workers=2)
    assert plan.work(to_confirm=0) == (10, 8)
    assert plan.seconds_left((4, 4), to_confirm=0, cost=fitted) == pytest.approx(((10 - 4) * 15 + (8 - 4) * 10) / 2)
    # At the end one training is left (2 epochs to the top rung): it runs on one worker, not shared by two.
    assert plan.seconds_left((8, 7), to_confirm=0, cost=fitted) == pytest.approx(10 + 2 * 15)


def test_the_plan_learns_how_many_candidates_go_on_from_the_study():
    plan = EpochPlan(rungs=(1, 3, 9), eta=3, budget=50, confirm_seeds=0, workers=2)
    # Asynchronous halving's measured end state: 20 of 50 went on to rung 3, 10 of those 20 to rung 9. The share is
    # estimated with eta prior results of which one goes on, and never below the count already there.
    assert plan.expected(0, [(50, 20), (20, 10)]) == 50 * 1 + 20 * 2 + 10 * 6
    # Early on, 12 results of which 6 went on: (6 + 1) / (12 + 3) of 50 reach rung 3, then 1 / 3 of those rung 9.
    reaching = 50 * 7 / 15
    assert plan.expected(0, [(12, 6), (0, 0)]) == pytest.approx(50 + reaching * 2 + reaching / 3 * 6)
    assert plan.expected(0, [(0, 0), (0, 0)]) == plan.expected(0), "no results yet: 1 / eta"


def test_promotions_count_candidates_under_way_and_stopped(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'q.db'}", study_name="q",
                                directions=obj.directions(TABLE))
    at_rung_1 = {st.RUNG_RESULTS: {"1": [0.1, 4.0]}}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs=at_rung_1))  # stopped
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING,  # promoted, training rung 3
                                              user_attrs={**at_rung_1, "promoted_to": 3}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, user_attrs=at_rung_1))  # waits
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING))  # training rung 1
    study.add_trial(optuna.trial.create_trial(  # a copy of a result counts once, at its source
        state=optuna.trial.TrialState.PRUNED, user_attrs={**at_rung_1, "promoted_to": 3, "reused_from": 1}))
    assert promotions(study, (1, 3, 9)) == [(3, 1), (0, 0)]


def _study(tmp_path) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'p.db'}", study_name="p",
                                directions=obj.directions(TABLE))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[0.30, 4.0],
                                              user_attrs={st.RUNG_RESULTS: {"1": [0.1, 4.0], "3": [0.3, 4.0]}}))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[0.20, 2.0]))
    return study


def test_the_estimate_is_refined_from_measured_epoch_times_and_counts_down(tmp_path):
    study = _study(tmp_path)
    assert spent(study, top_epochs=3)[0] == 3 + 3, "a candidate counts the epochs of the last rung it finished"
    assert promotions(study, (1, 3)) == [(1, 1)], "the candidate with results at rungs 1 and 3 went on"
    assert spent(study, top_epochs=3)[1] == 2 + 1, "one training per rung finished, one for a candidate without rungs"
    now = [0.0]
    progress = Progress(study, TABLE, EpochPlan((1, 3), 3, 6, 0, 1), verbose=False, clock=lambda: now[0])
    assert progress.status().endswith("time left: estimated after the first training")
    progress.trained(epochs=2, seconds=60.0)  # 30 s an epoch
    progress.tick(running=1)
    line = progress.status()
    # expected: the one result at rung 1 went on, so (1 + 1) / (1 + 3) of the 6 candidates reach rung 3:
    # 6 x 1 + 3 x 2 = 12 epochs; spent 6 + 2 = 8; 4 left x 30 s.
    assert line.startswith("1 training, 8/12 epochs, front: mAP50-95 0.3000, latency_ms 2.00 (2 trials)"), line
    assert line.endswith("~2 min left"), line
    now[0] = 60.0  # the training under way spends the time left
    assert progress.status().endswith("~60 s left")
    now[0] = 200.0  # later than the estimate: it stays at 30 s until the training reports
    assert progress.status().endswith("~30 s left")
    progress.trained(epochs=1, seconds=60.0)  # slower epochs: (60 + 60) / 3 = 40 s each, 3 epochs left
    assert progress.status().endswith("~2 min left")
    progress.close()


CHILD = """
import sys, time, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
from search import objectives as obj
from search.progress import EpochPlan, Progress
study = optuna.create_study(storage="sqlite:///" + sys.argv[1], study_name="p", directions=["maximize", "minimize"])
progress = Progress(study, obj.parse("mAP50-95,latency_ms"), EpochPlan((1,), 3, 4, 0, 2), verbose=False,
                    every_s=0.0)
for running in (2, 1):
    progress.tick(running)
    progress.note("trial 0: an event for the log only")
progress.say("confirming the front: a stage")
progress.close()
"""


def test_the_status_line_is_a_live_bar_on_a_terminal(tmp_path):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal 160 columns wide
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "p.db")], stdin=subprocess.DEVNULL,
                             stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    shown, deadline = b"", time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    assert child.wait(timeout=30) == 0, shown.decode(errors="replace")
    os.close(leader)
    text = shown.decode(errors="replace")
    assert "\r" in text and "candidates: 0/4" in text, text  # redrawn in place
    assert "2 training, 0/4 epochs" in text and "1 training, 0/4 epochs" in text, text
    assert "confirming the front: a stage" in text and "an event for the log only" not in text


def test_the_status_line_is_a_plain_line_in_a_pipe(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "p.db")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr
    assert lines[:2] == ["[0/4] 2 training, 0/4 epochs, time left: estimated after the first training",
                         "[0/4] 1 training, 0/4 epochs, time left: estimated after the first training"], lines
    assert lines[2:] == ["confirming the front: a stage"], "events go to the log (--verbose shows them)"


@pytest.mark.parametrize("verbose", [False, True])
def test_events_go_to_the_log_and_to_the_console_with_verbose(tmp_path, capsys, verbose, caplog):
    import logging

    log = logging.getLogger("attnas.test-progress")
    progress = Progress(_study(tmp_path), TABLE, EpochPlan((3,), 3, 4, 0, 1), log, verbose=verbose)
    with caplog.at_level(logging.INFO, logger=log.name):
        progress.note("trial 7: an event")
    progress.close()
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["trial 7: an event"]
    assert ("trial 7: an event" in capsys.readouterr().err) == verbose


def test_the_end_report_counts_trials_a_stop_cut_short_apart_from_failures(tmp_path, capsys):
    from search.front.report import report

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}", study_name="r",
                                directions=obj.directions(TABLE))
    for kind in ("driver-stopped", "driver-stopped", "exception"):
        trial = study.ask()
        st.fail(study, trial, kind, "why")
    report(study, TABLE, (1,), f"sqlite:///{tmp_path / 'r.db'}", tmp_path, wall=12.0)
    first = capsys.readouterr().out.strip().splitlines()[0]
    assert first == "0 completed, 1 failed, 2 cut short by a stop and queued again trial(s) in the study; " \
                    "this run took 12 s", first


def test_the_confirmation_is_expected_to_train_the_base_once_when_it_is_on_the_front(tmp_path):
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'c.db'}", study_name="c",
                                directions=obj.directions(TABLE))
    placement = {"placement": CategoricalDistribution(["none", "P4:CGA"])}
    study.add_trial(optuna.trial.create_trial(params={"placement": "none"}, distributions=placement,
                                              values=[0.30, 4.0]))  # the base, on the front
    study.add_trial(optuna.trial.create_trial(params={"placement": "P4:CGA"}, distributions=placement,
                                              values=[0.35, 5.0]))
    progress = Progress(study, TABLE, EpochPlan((1,), 3, 2, 1, 1), verbose=False, every_s=10**9)
    # 2 candidates x 1 epoch, then one more seed of the 2 front trials (the base among them) x 1 epoch: 4, not 5.
    assert progress.status().startswith("0 training, 2/4 epochs, front:"), progress.status()
    progress.close()
