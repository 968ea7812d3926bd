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
from search.progress import EpochPlan, Progress, epochs_spent
from search.storage import study as st

TABLE = obj.parse("mAP50-95,latency_ms")


def test_the_plan_counts_epochs_as_successive_halving_spends_them():
    plan = EpochPlan(rungs=(1, 3, 9), eta=3, budget=27, confirm_seeds=1, workers=2)
    # 27 candidates x 1 epoch, 9 go on for 2 more, 3 for 6 more; then 2 front trials and the base x 9 epochs.
    assert plan.expected(front_size=2) == 27 * 1 + 9 * 2 + 3 * 6 + 3 * 9
    assert EpochPlan((5,), 3, 10, 0, 1).expected(front_size=4) == 50, "one rung: every candidate the whole way"
    # 10 epochs spent at 5 s each, two at a time: (90 - 10) * 5 / 2.
    assert plan.seconds_left(spent=10, front_size=2, seconds_per_epoch=5.0) == 200
    assert plan.seconds_left(spent=10, front_size=2, seconds_per_epoch=None) is None
    assert plan.seconds_left(spent=500, front_size=2, seconds_per_epoch=5.0) == 0


def _study(tmp_path) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'p.db'}", study_name="p",
                                directions=obj.directions(TABLE))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[0.30, 4.0],
                                              user_attrs={st.RUNG_RESULTS: {"1": [0.1, 4.0], "3": [0.3, 4.0]}}))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[0.20, 2.0]))
    return study


def test_the_estimate_is_refined_from_measured_epoch_times_and_counts_down(tmp_path):
    study = _study(tmp_path)
    assert epochs_spent(study, top_epochs=3) == 3 + 3, "a candidate counts the epochs of the last rung it finished"
    now = [0.0]
    progress = Progress(study, TABLE, EpochPlan((1, 3), 3, 6, 0, 1), verbose=False, clock=lambda: now[0])
    assert progress.status().endswith("time left: estimated after the first training")
    progress.trained(epochs=2, seconds=60.0)  # 30 s an epoch
    progress.tick(running=1)
    line = progress.status()
    # expected: 6 x 1 + 2 x 2 = 10 epochs; spent 6 + 2 = 8; 2 left x 30 s.
    assert line.startswith("1 training, 8/10 epochs, front: mAP50-95 0.3000, latency_ms 2.00 (2 trials)"), line
    assert line.endswith("~60 s left"), line
    now[0] = 20.0  # the training under way spends the time left
    assert progress.status().endswith("~40 s left")
    now[0] = 100.0  # later than the estimate: it stays at 30 s until the training reports
    assert progress.status().endswith("~30 s left")
    progress.trained(epochs=1, seconds=180.0)  # slower epochs: (60 + 180) / 3 = 80 s each, 1 epoch left
    assert progress.status().endswith("~80 s left")
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
