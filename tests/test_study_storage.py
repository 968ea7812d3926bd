"""Opening a study's storage while another process creates the same new SQLite database (a dashboard, a test
polling the study) must not fail the search; a SQLite study database locked by another process is waited for, for a
bounded time, and a full disk under it stops the write at once (issue 22)."""

import multiprocessing as mp
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.storage import study as st
from search.storage.reconnect import DatabaseFull, DatabaseUnreachable
from search.storage.study import open_storage, sqlite_storage


def _open(url: str) -> str:
    return type(open_storage(url)).__name__


def test_concurrent_creation_of_one_new_sqlite_database(tmp_path):
    for i in range(3):
        url = f"sqlite:///{tmp_path / f'race{i}.db'}"
        with mp.get_context("fork").Pool(6) as pool:
            assert pool.map(_open, [url] * 6) == ["ReconnectingStorage"] * 6
        assert optuna.get_all_study_names(url) == []


# Another process holding the database: BEGIN EXCLUSIVE blocks readers and writers, BEGIN IMMEDIATE only writers.
# It holds the lock for ``hold`` seconds, or until its stdin closes when ``hold`` is negative.
_HOLDER = """
import sqlite3, sys, time
db, mode, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
con = sqlite3.connect(db, isolation_level=None)
con.execute("BEGIN " + mode)
print("locked", flush=True)
sys.stdin.read() if hold < 0 else time.sleep(hold)
con.execute("ROLLBACK")
"""


@contextmanager
def held_lock(db: Path, mode: str = "EXCLUSIVE", hold_s: float = -1.0):
    """``db`` locked by another process from entry, for ``hold_s`` seconds (negative: until exit)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(db), mode, str(hold_s)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def _new_study(storage, name: str = "s") -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_database_locked_longer_than_the_patience_stops_the_write_with_one_line(tmp_path, capsys):
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    study = _new_study(open_storage(url, budget_s=2))  # SQLite's own busy timeout as in production (5 s)
    capsys.readouterr()
    with held_lock(db):
        t0 = time.monotonic()
        with pytest.raises(DatabaseUnreachable) as err:
            study.set_user_attr("k", 1)
        waited = time.monotonic() - t0
    assert 4.5 < waited < 8
    assert not isinstance(err.value, DatabaseFull)
    assert str(err.value) == (f"the study database {url} stayed locked by another process for 5 s (database is "
                              "locked); close the program holding it (e.g. an open write transaction in another "
                              "program or sqlite3 shell; optuna-dashboard holds it only briefly)")
    assert _stderr_lines(capsys) == [(f"study database {url} is locked by another process (database is locked), "
                                      "retrying for up to 2 s…")]
    assert "k" not in optuna.load_study(study_name="s", storage=url).user_attrs


def test_after_giving_up_on_a_lock_later_writes_fail_at_once_until_it_is_released(tmp_path, capsys):
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    study = _new_study(sqlite_storage(url, budget_s=1.5, busy_s=0.2))
    capsys.readouterr()
    with held_lock(db):
        with pytest.raises(DatabaseUnreachable, match="stayed locked by another process"):
            study.set_user_attr("k", 1)
        t0 = time.monotonic()
        with pytest.raises(DatabaseUnreachable, match="stayed locked by another process"):
            study.set_user_attr("k", 2)  # a stopping search does not wait the whole patience again
        assert time.monotonic() - t0 < 1
    assert len(_stderr_lines(capsys)) == 1
    study.set_user_attr("k", 3)  # released: the same storage writes again
    assert optuna.load_study(study_name="s", storage=url).user_attrs["k"] == 3


def test_a_lock_released_within_the_patience_lets_the_write_through_once(tmp_path, capsys):
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    study = _new_study(sqlite_storage(url, budget_s=10, busy_s=0.2))
    capsys.readouterr()
    with held_lock(db, hold_s=1.5):
        trial = study.ask()
    study.tell(trial, [1.0, 2.0])
    lines = _stderr_lines(capsys)
    assert lines[0] == (f"study database {url} is locked by another process (database is locked), retrying for up "
                        "to 10 s…")
    assert len(lines) == 2 and lines[1].startswith("study database unlocked again after ")
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [(t.number, t.state, t.values) for t in trials] == [(0, TrialState.COMPLETE, [1.0, 2.0])]


def test_a_trial_created_while_another_process_holds_the_write_lock_is_created_once(tmp_path, capsys, monkeypatch):
    import optuna.storages._rdb.storage as rdb

    monkeypatch.setattr(rdb.random, "random", lambda: 0.0)  # Optuna's own five tries at creating a trial, no pause
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    study = _new_study(sqlite_storage(url, budget_s=10, busy_s=0.2))
    capsys.readouterr()
    with held_lock(db, mode="IMMEDIATE", hold_s=2.5):  # reads go on, writes wait
        study.ask()
    lines = _stderr_lines(capsys)
    assert len(lines) == 2 and "is locked by another process" in lines[0] and "unlocked again" in lines[1]
    assert [t.number for t in optuna.load_study(study_name="s", storage=url).trials] == [0]


def _drop_a_table(db: Path) -> None:
    with sqlite3.connect(db) as con:
        con.execute("DROP TABLE study_user_attributes")


def _not_a_database(db: Path) -> None:
    with open(db, "r+b") as f:
        f.write(b"this is not a SQLite database" * 4)


@pytest.mark.parametrize("damage", [_drop_a_table, _not_a_database])
def test_an_error_that_waiting_does_not_cure_is_raised_at_once(tmp_path, capsys, damage):
    db = tmp_path / "study.db"
    study = _new_study(open_storage(f"sqlite:///{db}", budget_s=10))
    capsys.readouterr()
    damage(db)
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        study.set_user_attr("k", 1)
    assert time.monotonic() - t0 < 1
    assert not isinstance(err.value, DatabaseUnreachable)
    assert "no such table" in str(err.value.__cause__) or "not a database" in str(err.value.__cause__)
    assert _stderr_lines(capsys) == []


def test_a_full_disk_stops_a_write_of_the_study_database_at_once(small_disk, capsys):
    db = small_disk.path / "study.db"
    storage = open_storage(f"sqlite:///{db}", budget_s=10)
    study = _new_study(storage)
    running = study.ask()
    capsys.readouterr()
    small_disk.fill()
    for write in (lambda: study.set_user_attr("notes", "x" * 50_000), lambda: study.tell(running, [1.0, 2.0])):
        t0 = time.monotonic()
        with pytest.raises(DatabaseFull) as err:
            write()
        assert time.monotonic() - t0 < 1
        assert str(err.value) == (f"no space left on the device of {db} while writing the study database; "
                                  "free space there")
    assert _stderr_lines(capsys) == []
    small_disk.free()
    study.tell(running, [1.0, 2.0])  # space freed: the same storage writes again
    assert optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials[0].state == TrialState.COMPLETE
    storage._backend._backend.engine.dispose()


def test_the_sqlite_storage_serves_what_optuna_and_the_dashboard_do_with_a_study(tmp_path):
    from optuna_dashboard import get_note, save_note

    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url)
    study = _new_study(storage)
    study.set_metric_names(["map", "ms"])
    study.enqueue_trial({"x": 1.0}, user_attrs={"role": "base"})
    trial = study.ask()
    trial.suggest_float("x", 0.0, 2.0)
    (tmp_path / "c.yaml").write_text("a: 1\n")
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    artifact = optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(tmp_path / "c.yaml"),
                                                study_or_trial=trial)
    save_note(trial, "note")
    assert get_note(trial) == "note"
    study.tell(trial, [1.0, 2.0])
    assert [m.artifact_id for m in optuna.artifacts.get_all_artifact_meta(study.trials[0], storage=storage)] == \
        [artifact]
    save_note(study, "study note")
    assert get_note(study) == "study note"
    assert st.study_names(url) == ["s"] and st.find_study(storage, "s").trials[0].params == {"x": 1.0}
    assert storage.get_trial(trial._trial_id).state == TrialState.COMPLETE
    assert [t.number for t in study.best_trials] == [0]
    optuna.copy_study(from_study_name="s", from_storage=storage, to_storage=storage, to_study_name="copy")
    optuna.delete_study(study_name="s", storage=storage)
    copied = optuna.load_study(study_name="copy", storage=url)
    assert copied.metric_names == ["map", "ms"] and copied.trials[0].user_attrs == {"role": "base"}
