"""A stop at every stage of a real search (issue 22): SIGTERM while the base trains, Ctrl-C (SIGINT) while the front
is confirmed, a full disk while it is confirmed, SIGTERM while it is exported. Each ends with one line saying what
to run next, a non-zero exit and no traceback; the same command then continues, and the last run finishes with
every result kept.

Real local Ray, SQLite and Ultralytics (tiny settings: one base-only candidate, 1 epoch at 64 px, 8 images); --out
on a real small tmpfs (tests/conftest.py ``small_disk``), the study database beside it.
"""

import json
import os
import signal
import subprocess
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from search import run as search_run
from search.storage import study as st
from test_search_engine import REPO, search_cmd

pytestmark = pytest.mark.slow


class Search:
    """``python -m search.run`` in its own process group, its stderr read line by line as it comes."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")),
                                       daemon=True)
        self.reader.start()

    def when(self, text: str, action, after_s: float, timeout: float = 240) -> None:
        """Run ``action()`` ``after_s`` seconds after a line containing ``text`` appears."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, f"ended before {text!r}: {''.join(self.lines)[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
            time.sleep(0.05)
        time.sleep(after_s)
        assert self.proc.poll() is None, f"ended before acting: {''.join(self.lines)[-3000:]}"
        action()

    def signal_when(self, text: str, sig: signal.Signals, after_s: float) -> None:
        self.when(text, lambda: self.proc.send_signal(sig), after_s)

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        try:
            status = self.proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever Ray left behind
            except ProcessLookupError:
                pass
        self.reader.join(timeout=10)
        return status, "".join(self.lines)


def stopped(search: Search, expected_start: str, status: int = 130) -> str:
    code, err = search.finish()
    assert code == status, err[-3000:]
    assert "Traceback" not in err, err[-4000:]
    assert err.strip().splitlines()[-1].startswith(expected_start), err[-3000:]
    return err


@pytest.mark.disk_mb(400)  # the base's checkpoints and weights fit; filled on purpose in step 3
def test_a_search_stopped_at_each_stage_continues_to_the_end(tmp_path, coco128, small_disk, capsys):
    space = tmp_path / "base-only.yaml"
    space.write_text("max_layers: 0\n")
    out, url = small_disk.path, f"sqlite:///{tmp_path / 's.db'}"
    cmd = search_cmd(out, coco128, "--study-name", "s", "--storage", url, "--space", str(space), "--budget", "1",
                     "--weights", "auto", "--confirm-seeds", "1")
    resume = f"continue with: python -m search.run --resume --study-name s --out {out} --storage {url}"

    def load_study():
        return optuna.load_study(study_name="s", storage=url)

    # 1. SIGTERM (a scheduler's stop) while the base trains in the pool.
    first = Search(cmd)
    first.signal_when("training the base model once", signal.SIGTERM, after_s=1.0)
    stopped(first, f"interrupted: running trials were failed and queued again; {resume}")
    assert not (out / "s" / "base-weights.pt").exists()

    # 2. Ctrl-C while the front is confirmed: the base and its trial are done, the confirmation seed is not.
    second = Search(cmd)
    second.signal_when("confirming the front", signal.SIGINT, after_s=0.5)
    err = stopped(second, f"interrupted while confirming the front: the seeds not recorded yet train on resume; "
                          f"{resume}")
    assert (f"exported the front to {out / 's'} (unconfirmed: single top-rung runs; 1 confirmation training(s) "
            "still to run on resume)") in err, "a stopped run leaves a usable, flagged answer (issue 21)"
    assert json.loads((out / "s" / "summary.json").read_text())["confirmation"] == {
        "seeds": 1, "trainings_pending": 1, "confirmed": False}
    study = load_study()
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 1 and done[0].user_attrs["requeued_from"] == 0 and done[0].user_attrs["role"] == "base"
    assert (out / "s" / "base-weights.pt").is_file() and not study.user_attrs.get(st.CONFIRM_ATTR)
    weights_stamp = (out / "s" / "base-weights.pt").stat().st_mtime_ns

    # 3. The disk fills while the confirmation trains: exit 1, the seed is not recorded (it trains on resume).
    third = Search(cmd)
    third.when("confirming the front", small_disk.fill, after_s=0.0)
    seed_dir = out / "s" / "trials" / str(done[0].number) / "confirm-seed+1"
    stopped(third, f"search stopped: confirming trial {done[0].number}: no space left on the device of {seed_dir} "
                   f"while writing a training's files (its rung checkpoint, logs); free space there; then {resume}",
            status=1)
    assert not load_study().user_attrs.get(st.CONFIRM_ATTR)
    small_disk.free()

    # 4. SIGTERM while the front is exported (after the confirmation, which this run finishes).
    fourth = Search([*cmd, "--inject-fault", "hang@export"])
    fourth.signal_when("inject-fault: the export waits", signal.SIGTERM, after_s=0.2)
    stopped(fourth, "interrupted while exporting the front (the study is saved); export it with: "
                    f"python -m search.export --study s --out {out} --storage {url}")
    assert load_study().user_attrs[st.CONFIRM_ATTR][str(done[0].number)]["offsets"] == [1]

    # 5. The same command once more (in this process: with nothing left to train it starts no Ray): the confirmed
    # front is exported.
    assert search_run.main(cmd[3:]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "already holds 1 completed trial(s)" in err and "exported the front to" in err
    assert len(list((out / "s" / "pareto").glob("*.yaml"))) == 1
    assert json.loads((out / "s" / "summary.json").read_text())["confirmation"]["confirmed"] is True
    study = load_study()
    assert [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))] == [done[0].number]
    assert (out / "s" / "base-weights.pt").stat().st_mtime_ns == weights_stamp, "the base trained once more only"
