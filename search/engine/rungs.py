"""Asynchronous successive halving ranked by Pareto dominance (MO-ASHA, Schmucker et al. 2021).

Every candidate trains to rung 0 (``rungs[0]`` epochs). As results arrive, a candidate at rung ``k`` is promoted
to rung ``k + 1`` when it is among the best ``floor(n_k / eta)`` of the ``n_k`` results at rung ``k``, ranked by
non-dominated sorting on all objectives at that rung, ties within a front broken by crowding distance (NSGA-II).
Like ASHA, nobody waits for a rung to fill: :meth:`Ladder.next_promotion` is asked whenever a worker is free, and
a candidate that is not promotable now may become so later, when more results at its rung make ``n_k / eta``
larger. Optuna prunes single-objective studies only and Ray's schedulers take one metric, so this is built here;
the rule is small enough that a dependency (Syne Tune's ``MOASHA``) would add more than it saves.

:class:`Ladder` is the rule: pure bookkeeping, no study, no training. :class:`Rungs` keeps the driver's candidates
between rungs by it: records each rung's result in its trial, pauses it with its checkpoint, promotes, stops the
hopeless, and adopts what a stopped driver left between rungs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np
import optuna
from optuna.trial import TrialState

from space import SearchSpace, to_yaml

from .. import objectives as obj
from ..front.ranks import promotion_order
from ..storage import study as st
from ..storage.companions import RungStudies
from ..training.proxy import TrainResult
from .feasibility import measured
from .inflight import InFlight



@dataclass
class Ladder:
    """Results per rung and who has been promoted; ``maximize[j]`` says whether objective ``j`` is maximised."""

    rungs: tuple[int, ...]
    eta: int
    maximize: tuple[bool, ...]
    # ASHA promotes whoever is in the best floor(n / eta) now, so a rung sends on more than 1 / eta of its results
    # over a search (those promoted early stay promoted when later ones pass them). Capped: no more than
    # floor(n / eta) promoted from a rung at any time, the count synchronous halving promotes.
    capped: bool = False
    results: list[dict[Hashable, tuple[float, ...]]] = field(default_factory=list)  # per rung: candidate -> values
    promoted: list[set[Hashable]] = field(default_factory=list)  # per rung: candidates sent on from it

    def __post_init__(self) -> None:
        if self.eta < 2:
            raise ValueError(f"--eta must be at least 2, got {self.eta}")
        self.results = self.results or [{} for _ in self.rungs]
        self.promoted = self.promoted or [set() for _ in self.rungs]

    @property
    def top(self) -> int:
        return len(self.rungs) - 1

    def record(self, key: Hashable, rung: int, values: Sequence[float]) -> None:
        """Candidate ``key`` finished rung ``rung`` with these objective values."""
        self.results[rung][key] = tuple(float(v) for v in values)

    def mark_promoted(self, key: Hashable, rung: int) -> None:
        self.promoted[rung].add(key)

    def forget(self, key: Hashable) -> None:
        """``key`` leaves the ladder (another writer finished it): it is neither promoted nor counted."""
        for results in self.results:
            results.pop(key, None)

    def promotable(self, rung: int) -> list[Hashable]:
        """Candidates at ``rung`` (below the top) in its best ``floor(n / eta)`` not promoted yet, best first (capped:
        only as many as keep the rung's promotions within ``floor(n / eta)``)."""
        if rung >= self.top:
            return []
        keys = list(self.results[rung])
        k = len(keys) // self.eta
        if k == 0:
            return []
        sign = np.array([-1.0 if m else 1.0 for m in self.maximize])
        losses = np.array([self.results[rung][key] for key in keys]) * sign
        best = [keys[i] for i in promotion_order(losses)[:k]]
        ready = [key for key in best if key not in self.promoted[rung]]
        return ready[:max(0, k - len(self.promoted[rung]))] if self.capped else ready

    def next_promotion(self) -> tuple[Hashable, int] | None:
        """The promotion to start when a worker is free: from the highest rung that has one (ASHA's rule), as
        (candidate, rung it finished); None means start a new candidate at rung 0."""
        for rung in range(self.top - 1, -1, -1):
            ready = self.promotable(rung)
            if ready:
                return ready[0], rung
        return None

    def hopeless(self, key: Hashable, rung: int, candidates: int) -> bool:
        """True when ``key``'s result at ``rung`` can never be promoted in a search of at most ``candidates``
        candidates (its checkpoint may be deleted): it is at the top, was promoted already, or is dominated by at
        least as many results as the rung can ever promote. Dominators only accumulate, and each ranks ahead of it,
        so this never turns false again."""
        if rung >= self.top or key in self.promoted[rung]:
            return True
        cap = candidates
        for _ in range(rung):
            cap //= self.eta
        slots = cap // self.eta
        sign = np.array([-1.0 if m else 1.0 for m in self.maximize])
        mine = np.array(self.results[rung][key]) * sign
        others = np.array([v for k, v in self.results[rung].items() if k != key]).reshape(-1, len(sign)) * sign
        dominators = int(np.sum(np.all(others <= mine, axis=1) & np.any(others < mine, axis=1))) if len(others) else 0
        return dominators >= slots


class Rungs:
    """The candidates of a study between rungs: ``paused`` (number -> InFlight) wait for a promotion with the
    checkpoint of their last rung; ``seen_hashes`` are the networks with any rung result (not evaluated again)."""

    def __init__(self, study: optuna.Study, epochs: tuple[int, ...], eta: int,
                 objectives: tuple[obj.Objective, ...], progress, companions: RungStudies | None = None,
                 promotion: str = "asha") -> None:
        """``companions``: where each result below the top rung is also written for the dashboard; ``promotion``:
        "asha" or "capped" (:class:`Ladder`)."""
        self.study = study
        self.companions = companions
        self.epochs = epochs
        self.objectives = objectives
        self.progress = progress
        self.ladder = Ladder(epochs, eta, tuple(o.maximize for o in objectives), capped=promotion == "capped")
        self.paused: dict[int, InFlight] = {}
        self.seen_hashes: set[str] = set()

    @property
    def several(self) -> bool:
        return len(self.epochs) > 1

    def stop_at(self, run: InFlight) -> int | None:
        """The epochs after which ``run``'s training stops (None: one rung, the schedule's epochs)."""
        return self.epochs[run.rung] if self.several else None

    def epochs_trained(self, run: InFlight) -> int:
        """Epochs of the training that just took ``run`` to its rung (from the rung before)."""
        return self.epochs[run.rung] - (self.epochs[run.rung - 1] if run.rung > 0 else 0)

    def seconds(self, run: InFlight, key: str, seconds: float) -> float:
        """A candidate's total ``key`` seconds over the rungs it trained; with rungs, the split by rung (epochs)
        is kept in ``rung_<key>``, in the study, so a resumed driver adds to it."""
        if not self.several:
            return round(seconds, 2)
        split = {**run.trial.user_attrs.get(f"rung_{key}", {}), str(self.epochs[run.rung]): round(seconds, 2)}
        run.trial.set_user_attr(f"rung_{key}", split)
        return round(sum(split.values()), 2)

    def finished(self, run: InFlight, res: TrainResult, values: list[float]) -> bool:
        """Record a rung result; True when the candidate now waits below the top rung (the caller takes it out of
        its running set), False when it reached the top."""
        epochs = self.epochs[run.rung]
        run.rung_results[str(epochs)] = values
        run.trial.set_user_attr(st.RUNG_RESULTS, run.rung_results)
        run.trial.set_user_attr("rung_epochs", epochs)
        self.ladder.record(run.number, run.rung, values)
        self.seen_hashes.add(run.candidate.hash)
        if self.companions is not None and run.rung < self.ladder.top:
            self.companions.record(run.trial, epochs, values)
        if run.rung == self.ladder.top:
            self.drop_checkpoint(run)  # the previous rung's; the top rung keeps none
            return False
        run.checkpoint = res.extra.get("checkpoint")
        run.trial.set_user_attr("rung_checkpoint", run.checkpoint)
        run.training = False
        self.paused[run.number] = run
        main = next(i for i, o in enumerate(self.objectives) if o.needs_training)
        self.progress.note(f"trial {run.number:>3}  rung  {epochs} epochs: "
                           f"{self.objectives[main].name} {self.objectives[main].show(values[main])}; "
                           "waits for a promotion")
        return True

    def promote(self, number: int, rung: int) -> InFlight:
        """Take a paused candidate on to the next rung; the caller submits its training."""
        run = self.paused.pop(number)
        self.ladder.mark_promoted(number, rung)
        run.rung = rung + 1
        run.trial.set_user_attr("promoted_to", self.epochs[run.rung])
        run.training = True
        return run

    def stop_hopeless(self, budget: int) -> None:
        """Candidates that can never be promoted any more stop now (PRUNED) and their checkpoints go."""
        for number, run in list(self.paused.items()):
            if self.ladder.hopeless(number, run.rung, budget):
                self._stop(run, "dominated by more candidates than its rung can still promote")

    def stop_all(self) -> None:
        """The budget is spent and no promotion is left: every waiting candidate stops at its rung."""
        for run in list(self.paused.values()):
            self._stop(run, "the budget was spent before it was promoted")

    def _stop(self, run: InFlight, why: str) -> None:
        del self.paused[run.number]
        self.drop_checkpoint(run)
        run.trial.set_user_attr("stopped_at_rung", self.epochs[run.rung])
        run.trial.set_user_attr("stopped_because", why)
        self.study.tell(run.trial, state=TrialState.PRUNED)

    def withdraw(self, number: int) -> None:
        """A waiting candidate another writer finished (the dashboard): it leaves the ladder, its checkpoint goes."""
        run = self.paused.pop(number)
        self.ladder.forget(number)
        self.drop_checkpoint(run)

    @staticmethod
    def drop_checkpoint(run: InFlight) -> None:
        if run.checkpoint:
            Path(run.checkpoint).unlink(missing_ok=True)
            run.checkpoint = None

    def adopt(self, space: SearchSpace) -> list[InFlight]:
        """Rebuild the ladder from the study, and take over the candidates a stopped driver left between rungs
        (RUNNING with rung results): each waits again, or (returned) trains again the rung it was promoted to."""
        training = []
        finished_outside = st.outside_changes(self.study)  # withdrawn from the ladder when that happened
        for t in self.study.get_trials(deepcopy=False):
            results = st.rung_results(t) if str(t.number) not in finished_outside else {}
            for epochs, values in results.items():
                if epochs in self.epochs:
                    self.ladder.record(t.number, self.epochs.index(epochs), values)
            reached = [self.epochs.index(e) for e in results if e in self.epochs]
            for rung in range(max(reached, default=-1)):
                self.ladder.mark_promoted(t.number, rung)
            if results and "candidate_hash" in t.user_attrs:
                self.seen_hashes.add(t.user_attrs["candidate_hash"])
            if t.state != TrialState.RUNNING or not results:
                continue
            run = self._adopted(t, space, results, max(reached))
            promoted_to = t.user_attrs.get("promoted_to")
            if promoted_to in self.epochs and self.epochs.index(promoted_to) > run.rung:  # it was training that rung
                self.ladder.mark_promoted(t.number, run.rung)
                run.rung = self.epochs.index(promoted_to)
                training.append(run)
            else:
                self.paused[t.number] = run
        return training

    def _adopted(self, t: optuna.trial.FrozenTrial, space: SearchSpace, results: dict[int, list[float]],
                 last: int) -> InFlight:
        """The InFlight of a trial left between rungs. Its checkpoint may be gone: the training it is promoted to
        then starts its rung from the beginning (search/training/proxy.py ``unusable_checkpoint``)."""
        run = InFlight(optuna.Trial(self.study, t._trial_id), space.suggest(optuna.trial.FixedTrial(t.params)),
                       "", time.time(), latency=measured(t), rung=last, checkpoint=t.user_attrs.get("rung_checkpoint"),
                       ready=True, rung_results={str(e): v for e, v in results.items()})
        run.yaml_text = to_yaml(run.candidate, {"study": self.study.study_name, "trial": t.number})
        return run
