"""One candidate the driver is evaluating: its trial, its network, and where it is between timing and the top rung."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import optuna

from space import Candidate

from ..latency import LatencyResult
from ..storage import study as st


@dataclass
class InFlight:
    """A trial from ask to tell. ``followers`` are later trials that proposed the same network and take its result.

    Between rungs it waits in :class:`search.engine.rungs.Rungs` (``paused``) with the checkpoint of its last rung."""

    trial: optuna.Trial
    candidate: Candidate
    yaml_text: str  # the candidate's YAML with its provenance header, as written to the run directory
    started: float
    latency: LatencyResult | None = None
    attempts: int = 1
    followers: list[optuna.Trial] = field(default_factory=list)
    ready: bool = False  # timed and feasible: trains as soon as a worker is free (and the base is stored)
    training: bool = False
    rung: int = 0  # the rung it trains towards (or last finished, while paused)
    checkpoint: str | None = None  # last finished rung's checkpoint, where a promotion continues from
    rung_results: dict[str, list[float]] = field(default_factory=dict)  # as recorded in the trial: epochs -> values

    @property
    def number(self) -> int:
        return self.trial.number

    def trials(self) -> list[optuna.Trial]:
        """Its own trial and its followers': every trial this evaluation tells."""
        return [self.trial, *self.followers]

    def requeue(self, study: optuna.Study) -> None:
        """The driver stops while this runs: fail its trials and queue their parameters again (best effort: the
        storage may be what failed)."""
        for trial in self.trials():
            with contextlib.suppress(Exception):
                st.requeue(study, trial, "the driver stopped while this trial ran; parameters queued again")


class SearchAborted(RuntimeError):
    """Too many trials in a row failed (or were invalid): the search stops instead of burning the budget."""


class DiskFull(SearchAborted):
    """A write failed for want of disk space (or quota, or a read-only disk): the search stops, and the trainings
    it cut short run again on resume (they are not failed: nothing was wrong with them)."""


@dataclass
class InARow:
    """Failed trials, invalid proposals and infeasible candidates in a row; the search stops at a limit."""

    max_failures: int
    max_pruned: int
    failures: int = 0
    pruned: int = 0
    infeasible: int = 0

    def failed(self, last: str) -> None:
        self.failures += 1
        if self.failures >= self.max_failures:
            raise SearchAborted(f"{self.failures} trials in a row failed; last: {last}")

    def invalid(self) -> None:
        self.pruned += 1
        if self.pruned >= self.max_pruned:
            raise SearchAborted(f"{self.pruned} invalid candidates in a row; is the space too narrow?")

    def was_infeasible(self) -> None:
        self.infeasible += 1
        if self.infeasible >= self.max_pruned:
            raise SearchAborted(f"{self.infeasible} infeasible candidates in a row; are the limits "
                                "(--max-latency-ms / --max-params) reachable?")


class StudyGone(SearchAborted):
    """The study was deleted or renamed by another writer (optuna-dashboard) while the search ran.

    ``renamed_to`` is the new name when the study was renamed (its trials and attributes were copied), else None."""

    def __init__(self, message: str, renamed_to: str | None = None) -> None:
        super().__init__(message)
        self.renamed_to = renamed_to
