"""A study storage on a database server that outlives a restart of the server: every call is retried while the
database is unreachable, for a bounded time, without writing anything twice."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Container, Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from space import first_line

from ..errors import SearchError

RECONNECT_S = 60.0  # how long a search waits for its database before it stops (a restart takes seconds)


class DatabaseUnreachable(SearchError):
    """The study's database did not answer within the retry budget; the study is as the last write left it."""


def is_disconnect(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) says the connection to the database is gone, not that a query was bad.

    Optuna wraps SQLAlchemy errors in ``StorageInternalError``; SQLAlchemy raises ``OperationalError`` /
    ``InterfaceError`` for a server that is down or restarting and flags a dropped connection as invalidated."""
    from sqlalchemy import exc

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError)):
            return True
        if isinstance(seen, exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ReconnectingStorage(BaseStorage):
    """Optuna's storage (``_CachedStorage`` over ``RDBStorage``) with every call retried, with backoff, while the
    database is unreachable, for up to ``budget_s``; then :class:`DatabaseUnreachable`.

    Stale pooled connections are replaced by SQLAlchemy's ``pool_pre_ping`` (set where the engine is made); this
    covers the calls made while the server is down. Reads and attribute writes are idempotent and simply retried.
    The writes that are not (their commit may have succeeded when the reply was lost) are checked before a retry:
    ``create_new_trial`` adopts the trial its lost call created (one driver per study creates trials, see the
    driver lock), ``set_trial_state_values`` accepts a trial already in the state it was asked for, and
    ``create_new_study`` accepts the study it created. After giving up, later calls try once and fail at once, so a
    stopping search does not wait the budget again for every write it attempts.
    """

    def __init__(self, backend: BaseStorage, url: str, budget_s: float = RECONNECT_S) -> None:
        self._backend = backend
        self._url = url
        self._budget_s = budget_s
        self._gave_up = False

    def _retry(self, call: Callable[[], Any], on_retry: Callable[[BaseException], Any] | None = None) -> Any:
        """``call()``; while the database is unreachable, again with backoff. ``on_retry(err)`` runs once the
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
                if not is_disconnect(err):
                    raise
                if failed is None:
                    if self._gave_up:
                        raise DatabaseUnreachable(self._reason(err)) from None
                    print(f"database unreachable ({type(err.__cause__ or err).__name__}: "
                          f"{first_line(err.__cause__ or err)}), retrying for up to {self._budget_s:g} s…",
                          file=sys.stderr, flush=True)
                failed = err
                if time.monotonic() - start + delay > self._budget_s:
                    self._gave_up = True
                    raise DatabaseUnreachable(self._reason(err)) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _recovered(self, start: float, result: Any) -> Any:
        print(f"database reachable again after {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        self._gave_up = False
        return result

    def _reason(self, err: BaseException) -> str:
        cause = err.__cause__ or err
        return (f"the study's database {self._url} did not answer for {self._budget_s:g} s "
                f"({type(cause).__name__}: {first_line(cause)})")

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

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._retry(lambda: self._backend.get_all_trials(study_id, deepcopy=deepcopy, states=states))

    def remove_session(self) -> None:
        self._backend.remove_session()
