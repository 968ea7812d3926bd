"""The driver: owns the Optuna study (ask/tell), submits work to the pool, records every outcome.

Budget semantics: ``budget`` counts candidates evaluated over the whole study (earlier runs included): COMPLETE
trials, and with several rungs also candidates that stopped below the top rung (PRUNED, with ``rung_results``) or
wait there for a promotion. Trials whose candidate already has a result at this fidelity complete at once with that
result (``reused_from``) and count.

Rungs (``--rungs 1,3,9``): every candidate trains to the first rung; :class:`search.engine.rungs.Rungs` decides
which continue, from their rung checkpoint, when a worker is free (promotions before new candidates, as in ASHA).
Only the top rung tells values (COMPLETE), so ``study.best_trials`` and every front compare like with like.

Pipelining: the driver asks ``lookahead`` trials (one per worker) more than there are workers, so the next
candidates are sampled, built and timed while the workers train; a worker that finishes starts the next training at
once instead of waiting for the sampler and the latency meter. With ``--weights auto`` the base trains first on one
worker slot while the meter already times the first candidates; their trainings start when the base is stored.

The parts it composes, each readable alone: :class:`~.feasibility.LatencyBook` (what a measurement means),
:class:`~.rungs.Rungs` (candidates between rungs), :class:`~.outside.OutsideWriters` (the dashboard),
:class:`~.jobs.TrainJobs` (what a training needs).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from space import SearchSpace

from .. import objectives as obj
from ..errors import SearchError, disk_fault
from ..latency import LatencyResult
from ..settings import Settings
from ..storage import study as st
from ..storage.companions import RungStudies
from ..storage.reconnect import DatabaseUnreachable
from ..training.proxy import DISK_FULL, TrainResult, epochs_written
from ..training.weights import BaseSource, store_base_weights
from .confirmation import confirm_front
from .feasibility import LatencyBook
from .inflight import DiskFull, InARow, InFlight, SearchAborted, StudyGone
from .jobs import TrainJobs
from .outside import OutsideWriters
from .rungs import Rungs
from .work import Event, WorkPool

BASE_KEY = "base"  # the pool key of the base training (trial keys are trial numbers)
MAX_PRUNED_IN_A_ROW = 200  # invalid or infeasible proposals in a row before the search gives up
_RUNG_INTERNALS = frozenset({"checkpoint", "lr", "state_at_start", "state_at_end", "start_epoch"})
# Seconds a result carries in its extras (the executor adds them) that, like train_s, are a candidate's total over
# the rungs it trained, with the split by rung in rung_<key>.
_SUMMED_OVER_RUNGS = frozenset({"parked_s"})


class Driver:
    """Ask → latency → train → tell, with up to ``pool.workers`` trainings at once and as many more trials timed
    ahead of them."""

    def __init__(self, study: optuna.Study, space: SearchSpace, pool: WorkPool, settings: Settings, jobs: TrainJobs,
                 base: BaseSource, progress, storage: optuna.storages.BaseStorage, artifact_store=None, *,
                 lookahead: int | None = None, max_pruned_in_a_row: int = MAX_PRUNED_IN_A_ROW) -> None:
        """``lookahead``: trials sampled and timed ahead of a free worker (default one per worker; 0: strictly
        ask → time → train)."""
        self.study, self.space, self.pool, self.settings = study, space, pool, settings
        self.jobs, self.base, self.progress, self.store = jobs, base, progress, artifact_store
        self.budget = settings.run.budget
        self.objectives = settings.study.objective_table()
        self.fidelity = settings.study.proxy.key()
        self.latency = LatencyBook(study, self.objectives, settings.study.constraints, settings.study.latency.imgsz,
                                   progress)
        fidelity = settings.study.fidelity
        companions = RungStudies(study, storage) if len(fidelity.rungs) > 1 else None  # the dashboard's view
        self.rungs = Rungs(study, fidelity.rungs, fidelity.eta, self.objectives, progress, companions,
                           fidelity.promotion)
        self.outside = OutsideWriters(study, storage, progress)
        self.done_by_hash = st.results_by_hash(study, self.fidelity)
        self.in_a_row = InARow(settings.run.max_failures_in_a_row, max_pruned_in_a_row)
        self.lookahead = pool.workers if lookahead is None else lookahead
        self.started, self._last_beat = time.time(), 0.0
        self.base_pending = base.job is not None
        self.running: dict[int, InFlight] = {run.number: run for run in self.rungs.adopt(space)}

    # -- main loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run until the study holds ``budget`` completed trials."""
        try:
            if self.base_pending:
                self.pool.submit_train(BASE_KEY, self.base.job, kind="base")
            while not self._step_tolerating_races():
                pass
        except (StudyGone, DatabaseUnreachable):
            with contextlib.suppress(Exception):
                self.pool.cancel_all()
            # Not ours to fail any more (a renamed study holds copies), or nothing can be written: a resume
            # re-queues the trials left RUNNING.
            self.running.clear()
            raise
        except BaseException:
            self._abandon_running()
            raise
        finally:
            with contextlib.suppress(Exception):
                st.release_driver_lock(self.study)

    def _step_tolerating_races(self) -> bool:
        try:
            return self._step()
        except (SearchAborted, DatabaseUnreachable):
            raise
        except OSError as err:
            written = Path(err.filename) if err.filename else None
            full = disk_fault(err, f"writing {written.name}" if written else "writing the study's files",
                              written.parent if written else self.jobs.study_dir, "free space there")
            if full is None:
                raise
            raise DiskFull(str(full)) from err
        except Exception as err:  # a write that lost a race with another writer (the dashboard)?
            self.outside.check_study()
            if not isinstance(err, UpdateFinishedTrialError):
                raise
            self.outside.sync_running(self.running, self.pool.cancel)
            return False

    def _step(self) -> bool:
        """One turn of the loop: notice other writers, ask what the budget needs, collect finished work; True when
        the study holds the budget and nothing runs."""
        self.outside.check_study()
        self.outside.sync_running(self.running, self.pool.cancel)
        self.outside.sync_paused(self.rungs.paused, self.rungs.withdraw)
        self._last_beat = st.beat(self.study, self.started, self._last_beat)
        if self._completed() >= self.budget and not self.running and self.rungs.ladder.next_promotion() is None:
            self.rungs.stop_all()
            return True
        # Ask only what the budget still needs: completed + in flight never exceeds it.
        while (len(self.running) < self.pool.workers + self.lookahead
               and self._completed() + self._in_flight() < self.budget):
            self.pool.checkpoint()  # a proposal is up to 0.4 s of multi-threaded numpy: not inside a window
            self._start_one()
        for event in self.pool.wait(timeout_s=1.0):
            self._handle(event)
        self._dispatch()
        self.progress.tick(sum(r.training for r in self.running.values()) + self.base_pending,
                           self._base_progress() if self.base_pending else None)
        return False

    def _base_progress(self) -> tuple[int, int, float, tuple[int, float] | None]:
        """Epochs the base training finished, its epochs, the seconds since it started, and (epoch, mAP50-95) of its
        latest validation (None before the first)."""
        job = self.base.job
        done, latest = epochs_written(job)
        return done, job.schedule.epochs, time.time() - self.started, latest

    def _dispatch(self) -> None:
        """Start trainings while a worker is free: promotions first (ASHA), then timed trials, oldest first."""
        if self.base_pending:
            return
        training = sum(r.training for r in self.running.values())
        while training < self.pool.workers and (promotion := self.rungs.ladder.next_promotion()) is not None:
            self._promote(*promotion)
            training += 1
        for run in sorted(self.running.values(), key=lambda r: r.number):
            if training >= self.pool.workers:
                return
            if run.ready and not run.training:
                self.pool.submit_train(run.number, self.jobs.candidate(run, self.rungs.stop_at(run)))
                run.training = True
                training += 1

    def _promote(self, number: int, rung: int) -> None:
        run = self.rungs.promote(number, rung)
        self.running[number] = run
        self.pool.submit_train(number, self.jobs.candidate(run, self.rungs.stop_at(run)))

    def _in_flight(self) -> int:
        """New candidates not evaluated yet (promoted ones were counted when they finished their first rung)."""
        return sum(1 + len(r.followers) for r in self.running.values() if r.rung == 0)

    def _completed(self) -> int:
        return (len(st.counted_trials(self.study)) + len(self.rungs.paused)
                + sum(1 for r in self.running.values() if r.rung > 0))

    # -- asking ----------------------------------------------------------------------------------------------
    def _start_one(self) -> None:
        """Ask one trial and start it: pruned if invalid, completed at once if its result exists, else timed."""
        trial = self.study.ask()
        try:
            candidate = self.space.suggest(trial)
        except optuna.TrialPruned:
            self.study.tell(trial, state=TrialState.PRUNED)
            self.in_a_row.invalid()
            return
        self.in_a_row.pruned = 0
        for key, value in (("candidate_hash", candidate.hash), ("placements", candidate.describe()),
                           ("fidelity", self.fidelity), ("proxy", self.settings.study.proxy.as_dict())):
            trial.set_user_attr(key, value)
        done = self.done_by_hash.get(candidate.hash)
        if done is not None:
            self._reuse(trial, done)
            return
        if candidate.hash in self.rungs.seen_hashes:  # stopped below the top rung, or waiting there: no new result
            trial.set_user_attr("duplicate_of_rung_candidate", True)
            self.study.tell(trial, state=TrialState.PRUNED)
            self.in_a_row.pruned += 1
            return
        leader = next((r for r in self.running.values() if r.candidate.hash == candidate.hash), None)
        if leader is not None:  # the same network is being evaluated right now: share its result
            leader.followers.append(trial)
            self.progress.note(f"trial {trial.number}: same candidate as running trial {leader.number}, "
                               "will reuse its result")
            return
        try:
            yaml_text = self.jobs.write_candidate(self.study, trial, candidate, self.store)
        except OSError:  # a full disk: the search stops, and this candidate is proposed again on resume
            st.requeue(self.study, trial, "its files could not be written; parameters queued again")
            raise
        self.running[trial.number] = InFlight(trial, candidate, yaml_text, time.time())
        self.pool.submit_latency(trial.number, candidate, self.settings.study.proxy.imgsz)

    def _reuse(self, trial: optuna.Trial, done: optuna.trial.FrozenTrial) -> None:
        st.copy_result(self.study, trial, done)
        if "infeasible" in done.user_attrs:
            self.in_a_row.was_infeasible()
        self.progress.completed(trial.number, f"reused trial {done.number} (same candidate, same fidelity)")

    # -- results ---------------------------------------------------------------------------------------------
    def _handle(self, event: Event) -> None:
        if event.key == BASE_KEY:
            self._on_base(event)
            return
        run = self.running.get(event.key)
        if run is None:
            return
        if event.kind == "retry":
            run.attempts += 1
            run.trial.set_user_attr("retried_after", event.info.get("reason", "worker died"))
            self.progress.note(f"trial {run.number}: worker died ({event.info.get('reason')}); retrying once")
        elif event.kind == "latency":
            self._on_latency(run, event.result)
        elif event.kind == "train":
            self._on_train(run, event.result)

    def _on_base(self, event: Event) -> None:
        """The base training of --weights auto finished: store its weights, then candidates may train."""
        if event.kind == "retry":
            self.progress.note(f"base training: worker died ({event.info.get('reason')}); retrying once")
            return
        if event.result.error_kind == DISK_FULL:
            raise DiskFull(f"--weights auto: training the base stopped: {event.result.error}")
        try:
            weights = store_base_weights(self.base.job, event.result, self.jobs.study_dir, say=self.progress.say,
                                         cache=self.base.cache, key=self.base.cache_key)
        except SearchError as err:
            raise SearchAborted(str(err)) from None
        self.study.set_user_attr("attnas_base_weights", {"path": weights.state_path, **weights.info})
        self.jobs.weights = weights
        self.base_pending = False

    def _on_latency(self, run: InFlight, lat: LatencyResult) -> None:
        if lat.error:
            self._fail(run, "latency", lat.error)
            return
        self.latency.record(run, lat)
        if self.latency.infeasible(run, lat) is not None:
            del self.running[run.number]
            self.done_by_hash[run.candidate.hash] = self.study.get_trials(deepcopy=False)[run.number]
            self.in_a_row.was_infeasible()
            return
        run.ready = True
        self._dispatch()

    def _on_train(self, run: InFlight, res: TrainResult) -> None:
        if res.error_kind == DISK_FULL:  # kept in ``running``: re-queued (or adopted between rungs) on resume
            raise DiskFull(f"trial {run.number}'s training stopped: {res.error}")
        run.trial.set_user_attr("train_s", self.rungs.seconds(run, "train_s", res.train_s))
        run.trial.set_user_attr("attempts", run.attempts)
        if res.error:
            if res.traceback:
                run.trial.set_user_attr("traceback", res.traceback[-2000:])
            self._fail(run, res.error_kind or "exception", res.error)
            return
        self.progress.trained(self.rungs.epochs_trained(run), res.train_s)
        run.trial.set_user_attr("map50_95", res.map50_95)
        run.trial.set_user_attr("map50", res.map50)
        for key, value in res.extra.items():  # e.g. what was inherited from the base weights
            if key not in _RUNG_INTERNALS:
                summed = key in _SUMMED_OVER_RUNGS
                run.trial.set_user_attr(key, self.rungs.seconds(run, key, value) if summed else value)
        self.in_a_row.infeasible = 0
        values = obj.values(self.objectives, self.latency.scaled(run.latency), res)
        run.trial.set_user_attr("latency_ms", run.latency.latency_ms)
        if self.rungs.several and self.rungs.finished(run, res, values):
            del self.running[run.number]
            self.in_a_row.failures = 0
            if run.trial.user_attrs.get("role") == "base":  # the reference of every front reaches the top rung
                self._promote(run.number, run.rung)
            self.rungs.stop_hopeless(self.budget)
            return
        self.study.tell(run.trial, values)
        del self.running[run.number]
        self.in_a_row.failures = 0
        self.done_by_hash[run.candidate.hash] = self.study.get_trials(deepcopy=False)[run.number]
        self.progress.completed(run.number, f"{run.candidate.describe()}  ({time.time() - run.started:.0f} s)")
        for follower in run.followers:
            self._reuse(follower, self.done_by_hash[run.candidate.hash])

    # -- after the budget ------------------------------------------------------------------------------------
    def remeasure_contended(self) -> None:
        """Time again every completed trial whose latency was contended (:class:`LatencyBook`)."""
        self.latency.remeasure_contended(self.pool, self.space, self.settings.study.proxy.imgsz)

    def confirm(self, seeds: int) -> None:
        """Train the front and the base again with ``seeds`` more seeds (search/engine/confirmation.py)."""
        confirm_front(self.study, self.space, self.pool, self.jobs, self.objectives, seeds, self.progress,
                      self.started)

    # -- failures --------------------------------------------------------------------------------------------
    def _fail(self, run: InFlight, kind: str, reason: str) -> None:
        for trial in run.trials():
            st.fail(self.study, trial, kind, reason if trial is run.trial
                    else f"same candidate as trial {run.number}, which failed: {reason}")
        del self.running[run.number]
        self.progress.failed(run.number, f"{kind}: {reason}")
        self.in_a_row.failed(f"{kind}: {reason}")

    def _abandon_running(self) -> None:
        """On interrupt or abort: stop the work, fail the in-flight trials and queue their parameters again."""
        with contextlib.suppress(Exception):
            self.pool.cancel_all()
        for run in self.running.values():
            if run.rung == 0:  # a promoted candidate keeps its rung results and checkpoint: a resume adopts it
                run.requeue(self.study)
        self.running.clear()


__all__ = ["BASE_KEY", "DiskFull", "Driver", "SearchAborted", "StudyGone"]
