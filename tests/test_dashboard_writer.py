"""optuna-dashboard as a second writer during a real search (issue 12): a real server on localhost, its own HTTP API
(fail / complete a running trial, rename and delete the study), a real search on real Ray, SQLite and Ultralytics.

One search does the trial actions and the rename (trials 1-3 hang until the dashboard acts, so there is always a
running trial to act on); the command in the renamed study's note then finishes it; a second tiny search is deleted.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import requests
from optuna.trial import TrialState

from search.storage import study as st  # its open_storage retries the race of two processes creating one database
from search.front import pareto

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ["--imgsz", "64", "--epochs", "1", "--confirm-seeds", "0", "--fraction", "8,8", "--batch", "4", "--latency-imgsz", "64",
        "--latency-runs", "3", "--latency-ci", "0", "--latency-warmup", "1", "--weights", "none"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left behind
        except ProcessLookupError:
            pass


def _wait(what: str, check, timeout: float = 180.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the search ended while waiting for {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


class Dashboard:
    """A real optuna-dashboard server on a storage, driven through its HTTP API."""

    def __init__(self, storage_url: str, artifacts: Path) -> None:
        port = _free_port()
        exe = Path(sys.executable).with_name("optuna-dashboard")
        self.server = subprocess.Popen([str(exe), storage_url, "--artifact-dir", str(artifacts), "--port", str(port),
                                        "--host", "127.0.0.1", "--quiet"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{port}"
        _wait("optuna-dashboard", self._up, timeout=30)

    def _up(self) -> bool:
        assert self.server.poll() is None, self.server.stderr.read()
        try:
            return requests.get(f"{self.url}/api/meta", timeout=1).ok
        except requests.ConnectionError:
            return False

    def study_id(self, name: str) -> int | None:
        studies = requests.get(f"{self.url}/api/studies", timeout=10).json()["study_summaries"]
        return next((s["study_id"] for s in studies if s["study_name"] == name), None)

    def trials(self, study_id: int) -> list[dict]:
        return requests.get(f"{self.url}/api/studies/{study_id}", timeout=10).json()["trials"]

    def running_and_timed(self, study_id: int, number: int) -> dict | None:
        """The trial when it runs and its latency is measured (its training is submitted or under way)."""
        for t in self.trials(study_id):
            keys = {a["key"] for a in t["user_attrs"]}
            if t["number"] == number and t["state"] == "Running" and "latency_ms" in keys:
                return t
        return None

    def close(self) -> None:
        self.server.terminate()
        self.server.wait(timeout=10)


def _search(tmp_path: Path, coco128: Path, name: str, space_yaml: str, *extra: str) -> tuple[list[str], Path, Path, str]:
    """The command of a tiny real search (TINY settings) over ``space_yaml``, its --out, database and storage URL."""
    out, space = tmp_path / "out", tmp_path / "space.yaml"
    space.write_text(space_yaml)
    cmd = [sys.executable, "-m", "search.run", "--out", str(out), "--study-name", name, "--space", str(space),
           "--data", str(coco128 / "coco128.yaml"), *TINY, *extra]
    db = out / name / "study.db"
    return cmd, out, db, f"sqlite:///{db}"


def test_dashboard_actions_during_a_real_search(tmp_path, coco128):
    # One attention layer at N5: many distinct candidates, no base trial.
    cmd, out, db, url = _search(tmp_path, coco128, "live", "slots: [N5]\nmodes: [insert]\nmin_layers: 1\nmax_layers: 1\n",
                                "--budget", "3", "--workers", "2", "--inject-fault", "hang@1", "--inject-fault",
                                "hang@2", "--inject-fault", "hang@3")
    search = _start(cmd)
    dash = None
    try:
        _wait("the study", lambda: db.is_file() and "live" in st.study_names(url), proc=search)
        dash = Dashboard(url, out / "live" / "artifacts")
        sid = dash.study_id("live")
        # Fail trial 1 while it trains: "stop this one".
        t1 = _wait("trial 1 training", lambda: dash.running_and_timed(sid, 1), proc=search)
        assert requests.post(f"{dash.url}/api/trials/{t1['trial_id']}/tell", json={"state": "Fail"},
                             timeout=10).status_code == 204
        # Complete trial 2 by hand while it trains (its worker was freed by stopping trial 1).
        t2 = _wait("trial 2 training", lambda: dash.running_and_timed(sid, 2), proc=search)
        assert requests.post(f"{dash.url}/api/trials/{t2['trial_id']}/tell",
                             json={"state": "Complete", "values": [0.99, 0.01]}, timeout=10).status_code == 204
        # Rename the study while trial 3 trains: the search stops in order and says how to continue.
        _wait("trial 3 training", lambda: dash.running_and_timed(sid, 3), proc=search)
        renamed = requests.post(f"{dash.url}/api/studies/{sid}/rename", json={"study_name": "live-2"}, timeout=30)
        assert renamed.status_code == 201, renamed.text
        stdout, stderr = _finish(search, timeout=120)
    finally:
        if dash is not None:
            dash.close()
        _finish(search, timeout=1) if search.poll() is None else None
    assert search.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("search stopped: study 'live' was renamed to 'live-2' while the search ran; "
                           "continue it with: python -m search.run --resume --study-name live-2"), last

    study = optuna.load_study(study_name="live-2", storage=url)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[1].state == TrialState.FAIL and trials[2].state == TrialState.COMPLETE
    assert trials[2].values == [0.99, 0.01], "values given by hand are kept"
    changes = study.user_attrs["attnas_outside_changes"]
    assert changes == {"1": "stopped-from-dashboard", "2": "completed-by-hand"}
    assert "traceback" not in trials[1].user_attrs and "fail_kind" not in trials[1].user_attrs, "told only once"
    assert not any(t.user_attrs.get("requeued_from") == 1 for t in trials.values()), "a stopped trial stays stopped"
    assert study.user_attrs["attnas_driver"] == {}, "the renamed copy is free to resume"
    from optuna_dashboard import get_note

    note = get_note(study)
    assert "live-2" in note and "### Pareto front" in note and "### Settings" in note
    trial_note = get_note(optuna.Trial(study, trials[1]._trial_id))
    assert trial_note.startswith("**Candidate**: `N5:") and "/artifacts/" in trial_note and ".yaml" in trial_note

    # The note's resume command, run as written, finishes the renamed study.
    block = note.split("Resume after a stop", 1)[1].split("```")[1].strip()
    argv = shlex.split(block)
    assert argv[:3] == ["python", "-m", "search.run"]
    resumed = _start([sys.executable, *argv[1:]])
    stdout, stderr = _finish(resumed, timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    study = optuna.load_study(study_name="live-2", storage=url)
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and any(t.user_attrs.get("requeued_from") == 3 for t in done)
    from search import objectives as obj

    front = pareto.pareto_trials(study, obj.parse("mAP50-95,latency_ms"))
    assert 2 not in {t.number for t in front}, "a trial completed by hand is left out of the front"
    assert 2 in {t.number for t in pareto.pareto_trials(study, obj.parse("mAP50-95,latency_ms"), include_by_hand=True)}
    assert not any("trial-0002" in p.name for p in (out / "live" / "pareto").glob("*.yaml"))


def test_deleting_the_study_from_the_dashboard_stops_the_search(tmp_path, coco128):
    cmd, out, db, url = _search(tmp_path, coco128, "gone", "max_layers: 0\n", "--budget", "1", "--inject-fault", "hang@0")
    search = _start(cmd)
    dash = None
    try:
        _wait("the study", lambda: db.is_file() and "gone" in st.study_names(url), proc=search)
        dash = Dashboard(url, out / "gone" / "artifacts")
        sid = dash.study_id("gone")
        _wait("trial 0 training", lambda: dash.running_and_timed(sid, 0), proc=search)
        assert requests.delete(f"{dash.url}/api/studies/{sid}", json={}, timeout=30).status_code == 204
        t0 = time.monotonic()
        stdout, stderr = _finish(search, timeout=60)
        assert time.monotonic() - t0 < 30, "the search notices within a few polls"
    finally:
        if dash is not None:
            dash.close()
    assert search.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ("search stopped: study 'gone' was deleted while the search ran "
                                               "(optuna-dashboard?); nothing to continue")
    assert optuna.get_all_study_names(url) == []
