"""A study on a real PostgreSQL server (started from the `pgserver` package's binaries, one per module): a search
killed with kill -9, resumed while the database restarts, exported, and read by optuna-dashboard; the storage's
retry never writes a trial twice and gives up in order."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import requests
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from search import export as search_export
from search.storage import study as st
from search.errors import SearchError
from search.storage.reconnect import DatabaseUnreachable, ReconnectingStorage
from test_dashboard import dashboard_server
from test_search_engine import REPO, _kill_group, search_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    """A real PostgreSQL server on a unix socket in tmp; stopped and deleted afterwards."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()


def stop_server(server) -> None:
    from pgserver import _commands

    _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "timed out waiting for the search"
        time.sleep(0.5)


def states(storage, name: str) -> list[str]:
    try:
        return [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
    except KeyError:  # not created yet
        return []


def kill_9_then_resume(out: Path, coco128: Path, url: str, while_resuming=None):
    """A two-trial search on ``url`` killed with kill -9 while trial 1 runs (trial 0 complete), then continued
    with ``--resume``; ``while_resuming()`` runs once the resumed driver has re-queued trial 1.
    Returns (trial 0 as it was before the kill, the resumed run)."""
    poll = st.open_storage(url)  # also creates the tables or file before the search opens them
    cmd = search_cmd(out, coco128, "--budget", "2", "--study-name", "s", "--workers", "1", "--weights", "none",
                     "--storage", url, "--inject-fault", "hang@1")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: {"COMPLETE", "RUNNING"} <= set(states(poll, "s")), proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a crash would
        proc.wait(timeout=30)
    finally:
        _kill_group(proc.pid)
    killed = optuna.load_study(study_name="s", storage=poll).trials
    resume = [sys.executable, "-m", "search.run", "--out", str(out), "--resume", "--study-name", "s",
              "--storage", url, "--budget", "2", "--workers", "1", "--no-export"]  # test_export runs search.export
    proc = subprocess.Popen(resume, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if while_resuming is not None:
            wait_for(lambda: len(states(poll, "s")) > len(killed), proc)
            while_resuming()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _kill_group(proc.pid)
    return killed[0], subprocess.CompletedProcess(resume, proc.returncode, stdout, stderr)


def assert_every_trial_kept_once(url: str, first: optuna.trial.FrozenTrial) -> list[optuna.trial.FrozenTrial]:
    trials = optuna.load_study(study_name="s", storage=st.open_storage(url)).trials
    assert trials[0].state == TrialState.COMPLETE and trials[0].values == first.values, "completed trial kept"
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["fail_kind"] == "driver-stopped"
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    # A create_new_trial retried after a commit whose reply was lost would leave an orphan RUNNING trial.
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    requeued = [t for t in trials if t.user_attrs.get("requeued_from") == 1]
    assert len(requeued) == 1 and requeued[0].state == TrialState.COMPLETE
    return trials


def assert_requeue_said(stderr: str) -> None:
    """The resumed run names what it re-queued (trial 2 may have been sampled ahead when the driver died)."""
    assert re.search(r"re-queued [12] trial\(s\) a stopped driver left running \(1(, 2)?\)", stderr), stderr[-3000:]


@pytest.fixture(scope="module")
def searched(pg, tmp_path_factory, coco128):
    """The search on PostgreSQL; the server is stopped for 3 s and started again while the resumed run works."""
    def restart() -> None:
        stop_server(pg)
        time.sleep(3)
        pg.ensure_postgres_running()

    out, url = tmp_path_factory.mktemp("pgsearch"), pg.get_uri()
    first, res = kill_9_then_resume(out, coco128, url, while_resuming=restart)
    return out, url, first, res


def test_kill_9_resume_and_a_database_restart_keep_every_trial_once(searched):
    _, url, first, res = searched
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("database unreachable") == 1 and "database reachable again after" in res.stderr
    assert_every_trial_kept_once(url, first)
    assert_requeue_said(res.stderr)


def test_export_from_postgresql(searched):
    out, url, _, _ = searched
    assert not (out / "s" / "pareto.csv").exists()
    assert search_export.main(["--study", "s", "--storage", url, "--out", str(out)]) == 0
    assert (out / "s" / "pareto.csv").read_text().startswith("trial,")
    assert (out / "s" / "summary.json").is_file() and list((out / "s" / "pareto").glob("*.yaml"))


def dashboard_trials(stdout: str, study_name: str) -> list[dict]:
    """The trials optuna-dashboard serves for ``study_name``, started with the command the search printed."""
    command = next(line for line in stdout.splitlines() if line.startswith("Dashboard: ")).split(": ", 1)[1]
    with dashboard_server(command) as url:
        studies = requests.get(f"{url}/api/studies", timeout=10).json()["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == study_name]
        return requests.get(f"{url}/api/studies/{summary['study_id']}", timeout=10).json()["trials"]


def test_dashboard_reads_the_postgresql_study(searched):
    _, url, _, res = searched
    served = dashboard_trials(res.stdout, "s")
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t["number"] for t in served] == [t.number for t in trials]
    assert sum(t["state"] == "Complete" for t in served) == 2


class _LostReplies:
    """The real storage, but the next write named in ``lose`` commits and then reports a dropped connection (the
    reply lost on the way back), as a server restart between commit and reply would."""

    def __init__(self, backend, lose: set[str]) -> None:
        self._backend, self.lose = backend, lose

    def __getattr__(self, name):
        method = getattr(self._backend, name)
        if name not in self.lose:
            return method

        def committed_then_dropped(*args, **kwargs):
            self.lose.discard(name)
            method(*args, **kwargs)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

        return committed_then_dropped


def test_a_retried_write_whose_commit_went_through_is_not_made_twice(pg):
    url = pg.get_uri()
    plain = st.open_storage(url)
    backend = _LostReplies(plain._backend, {"create_new_trial", "set_trial_state_values"})
    storage = ReconnectingStorage(backend, url, budget_s=5)
    study = optuna.create_study(study_name="lost-replies", storage=storage, directions=["maximize"])
    trial = study.ask()
    study.tell(trial, 1.0)
    trials = optuna.load_study(study_name="lost-replies", storage=url).trials
    assert [(t.number, t.state, t.values) for t in trials] == [(0, TrialState.COMPLETE, [1.0])]
    assert not backend.lose, "both writes lost their reply once"


def test_a_database_down_past_the_budget_stops_with_one_error_then_fails_fast(pg):
    url = pg.get_uri()
    storage = st.open_storage(url)
    storage._budget_s = 1.5
    study = optuna.create_study(study_name="down", storage=storage, directions=["maximize"])
    stop_server(pg)
    try:
        t0 = time.monotonic()
        with pytest.raises(DatabaseUnreachable, match="did not answer for 1.5 s"):
            study.ask()
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        with pytest.raises(DatabaseUnreachable):  # a stopping search does not wait again for each write
            study.set_user_attr("k", 1)
        assert time.monotonic() - t0 < 1
    finally:
        pg.ensure_postgres_running()
    study.set_user_attr("k", 2)  # back: the same storage works again
    assert optuna.load_study(study_name="down", storage=url).user_attrs["k"] == 2


def test_postgresql_url_without_its_driver_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what an install without the extra sees
    with pytest.raises(SearchError, match=r"pip install 'attnas\[postgres\]'") as err:
        st.open_storage("postgresql://user:secret@db.example/study")
    assert "secret" not in str(err.value) and "\n" not in str(err.value)
