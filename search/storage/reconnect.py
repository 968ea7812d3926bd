"""A study storage that waits out a database that is briefly unavailable: a database server restarting, or a SQLite
file another process holds locked. Every call is retried for a bounded time, without writing anything twice."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from space import first_line

from ..errors import DISK_FAULTS, SearchError, causes, disk_error

RECONNECT_S = 60.0  # how long a search waits for its database before it stops (a restart takes seconds)
# SQLite's primary result codes (sqlite3 names them from Python 3.11); extended codes keep them in the low byte
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL = 5, 6, 13
_ENOSPC_TEXT = "database or disk is full"  # SQLITE_FULL's message, for Pythons without sqlite_errorcode


class DatabaseUnreachable(SearchError):
    """The study's database did not answer within the retry budget; the study is as the last write left it."""


class DatabaseFull(DatabaseUnreachable):
    """The disk under a SQLite study database is full (or over quota, or read-only): the write was not made and is
    not retried (it would fail the same way until someone frees space)."""


def is_disconnect(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) says the connection to the database is gone, not that a query was bad.

    Optuna wraps SQLAlchemy errors in ``StorageInternalError``; SQLAlchemy raises ``OperationalError`` /
    ``InterfaceError`` for a server that is down or restarting and flags a dropped connection as invalidated."""
    from sqlalchemy import exc

    for seen in causes(err):
        if isinstance(seen, (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError)):
            return True
        if isinstance(seen, exc.DBAPIError) and seen.connection_invalidated:
            return True
    return False


def _sqlite_error(err: BaseException) -> sqlite3.Error | None:
    """The SQLite driver's own error under ``err``, if any."""
    return next((seen for seen in causes(err) if isinstance(seen, sqlite3.Error)), None)


def _sqlite_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    return None if code is None else code & 0xFF


def is_locked(err: BaseException) -> bool:
    """True when ``err`` says another connection holds the SQLite database locked (SQLITE_BUSY / SQLITE_LOCKED:
    "database is locked", "database table is locked"), which waiting cures; False for every other error (a missing
    table, a file that is not a database, a full disk), which waiting does not."""
    error = _sqlite_error(err)
    if not isinstance(error, sqlite3.OperationalError):
        return False
    code = _sqlite_code(error)
    if code is not None:
        return code in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(error).lower()
    return "is locked" in text or "busy" in text


def disk_fault_of(err: BaseException) -> str | None:
    """What is wrong with the disk ("no space left", "disk quota exceeded", "read-only file system") when ``err``
    says a write failed on it: SQLite's SQLITE_FULL or an ``OSError`` from the driver; None for any other error."""
    found = disk_error(err)
    if found is not None:
        return DISK_FAULTS[found.errno]
    error = _sqlite_error(err)
    if error is not None and (_sqlite_code(error) == _SQLITE_FULL or _ENOSPC_TEXT in str(error).lower()):
        return "no space left"
    return None


def _cause(err: BaseException) -> str:
    """What the database driver said, for a message: SQLAlchemy's error under Optuna's wrapper."""
    cause = err.__cause__ or err
    return f"{type(cause).__name__}: {first_line(cause)}"


def _sqlite_cause(err: BaseException) -> str:
    """SQLite's own words ("database is locked"), without SQLAlchemy's prefix and SQL."""
    error = _sqlite_error(err)
    return first_line(error) if error is not None else _cause(err)


def _sqlite_full(path: Path, err: BaseException) -> str | None:
    what = disk_fault_of(err)
    if what is None:
        return None
    remedy = "make it writable" if what == "read-only file system" else "free space there"
    return f"{what} on the device of {path} while writing the study database; {remedy}"


def _no_disk_fault(err: BaseException) -> str | None:
    return None


@dataclass(frozen=True)
class Patience:
    """Which failed storage calls are waited out, and what the waiting says.

    ``transient(err)``: the call may succeed if tried again later. ``waiting`` is printed at the first failure,
    ``back`` when a call succeeds after failures, ``gave_up`` is the :class:`DatabaseUnreachable` message; they
    are formatted with ``url``, ``cause`` (``describe(err)``), ``budget`` and ``waited`` (seconds). ``disk_fault(err)``
    is the :class:`DatabaseFull` message for a write the disk refused (raised at once), or None."""

    transient: Callable[[BaseException], bool]
    waiting: str
    back: str
    gave_up: str
    describe: Callable[[BaseException], str] = _cause
    disk_fault: Callable[[BaseException], str | None] = _no_disk_fault


SERVER = Patience(
    transient=is_disconnect,
    waiting="database unreachable ({cause}), retrying for up to {budget} s…",
    back="database reachable again after {waited} s",
    gave_up="the study's database {url} did not answer for {budget} s ({cause})",
)


def sqlite_patience(path: Path) -> Patience:
    """A SQLite file's: only a lock held by another process is waited out (SQLite's own busy timeout, 5 s, is each
    statement's wait; this is the whole call's); a full disk fails at once; every other error is raised as it is."""
    return Patience(
        transient=is_locked,
        waiting="study database {url} is locked by another process ({cause}), retrying for up to {budget} s…",
        back="study database unlocked again after {waited} s",
        gave_up=("the study database {url} stayed locked by another process for {waited} s ({cause}); close the "
                 "program holding it (e.g. an open write transaction in another program or sqlite3 shell; "
                 "optuna-dashboard holds it only briefly)"),
        describe=_sqlite_cause,
        disk_fault=partial(_sqlite_full, path),
    )


class ReconnectingStorage(BaseStorage):
    """Optuna's storage (``_CachedStorage`` over ``RDBStorage``) with every call retried, with backoff, while the
    database is unavailable (``patience.transient``: a server unreachable, a SQLite file locked), for up to
    ``budget_s``; then :class:`DatabaseUnreachable`. A full disk under a SQLite file raises :class:`DatabaseFull`
    at once.

    Stale pooled connections are replaced by SQLAlchemy's ``pool_pre_ping`` (set where the engine is made); this
    covers the calls made while the server is down. Reads and attribute writes are idempotent and simply retried.
    The writes that are not (their commit may have succeeded when the reply was lost) are checked before a retry:
    ``create_new_trial`` adopts the trial its lost call created (one driver per study creates trials, see the
    driver lock), ``set_trial_state_values`` accepts a trial already in the state it was asked for, and
    ``create_new_study`` accepts the study it created. After giving up, later calls try once and fail at once, so a
    stopping search does not wait the budget again for every write it attempts.
    """

    def __init__(self, backend: BaseStorage, url: str, budget_s: float = RECONNECT_S,
                 patience: Patience = SERVER) -> None:
        self._backend = backend
        self._url = url
        self._budget_s = budget_s
        self._patience = patience
        self._gave_up: float | None = None  # when the calls that ended in giving up began to fail

    def _retry(self, call: Callable[[], Any], on_retry: Callable[[BaseException], Any] | None = None) -> Any:
        """``call()``; while the database is unavailable, again with backoff. ``on_retry(err)`` runs once the
        database answers again after a failure and may return ``(True, result)`` when the lost call took effect."""
        start, delay, failed = time.monotonic(), 0.5, None
        while True:
            try:
                if failed is not None and on_retry is not None:
                    done, result = on_retry(failed)
                    if done:
                        return self._recovered(start, result)
                result = call()
                return result if failed is None else self._recovered(start, result)
            except Exception as err:
                full = self._patience.disk_fault(err)
                if full is not None:  # waiting frees no space
                    raise DatabaseFull(full) from None
                if not self._patience.transient(err):
                    raise
                if failed is None:
                    if self._gave_up is not None:
                        raise DatabaseUnreachable(self._message(self._patience.gave_up, err, self._gave_up)) from None
                    print(self._message(self._patience.waiting, err, start), file=sys.stderr, flush=True)
                failed = err
                if time.monotonic() - start + delay > self._budget_s:
                    self._gave_up = start
                    raise DatabaseUnreachable(self._message(self._patience.gave_up, err, start)) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _recovered(self, start: float, result: Any) -> Any:
        print(self._patience.back.format(waited=f"{time.monotonic() - start:.0f}", url=self._url),
              file=sys.stderr, flush=True)
        self._gave_up = None
        return result

    def _message(self, template: str, err: BaseException, since: float) -> str:
        return template.format(url=self._url, cause=self._patience.describe(err), budget=f"{self._budget_s:g}",
                               waited=f"{time.monotonic() - since:.0f}")

    # -- writes that are not idempotent ----------------------------------------------------------------------
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        def created_by_lost_call(err: BaseException) -> tuple[bool, int | None]:
            if study_name is None:
                return False, None
            try:
                return True, self._backend.get_study_id_from_name(study_name)
            except KeyError:
                return False, None

        def create() -> int:
            return self._backend.create_new_study(directions, study_name)

        return self._retry(create, created_by_lost_call)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        # The number the new trial gets; a lost call that committed left exactly that trial (only this driver
        # creates trials in its study), so a retry adopts it instead of creating a second one.
        number = self._retry(lambda: self._backend.get_n_trials(study_id))

        def created_by_lost_call(err: BaseException) -> tuple[bool, int | None]:
            if self._backend.get_n_trials(study_id) <= number:
                return False, None
            return True, self._backend.get_trial_id_from_study_id_trial_number(study_id, number)

        return self._retry(lambda: self._backend.create_new_trial(study_id, template_trial), created_by_lost_call)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        def done_by_lost_call(err: BaseException) -> tuple[bool, bool | None]:
            now = self._backend.get_trial(trial_id)
            same_values = values is None or list(now.values or []) == list(values)
            return (now.state == state and same_values), True

        return self._retry(lambda: self._backend.set_trial_state_values(trial_id, state, values), done_by_lost_call)

    # -- idempotent calls: retried as they are ---------------------------------------------------------------
    def delete_study(self, study_id: int) -> None:
        self._retry(lambda: self._backend.delete_study(study_id))

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._retry(lambda: self._backend.set_study_user_attr(study_id, key, value))

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._retry(lambda: self._backend.set_study_system_attr(study_id, key, value))

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._retry(lambda: self._backend.get_study_id_from_name(study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._retry(lambda: self._backend.get_study_name_from_id(study_id))

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._retry(lambda: self._backend.get_study_directions(study_id))

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._retry(lambda: self._backend.get_study_user_attrs(study_id))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._retry(lambda: self._backend.get_study_system_attrs(study_id))

    def get_all_studies(self) -> list[optuna.study.FrozenStudy]:
        return self._retry(self._backend.get_all_studies)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: optuna.distributions.BaseDistribution) -> None:
        self._retry(lambda: self._backend.set_trial_param(trial_id, param_name, param_value_internal, distribution))

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._retry(lambda: self._backend.get_trial_id_from_study_id_trial_number(study_id, trial_number))

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._retry(lambda: self._backend.set_trial_intermediate_value(trial_id, step, intermediate_value))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._retry(lambda: self._backend.set_trial_user_attr(trial_id, key, value))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._retry(lambda: self._backend.set_trial_system_attr(trial_id, key, value))

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._retry(lambda: self._backend.get_trial(trial_id))

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._retry(lambda: self._backend.get_best_trial(study_id))

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._retry(lambda: self._backend.get_all_trials(study_id, deepcopy=deepcopy, states=states))

    def remove_session(self) -> None:
        self._backend.remove_session()
