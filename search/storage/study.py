"""The Optuna side: storage URLs, the study's recorded settings, resume checks, stale trials and the driver lock."""

from __future__ import annotations

import os
import platform
import shlex
import socket
import time
from importlib import metadata
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from space import first_line

from ..errors import SearchError
from .companions import is_rung_study
from .reconnect import RECONNECT_S, ReconnectingStorage, sqlite_patience

SETTINGS_ATTR = "attnas_settings"  # what defines the study: base, data, space, proxy schedule, latency
VERSIONS_ATTR = "attnas_versions"
PATHS_ATTR = "attnas_paths"  # where its files are: out dir, artifact dir, storage URL as given
RUNG_RESULTS = "rung_results"  # trial attr: {epochs: objective values} at each rung the candidate finished
LATENCY_REF_ATTR = "attnas_latency_reference"  # study attr: reference windows (ms), the study's reference, fixed?
# study attr: {trial: {"ratio", "ci_low", "ci_high", "accepted", "latency_ms"}}, the end-of-run re-measure of trials
# whose latency was recorded contended (search/driver.py)
REMEASURED_ATTR = "attnas_latency_remeasured"
CONFIRM_ATTR = "attnas_confirmation"  # study attr: {trial: {"offsets", "values", "errors", "train_s": [...]}}
DRIVER_ATTR = "attnas_driver"  # the driver running it now: host, pid, heartbeat
OUTSIDE_ATTR = "attnas_outside_changes"  # trial number -> what another writer (the dashboard) did to it while it ran
HEARTBEAT_S = 20.0
STALE_S = 90.0  # a driver not heard of for this long is gone, wherever it ran


def default_storage(out: Path, study_name: str) -> str:
    return f"sqlite:///{(out / study_name / 'study.db').resolve()}"


def open_storage(url: str, budget_s: float = RECONNECT_S) -> optuna.storages.BaseStorage:
    """An Optuna storage from an RDB URL (sqlite:///, postgresql://, mysql://) or a journal file path.

    A database server's storage outlives a restart of the server and a SQLite file's waits out another process
    holding it locked, each for up to ``budget_s`` (:class:`search.storage.reconnect.ReconnectingStorage`); the
    first connection is made here, so a wrong URL or a server that is down fails at once."""
    try:
        if "://" in url:
            if url.startswith("sqlite:///"):
                Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
                return sqlite_storage(url, budget_s)
            if url.startswith("sqlite"):  # in memory: no other process can hold it
                return _rdb_storage(url)
            return _server_storage(url, budget_s)
        path = Path(url).expanduser()
        if not path.parent.is_dir():
            raise SearchError(f"journal storage {url}: directory {path.parent} does not exist")
        return _journal_storage(path)
    except SearchError:
        raise
    except Exception as err:  # SQLAlchemy/driver errors: unknown dialect, missing driver, unreachable server
        raise SearchError(f"bad storage {_shown(url)!r}: {type(err).__name__}: {first_line(err)}") from None


def sqlite_storage(url: str, budget_s: float = RECONNECT_S, busy_s: float | None = None) -> ReconnectingStorage:
    """A ``sqlite:///`` file's storage: a call that finds the file locked by another process (a long transaction
    in another program; optuna-dashboard holds it only briefly) is retried for up to ``budget_s``, and a write the
    full disk refuses stops at once (:func:`search.storage.reconnect.sqlite_patience`).

    ``busy_s`` is how long each statement waits for the lock (SQLite's busy timeout); None keeps pysqlite's default
    (5 s). Only tests shorten it."""
    from optuna.storages._cached_storage import _CachedStorage
    from sqlalchemy.engine import make_url

    path = Path(make_url(url).database or "").expanduser().absolute()  # without a ?query the URL may hold
    engine_kwargs = None if busy_s is None else {"connect_args": {"timeout": busy_s}}
    rdb = _rdb_storage(url, engine_kwargs=engine_kwargs)
    return ReconnectingStorage(_CachedStorage(rdb), url, budget_s, sqlite_patience(path))


def _server_storage(url: str, budget_s: float = RECONNECT_S) -> optuna.storages.BaseStorage:
    """PostgreSQL, MySQL, ...: pooled connections are checked before use (``pool_pre_ping``: the ones a server
    restart killed are replaced) and every call is retried while the server is unreachable."""
    from optuna.storages._cached_storage import (
        _CachedStorage,  # what optuna.create_study wraps an RDBStorage in
    )
    from sqlalchemy.engine import make_url

    dialect = make_url(url).get_dialect()
    try:
        dialect.import_dbapi()
    except ImportError:
        extra = "pip install 'attnas[postgres]'" if make_url(url).get_backend_name() == "postgresql" else \
            f"install the Python driver SQLAlchemy uses for {make_url(url).drivername}"
        raise SearchError(f"storage {_shown(url)}: the database driver is not installed; {extra}") from None
    engine_kwargs: dict = {"pool_pre_ping": True}
    if make_url(url).get_backend_name() == "postgresql" and "connect_timeout" not in make_url(url).query:
        # a server host that is down (not refusing) would otherwise hold each connection attempt for minutes
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    rdb = _rdb_storage(url, engine_kwargs=engine_kwargs)
    return ReconnectingStorage(_CachedStorage(rdb), _shown(url), budget_s)


def _journal_storage(path: Path) -> optuna.storages.JournalStorage:
    """A journal file, also on a shared (NFS) path. Its lock is Optuna's default symlink lock: ``link()`` is atomic
    on every NFS version and optuna-dashboard locks the same journal the same way, so the search and the dashboard
    exclude each other. Where the file system refuses symlinks (some SMB mounts) the ``O_EXCL`` open lock is used;
    both take the same lock file name and fail on each other's lock, so mixed writers still exclude each other."""
    from optuna.storages.journal import (
        JournalFileBackend,
        JournalFileOpenLock,
        JournalFileSymlinkLock,
    )

    probe = path.parent / f".{path.name}.symlink-probe-{os.getpid()}"
    try:
        probe.symlink_to(path.name)
        probe.unlink()
        lock = JournalFileSymlinkLock(str(path))
    except OSError:
        lock = JournalFileOpenLock(str(path))
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def _shown(url: str) -> str:
    """``url`` with its password (if any) masked, for messages."""
    if "://" not in url or url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return url
    return parsed.render_as_string(hide_password=True) if parsed.password else url


def _rdb_storage(url: str, tries: int = 3, engine_kwargs: dict | None = None) -> optuna.storages.RDBStorage:
    """``RDBStorage(url)``, tried again when another process (optuna-dashboard, a second reader) creates the same
    new database at the same moment: both create its tables and insert its schema version, and one fails."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, OperationalError) as err:
            racing = isinstance(err, IntegrityError) or "already exists" in str(err)
            if not racing or attempt == tries - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def may_hold_studies(url: str) -> bool:
    """False when ``url`` names a SQLite or journal file that does not exist (opening it would create it)."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):]).expanduser().is_file()
    return "://" in url or Path(url).expanduser().is_file()


def check_new_storage(url: str) -> None:
    """A storage file that does not exist yet must be creatable (journal files need their directory)."""
    if "://" not in url and not Path(url).expanduser().parent.is_dir():
        raise SearchError(f"journal storage {url}: directory {Path(url).expanduser().parent} does not exist")


def dashboard_command(url: str, artifact_dir: Path | None) -> str:
    """The exact optuna-dashboard command line for this storage (journal files are passed as plain paths)."""
    target = url if "://" in url else str(Path(url).expanduser().resolve())
    cmd = f"optuna-dashboard {shlex.quote(target)}"  # a PostgreSQL URL may hold ?host=... for a socket
    return cmd + (f" --artifact-dir {artifact_dir}" if artifact_dir else "")


def study_names(url: str) -> list[str]:
    """The studies a user runs in ``url`` (not the rung companions written for the dashboard)."""
    return [s.study_name for s in optuna.get_all_study_summaries(open_storage(url), include_best_trial=False)
            if not is_rung_study(s.study_name)]


def find_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study | None:
    if name not in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}:
        return None
    return optuna.load_study(study_name=name, storage=storage)


def check_driver_lock(study: optuna.Study) -> None:
    """Refuse to run a study another live driver is running (two drivers would fail each other's trials)."""
    info = study.user_attrs.get(DRIVER_ATTR)
    if not info:
        return
    age = time.time() - float(info.get("heartbeat", 0))
    same_host = info.get("host") == socket.gethostname()
    alive = _pid_alive(int(info.get("pid", -1))) if same_host else age < STALE_S
    if alive and age < STALE_S and not (same_host and info.get("pid") == os.getpid()):
        raise SearchError(f"study {study.study_name!r} is being run by another driver (pid {info.get('pid')} on "
                          f"{info.get('host')}, seen {age:.0f} s ago); stop it first or wait {STALE_S:.0f} s")


def heartbeat(study: optuna.Study, started: float) -> None:
    study.set_user_attr(DRIVER_ATTR, {"host": socket.gethostname(), "pid": os.getpid(), "started": started,
                                      "heartbeat": time.time()})


def beat(study: optuna.Study, started: float, last: float) -> float:
    """A heartbeat when the last one (at ``last``) is HEARTBEAT_S old; returns when the latest was written."""
    if time.time() - last <= HEARTBEAT_S:
        return last
    heartbeat(study, started)
    return time.time()


def release_driver_lock(study: optuna.Study) -> None:
    study.set_user_attr(DRIVER_ATTR, {})


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[tuple[int, dict]]:
    """Trials a stopped driver left RUNNING: mark them FAIL (saying why) and queue their parameters again.

    Optuna's own route (heartbeats + ``fail_stale_trials`` + ``RetryFailedTrialCallback``) needs heartbeats that
    only ``study.optimize`` records; an ask/tell driver holding the study lock can do the same directly.
    """
    requeued = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if RUNG_RESULTS in t.user_attrs:  # a candidate between rungs: the driver adopts it with its checkpoint
            continue
        requeue(study, optuna.Trial(study, t._trial_id), "driver stopped while this trial ran; its parameters were "
                "queued again on resume")
        requeued.append((t.number, t.params))
    return requeued



def outside_changes(study: optuna.Study) -> dict[str, str]:
    """Trials another writer finished while the driver ran them: number (str) -> "stopped-from-dashboard" or
    "completed-by-hand"."""
    return dict(study.user_attrs.get(OUTSIDE_ATTR) or {})


def record_outside_change(study: optuna.Study, number: int, kind: str) -> None:
    """Mark a trial another writer finished (a finished trial takes no attributes, so the study keeps the mark)."""
    study.set_user_attr(OUTSIDE_ATTR, {**outside_changes(study), str(number): kind})


def find_renamed(storage: optuna.storages.BaseStorage) -> optuna.Study | None:
    """The study this driver runs, under another name: optuna-dashboard's rename copies the study (trials, user
    attributes, our driver lock included) into a new one and deletes the old one."""
    for frozen in storage.get_all_studies():
        info = frozen.user_attrs.get(DRIVER_ATTR) or {}
        if info.get("host") == socket.gethostname() and info.get("pid") == os.getpid():
            return optuna.load_study(study_name=frozen.study_name, storage=storage)
    return None



def fail(study: optuna.Study, trial: optuna.Trial, kind: str, reason: str) -> None:
    """Tell ``trial`` FAIL with why: ``fail_kind`` (what kind of failure) and ``fail_reason`` (one line)."""
    trial.set_user_attr("fail_kind", kind)
    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=TrialState.FAIL)


def requeue(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """A trial a stopped driver cut short: FAIL (``driver-stopped``, ``reason``) and its parameters queued again,
    as the base when it was the base (the base always reaches the top rung)."""
    role = trial.user_attrs.get("role")
    fail(study, trial, "driver-stopped", reason)
    study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number, **({"role": role} if role else {})})


def results_by_hash(study: optuna.Study, fidelity: str) -> dict[str, FrozenTrial]:
    """The completed trial of each network (by candidate hash) at this fidelity, which a new trial of the same
    network reuses; values typed in by hand in the dashboard are not a result."""
    by_hand = outside_changes(study)
    return {t.user_attrs["candidate_hash"]: t for t in completed_trials(study)
            if t.user_attrs.get("fidelity") == fidelity and "candidate_hash" in t.user_attrs
            and str(t.number) not in by_hand}


def copy_result(study: optuna.Study, trial: optuna.Trial, done: FrozenTrial) -> None:
    """Complete ``trial`` with the result of ``done``, the same network at the same fidelity: its values, its
    attributes (not its files or role) and its constraints; ``reused_from`` names the source."""
    have = trial.user_attrs
    for key, value in done.user_attrs.items():
        if key not in have and key not in ("run_dir", "requeued_from", "role"):
            trial.set_user_attr(key, value)
    trial.set_user_attr("reused_from", done.number)
    for name, value in done.system_attrs.items():  # the constraints of the same network are the same
        if name.startswith("constraints:"):
            trial.set_constraint(name.split(":", 1)[1], value)
    study.tell(trial, list(done.values))


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count toward ``--budget``: completed ones (infeasible candidates, never trained, do not) and
    candidates that stopped below the top rung of successive halving (PRUNED with rung results)."""
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    return ([t for t in completed_trials(study) if "infeasible" not in t.user_attrs]
            + [t for t in pruned if RUNG_RESULTS in t.user_attrs])


def rung_results(trial: FrozenTrial) -> dict[int, list[float]]:
    """A candidate's objective values at each rung it finished: {epochs: values}, in rung order."""
    return {int(k): v for k, v in sorted((trial.user_attrs.get(RUNG_RESULTS) or {}).items(), key=lambda kv: int(kv[0]))}


def best_available_values(trial: FrozenTrial) -> list[float] | None:
    """What a search strategy learns from: a completed trial's values, else its values at the highest rung it
    finished (a candidate stopped or paused below the top rung), else None."""
    if trial.state == TrialState.COMPLETE:
        return list(trial.values)
    results = rung_results(trial)
    return list(results[max(results)]) if results else None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("attnas", "torch", "ultralytics", "optuna", "ray", "optuna-dashboard"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = "not installed" if pkg != "attnas" else "source checkout"
    return found


def save_note(study_or_trial, body: str) -> None:
    """optuna-dashboard's markdown note of a study or a trial (its public API; shown on the study/trial page)."""
    from optuna_dashboard import save_note as _save

    _save(study_or_trial, body)


def trial_note(trial: optuna.Trial, describe: str, yaml_path: Path, artifact_id: str | None) -> str:
    """A trial's note: its candidate and a link to its YAML artifact (served by the dashboard)."""
    lines = [f"**Candidate**: `{describe}`", ""]
    if artifact_id:
        url = f"/artifacts/{trial.study._study_id}/{trial._trial_id}/{artifact_id}"
        lines.append(f"YAML: [{yaml_path.name}]({url}) (`{yaml_path}`)")
    else:
        lines.append(f"YAML: `{yaml_path}`")
    return "\n".join(lines) + "\n"


def recorded_study_dir(study) -> Path | None:
    """The directory a study's files were written to when it was created (kept when the study is renamed)."""
    where = (study.user_attrs.get(PATHS_ATTR) or {}).get("study_dir")
    return Path(where) if where else None
