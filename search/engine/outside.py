"""Other writers of the study while the search runs (optuna-dashboard): a trial failed or completed by hand, the study
renamed or deleted. The driver asks here every turn; nothing it did is told twice."""

from __future__ import annotations

import contextlib
from typing import Callable

import optuna
from optuna.trial import TrialState

from ..storage import study as st
from .inflight import InFlight, StudyGone


class OutsideWriters:
    """Notices what another writer did to the study and to the trials this driver holds."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage, progress) -> None:
        self.study = study
        self.storage = storage  # read directly: Optuna's cached storage would answer from memory
        self.progress = progress

    def check_study(self) -> None:
        """Raise :class:`StudyGone` when the study was deleted or renamed (the dashboard's rename copies it and
        deletes it)."""
        storage = self.storage
        try:  # by name: Optuna's cached storage answers id -> name from memory, name -> id from the database
            if storage.get_study_id_from_name(self.study.study_name) == self.study._study_id:
                return
        except KeyError:
            pass
        name = self.study.study_name
        renamed = st.find_renamed(storage)
        if renamed is None:
            raise StudyGone(f"study {name!r} was deleted while the search ran (optuna-dashboard?); nothing to "
                            "continue")
        with contextlib.suppress(Exception):  # our lock came along with the copy: free it for the resume
            st.release_driver_lock(renamed)
        raise StudyGone(f"study {name!r} was renamed to {renamed.study_name!r} while the search ran",
                        renamed.study_name)

    def sync_running(self, running: dict[int, InFlight], cancel: Callable[[int], None]) -> None:
        """Trials another writer finished while they ran (the dashboard's Fail / Complete) leave ``running``.

        Failed: "stop this one": its work is cancelled and its worker freed, it is not queued again.
        Completed by hand: the values given are kept; the trial is marked so that pareto/ and dedup leave it out.
        A finished trial takes no more attributes, so the mark is kept in the study's ``attnas_outside_changes``."""
        for run in list(running.values()):
            state = self._state(run.trial)
            if state == TrialState.RUNNING:
                run.followers = [f for f in run.followers if self._follower_still_ours(f, run)]
                continue
            cancel(run.number)
            del running[run.number]
            st.record_outside_change(self.study, run.number, _kind(state))
            verb = "failed" if state == TrialState.FAIL else "completed"
            self.progress.note(f"trial {run.number}: {verb} from outside (optuna-dashboard?) while it ran; "
                               "its work was stopped" + ("" if state == TrialState.FAIL else
                                                         ", its values kept as given and left out of pareto/"))
            for follower in run.followers:  # trials waiting on this network's result: there will be none
                if self._state(follower) != TrialState.RUNNING:
                    continue
                st.fail(self.study, follower, "stopped-from-dashboard",
                        f"same candidate as trial {run.number}, which was {verb} from outside while it ran")

    def sync_paused(self, paused: dict[int, InFlight], withdraw: Callable[[int], None]) -> None:
        """A candidate waiting between rungs that another writer finished: it waits no more and is never promoted
        (``withdraw`` takes it off the ladder)."""
        for number, run in list(paused.items()):
            state = self._state(run.trial)
            if state != TrialState.RUNNING:
                withdraw(number)
                st.record_outside_change(self.study, number, _kind(state))
                self.progress.note(f"trial {number}: {'failed' if state == TrialState.FAIL else 'completed'} from "
                                   "outside (optuna-dashboard?) while it waited at a rung; it will not be promoted")

    def _follower_still_ours(self, follower: optuna.Trial, leader: InFlight) -> bool:
        state = self._state(follower)
        if state != TrialState.RUNNING:
            st.record_outside_change(self.study, follower.number, _kind(state))
            self.progress.note(f"trial {follower.number} (waiting on trial {leader.number}): finished from "
                               "outside")
        return state == TrialState.RUNNING

    def _state(self, trial: optuna.Trial) -> TrialState:
        return self.storage.get_trial(trial._trial_id).state


def _kind(state: TrialState) -> str:
    return "stopped-from-dashboard" if state == TrialState.FAIL else "completed-by-hand"
