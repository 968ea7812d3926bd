"""The driver: owns the Optuna study (ask/tell), submits work to the Ray executor, records every outcome.

Budget semantics: ``budget`` counts candidates evaluated over the whole study (earlier runs included): COMPLETE
trials, and with several rungs also candidates that stopped below the top rung (PRUNED, with ``rung_results``) or
wait there for a promotion. Trials whose candidate already has a result at this fidelity complete at once with that
result (``reused_from``) and count.

Rungs (``--rungs 1,3,9``): every candidate trains to the first rung; :class:`search.rungs.Ladder` decides which
continue, from their rung checkpoint, when a worker is free (promotions before new candidates, as in ASHA). A
candidate between rungs is a RUNNING trial with its ``rung_results`` and ``rung_checkpoint``: a resumed driver adopts
it. Only the top rung tells values (COMPLETE), so ``study.best_trials`` and every front compare like with like.

Pipelining: the driver asks ``lookahead`` trials more than there are workers, so the next candidates are sampled,
built and timed while the workers train; a worker that finishes starts the next training at once instead of
waiting for the sampler and the latency meter. With ``--weights auto`` the base trains first on one worker slot
while the meter already times the first candidates; their trainings start when the base is stored.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from space import Candidate, SearchSpace, to_yaml

from . import objectives as obj
from . import study as st
from .errors import SearchError
from .latency import LatencyResult, study_reference_ms
from .proxy import ProxySchedule, TrainJob, TrainResult
from .reconnect import DatabaseUnreachable
from .rungs import Ladder
from .settings import Constraints
from .weights import BaseCache, BaseWeights, store_base_weights
from .work import Event, WorkPool

BASE_KEY = "base"  # the executor key of the base training (trial keys are trial numbers)
SETTLE = 5  # reference windows after which the study's reference latency is fixed


@dataclass
class SearchConfig:
    """Everything the driver loop needs besides the study, the space and the executor."""

    budget: int
    schedule: ProxySchedule
    objectives: tuple[obj.Objective, ...]
    data_yaml: str
    study_dir: Path
    latency_imgsz: int
    train_device: str = "cpu"
    threads_per_trial: int = 1
    save_weights: bool = False
    faults: dict[int, str] = field(default_factory=dict)  # test hook: trial number -> fault kind
    max_failures_in_a_row: int = 5
    max_pruned_in_a_row: int = 200
    weights: BaseWeights | None = None  # what candidates inherit; None trains from scratch (or the base is pending)
    base_job: TrainJob | None = None  # --weights auto, not trained yet: the pool trains it before any candidate
    constraints: Constraints = Constraints()  # known before training: breaking one skips the training
    lookahead: int = 1  # trials sampled and timed ahead of a free worker (0: strictly ask → time → train)
    rungs: tuple[int, ...] = ()  # epochs at each rung; () or one value: every candidate trains schedule.epochs
    eta: int = 3
    base_cache: BaseCache | None = None  # where a trained base is also kept for other studies (--weights auto)
    base_cache_key: str | None = None


@dataclass
class _Running:
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


class SearchAborted(RuntimeError):
    """Too many trials in a row failed (or were invalid): the search stops instead of burning the budget."""


class StudyGone(SearchAborted):
    """The study was deleted or renamed by another writer (optuna-dashboard) while the search ran.

    ``renamed_to`` is the new name when the study was renamed (its trials and attributes were copied), else None."""

    def __init__(self, message: str, renamed_to: str | None = None) -> None:
        super().__init__(message)
        self.renamed_to = renamed_to


class Driver:
    """Ask → latency → train → tell, with up to ``executor.pool.workers`` trainings at once and ``lookahead``
    more trials timed ahead of them."""

    def __init__(self, study: optuna.Study, space: SearchSpace, executor: WorkPool, config: SearchConfig,
                 artifact_store, progress, storage: optuna.storages.BaseStorage) -> None:
        self.study = study
        self.storage = storage  # the study's storage, read directly to notice other writers (the dashboard)
        self.space = space
        self.executor = executor
        self.config = config
        self.store = artifact_store
        self.progress = progress
        self.fidelity = config.schedule.key()
        self.running: dict[int, _Running] = {}
        by_hand = st.outside_changes(study)
        self.done_by_hash: dict[str, optuna.trial.FrozenTrial] = {  # values typed in by hand are not a result
            t.user_attrs["candidate_hash"]: t for t in st.completed_trials(study)
            if t.user_attrs.get("fidelity") == self.fidelity and "candidate_hash" in t.user_attrs
            and str(t.number) not in by_hand}
        self.failures_in_a_row = 0
        self.pruned_in_a_row = 0
        self.infeasible_in_a_row = 0
        self.started = time.time()
        self._last_beat = 0.0
        self.base_pending = config.base_job is not None
        self.rungs = config.rungs or (config.schedule.epochs,)
        self.ladder = Ladder(self.rungs, config.eta, tuple(o.maximize for o in config.objectives))
        self.paused: dict[int, _Running] = {}  # candidates that finished a rung below the top, awaiting promotion
        self.seen_hashes: set[str] = set()  # candidates with a rung result (paused, stopped or complete)
        self._adopt_rung_trials()

    # -- main loop -------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run until the study holds ``budget`` completed trials."""
        try:
            if self.base_pending:
                self.executor.submit_train(BASE_KEY, self.config.base_job, kind="base")
            while True:
                try:
                    if self._step():
                        return
                except (SearchAborted, DatabaseUnreachable):
                    raise
                except Exception as err:  # a write that lost a race with another writer (the dashboard)?
                    self._check_study()
                    if not isinstance(err, UpdateFinishedTrialError):
                        raise
                    self._sync_outside_changes()
        except (StudyGone, DatabaseUnreachable):
            with contextlib.suppress(Exception):
                self.executor.cancel_all()
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

    def _step(self) -> bool:
        """One turn of the loop: notice other writers, ask what the budget needs, collect finished work; True when
        the study holds the budget and nothing runs."""
        self._check_study()
        self._sync_outside_changes()
        self._sync_paused()
        self._beat()
        if self._completed() >= self.config.budget and not self.running and self.ladder.next_promotion() is None:
            self._stop_paused()
            return True
        # Ask only what the budget still needs: completed + in flight never exceeds it.
        while (len(self.running) < self.executor.workers + self.config.lookahead
               and self._completed() + self._in_flight() < self.config.budget):
            self.executor.checkpoint()  # a proposal is up to 0.4 s of multi-threaded numpy: not inside a window
            self._start_one()
        for event in self.executor.wait(timeout_s=1.0):
            self._handle(event)
        self._dispatch()
        return False

    # -- other writers (optuna-dashboard) ---------------------------------------------------------------------
    def _check_study(self) -> None:
        """Stop in order when the study was deleted or renamed (the dashboard's rename copies it and deletes it)."""
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
        raise StudyGone(f"study {name!r} was renamed to {renamed.study_name!r} while the search ran", renamed.study_name)

    def _sync_outside_changes(self) -> None:
        """Trials another writer finished while they ran (the dashboard's Fail / Complete): never told again.

        Failed: "stop this one": its work is cancelled and its worker freed, it is not queued again.
        Completed by hand: the values given are kept; the trial is marked so that pareto/ and dedup leave it out.
        A finished trial takes no more attributes, so the mark is kept in the study's ``attnas_outside_changes``."""
        storage = self.storage
        for run in list(self.running.values()):
            state = storage.get_trial(run.trial._trial_id).state
            if state == TrialState.RUNNING:
                run.followers = [f for f in run.followers if self._follower_still_ours(f, run)]
                continue
            self._cancel(run.trial.number)
            del self.running[run.trial.number]
            kind = "stopped-from-dashboard" if state == TrialState.FAIL else "completed-by-hand"
            st.record_outside_change(self.study, run.trial.number, kind)
            verb = "failed" if state == TrialState.FAIL else "completed"
            self.progress.note(f"trial {run.trial.number}: {verb} from outside (optuna-dashboard?) while it ran; "
                               "its work was stopped" + ("" if state == TrialState.FAIL else
                                                         ", its values kept as given and left out of pareto/"))
            for follower in run.followers:  # trials waiting on this network's result: there will be none
                if storage.get_trial(follower._trial_id).state != TrialState.RUNNING:
                    continue
                follower.set_user_attr("fail_kind", "stopped-from-dashboard")
                follower.set_user_attr("fail_reason", f"same candidate as trial {run.trial.number}, which was "
                                                      f"{verb} from outside while it ran")
                self.study.tell(follower, state=TrialState.FAIL)

    def _sync_paused(self) -> None:
        """A candidate waiting between rungs that another writer finished: it waits no more."""
        for number, run in list(self.paused.items()):
            state = self.storage.get_trial(run.trial._trial_id).state
            if state != TrialState.RUNNING:
                del self.paused[number]
                self._drop_checkpoint(run)
                kind = "stopped-from-dashboard" if state == TrialState.FAIL else "completed-by-hand"
                st.record_outside_change(self.study, number, kind)

    def _follower_still_ours(self, follower: optuna.Trial, leader: _Running) -> bool:
        state = self.storage.get_trial(follower._trial_id).state
        if state != TrialState.RUNNING:
            kind = "stopped-from-dashboard" if state == TrialState.FAIL else "completed-by-hand"
            st.record_outside_change(self.study, follower.number, kind)
            self.progress.note(f"trial {follower.number} (waiting on trial {leader.trial.number}): finished from "
                               "outside")
        return state == TrialState.RUNNING

    def _cancel(self, key: Any) -> None:
        self.executor.cancel(key)

    def _dispatch(self) -> None:
        """Start trainings while a worker is free: promotions first (ASHA), then timed trials, oldest first."""
        if self.base_pending:
            return
        training = sum(r.training for r in self.running.values())
        while training < self.executor.workers and (promotion := self.ladder.next_promotion()) is not None:
            self._promote(*promotion)
            training += 1
        for run in sorted(self.running.values(), key=lambda r: r.trial.number):
            if training >= self.executor.workers:
                return
            if run.ready and not run.training:
                self.executor.submit_train(run.trial.number, self._train_job(run))
                run.training = True
                training += 1

    def _train_job(self, run: _Running) -> TrainJob:
        c = self.config
        return TrainJob(trial=run.trial.number, candidate_hash=run.candidate.hash, yaml_text=run.yaml_text,
                        data=c.data_yaml, schedule=c.schedule, run_dir=run.trial.user_attrs["run_dir"],
                        device=c.train_device, threads=c.threads_per_trial, save_weights=c.save_weights,
                        fault=c.faults.get(run.trial.number),
                        weights=c.weights.state_path if c.weights else None, base_layers=run.candidate.base_layers,
                        skip_keys=c.weights.skip_keys if c.weights else (),
                        stop_at=self.rungs[run.rung] if len(self.rungs) > 1 else None,
                        resume=run.checkpoint if run.rung > 0 else None)

    def _in_flight(self) -> int:
        """New candidates not evaluated yet (promoted ones were counted when they finished their first rung)."""
        return sum(1 + len(r.followers) for r in self.running.values() if r.rung == 0)

    def _completed(self) -> int:
        return (len(st.counted_trials(self.study)) + len(self.paused)
                + sum(1 for r in self.running.values() if r.rung > 0))

    def _beat(self) -> None:
        if time.time() - self._last_beat > st.HEARTBEAT_S:
            st.heartbeat(self.study, self.started)
            self._last_beat = time.time()

    # -- asking ----------------------------------------------------------------------------------------------
    def _start_one(self) -> None:
        """Ask one trial and start it: pruned if invalid, completed at once if its result exists, else submitted."""
        trial = self.study.ask()
        try:
            candidate = self.space.suggest(trial)
        except optuna.TrialPruned:
            self.study.tell(trial, state=TrialState.PRUNED)
            self.pruned_in_a_row += 1
            if self.pruned_in_a_row >= self.config.max_pruned_in_a_row:
                raise SearchAborted(f"{self.pruned_in_a_row} invalid candidates in a row; is the space too narrow?")
            return
        self.pruned_in_a_row = 0
        trial.set_user_attr("candidate_hash", candidate.hash)
        trial.set_user_attr("placements", candidate.describe())
        trial.set_user_attr("fidelity", self.fidelity)
        trial.set_user_attr("proxy", self.config.schedule.as_dict())
        done = self.done_by_hash.get(candidate.hash)
        if done is not None:
            self._reuse(trial, done)
            return
        if candidate.hash in self.seen_hashes:  # stopped below the top rung, or waiting there: no new result
            trial.set_user_attr("duplicate_of_rung_candidate", True)
            self.study.tell(trial, state=TrialState.PRUNED)
            self.pruned_in_a_row += 1
            return
        leader = next((r for r in self.running.values() if r.candidate.hash == candidate.hash), None)
        if leader is not None:  # the same network is being evaluated right now: share its result
            leader.followers.append(trial)
            self.progress.note(f"trial {trial.number}: same candidate as running trial {leader.trial.number}, "
                               "will reuse its result")
            return
        run_dir = self.config.study_dir / "trials" / str(trial.number)
        yaml_path = run_dir / f"candidate-{candidate.hash}.yaml"
        run_dir.mkdir(parents=True, exist_ok=True)
        yaml_text = to_yaml(candidate, {"study": self.study.study_name, "trial": trial.number})
        yaml_path.write_text(yaml_text)
        trial.set_user_attr("run_dir", str(run_dir))
        artifact_id = None
        if self.store is not None:
            artifact_id = optuna.artifacts.upload_artifact(
                artifact_store=self.store, file_path=str(yaml_path), study_or_trial=trial,
                mimetype="application/x-yaml", encoding="utf-8")
            with contextlib.suppress(Exception):  # a note is a convenience, never a reason to fail a trial
                st.save_note(trial, st.trial_note(trial, candidate.describe(), yaml_path, artifact_id))
        self.running[trial.number] = _Running(trial, candidate, yaml_text, time.time())
        self.executor.submit_latency(trial.number, candidate, self.config.schedule.imgsz)

    def _reuse(self, trial: optuna.Trial, done: optuna.trial.FrozenTrial) -> None:
        have = trial.user_attrs
        for key, value in done.user_attrs.items():
            if key not in have and key not in ("run_dir", "requeued_from", "role"):
                trial.set_user_attr(key, value)
        trial.set_user_attr("reused_from", done.number)
        for name, value in done.system_attrs.items():  # the constraints of the same network are the same
            if name.startswith("constraints:"):
                trial.set_constraint(name.split(":", 1)[1], value)
        self.study.tell(trial, list(done.values))
        if "infeasible" in done.user_attrs:
            self._count_infeasible()
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
            self.progress.note(f"trial {run.trial.number}: worker died ({event.info.get('reason')}); retrying once")
        elif event.kind == "latency":
            self._on_latency(run, event.result)
        elif event.kind == "train":
            self._on_train(run, event.result)

    def _on_base(self, event: Event) -> None:
        """The base training of --weights auto finished: store its weights, then candidates may train."""
        if event.kind == "retry":
            self.progress.note(f"base training: worker died ({event.info.get('reason')}); retrying once")
            return
        try:
            weights = store_base_weights(self.config.base_job, event.result, self.config.study_dir,
                                         say=self.progress.note, cache=self.config.base_cache,
                                         key=self.config.base_cache_key)
        except SearchError as err:
            raise SearchAborted(str(err)) from None
        self.study.set_user_attr("attnas_base_weights", {"path": weights.state_path, **weights.info})
        self.config.weights = weights
        self.base_pending = False

    def _on_latency(self, run: _Running, lat: LatencyResult) -> None:
        if lat.error:
            self._fail(run, "latency", lat.error)
            return
        run.latency = lat
        self._add_reference_window(lat)
        attrs = {"n_params": lat.params, "gflops": round(lat.gflops, 4), "gflops_imgsz": self.config.latency_imgsz,
                 "latency_ms": self._scaled(lat).latency_ms, "latency_own_ms": lat.median_ms,
                 "latency_p90_ms": round(lat.p90_ms, 4), "latency_iqr_ms": round(lat.iqr_ms, 4),
                 "latency_min_ms": round(lat.min_ms, 4), "latency_n": lat.n, "latency_threads": lat.threads,
                 "latency_s": round(lat.measure_s, 2), "latency_exclusive_s": round(lat.exclusive_s, 2),
                 "latency_backend": lat.backend, "peak_mem_mb": lat.peak_mem_mb}
        if lat.ratio is not None:
            attrs.update({"latency_ratio": lat.ratio, "latency_ci_low": lat.ci_low, "latency_ci_high": lat.ci_high,
                          "latency_ci_level": lat.ci_level, "latency_reference_ms": lat.reference_ms,
                          "latency_aa": lat.aa, "latency_foreign_cpu_s": lat.foreign_cpu_s,
                          "latency_windows": len(lat.windows),
                          "latency_windows_rejected": [w["rejected"] for w in lat.windows if w["rejected"]]})
            _write_windows(run.trial.user_attrs.get("run_dir"), lat)
        if not lat.accepted:  # kept off the exported front until remeasure_contended() passes (search/study.py)
            attrs["latency_contended"] = True
            self.progress.note(f"trial {run.trial.number}: latency contended ({'; '.join(lat.rejected)}) after "
                               f"{len(lat.windows)} window(s); timed again at the end of the run")
        if lat.contended:
            attrs["latency_contended_by"] = lat.contended
        for key, value in attrs.items():
            run.trial.set_user_attr(key, value)
        if self._infeasible(run, lat):
            return
        run.ready = True
        self._dispatch()

    def _add_reference_window(self, lat: LatencyResult) -> None:
        """A paired measurement's reference median joins the study's windows until the study's reference latency
        has settled (search.latency.study_reference_ms); from then on it is fixed for the study's life."""
        info = dict(self.study.user_attrs.get(st.LATENCY_REF_ATTR) or {"windows": [], "fixed": False})
        if lat.reference_ms is None or info["fixed"]:
            return
        windows = [*info["windows"], lat.reference_ms]
        self.study.set_user_attr(st.LATENCY_REF_ATTR, {"windows": windows, "ms": study_reference_ms(windows, SETTLE),
                                                       "fixed": len(windows) >= SETTLE})

    def _scaled(self, lat: LatencyResult) -> LatencyResult:
        """``lat`` with its latency objective set: the paired ratio times the study's reference latency as it is
        now (settled after the first few measurements), or the candidate's own median when it was timed alone."""
        info = self.study.user_attrs.get(st.LATENCY_REF_ATTR)
        lat.latency_ms = lat.ratio * info["ms"] if lat.ratio is not None and info else lat.median_ms
        return lat

    def _infeasible(self, run: _Running, lat: LatencyResult) -> bool:
        """Apply --max-latency-ms / --max-params through Optuna's constraints (value <= 0 is feasible).

        A candidate that breaks one is never trained: it is told COMPLETE with mAP 0 and its measured latency,
        so samplers learn where the infeasible region is while ``study.best_trials`` ignores it."""
        c = self.config.constraints
        limits = {"latency_ms": (lat.latency_ms, c.max_latency_ms), "params": (lat.params, c.max_params)}
        broken = []
        for trial in [run.trial, *run.followers]:
            for name, (value, limit) in limits.items():
                if limit is not None:
                    trial.set_constraint(name, float(value - limit))
        for name, (value, limit) in limits.items():
            if limit is not None and value > limit:
                broken.append(f"{name} {value:g} > {limit:g}")
        if not broken:
            return False
        reason = "; ".join(broken)
        values = obj.values(self.config.objectives, lat, None)
        for trial in [run.trial, *run.followers]:
            trial.set_user_attr("infeasible", reason)
            self.study.tell(trial, values)
        del self.running[run.trial.number]
        self.done_by_hash[run.candidate.hash] = self.study.get_trials(deepcopy=False)[run.trial.number]
        self.progress.note(f"trial {run.trial.number}: infeasible ({reason}), not trained")
        self._count_infeasible()
        return True

    def _seconds(self, run: _Running, key: str, seconds: float) -> float:
        """A candidate's total ``key`` seconds over the rungs it trained; with rungs, the split by rung (epochs)
        is kept in ``rung_<key>``, in the study, so a resumed driver adds to it."""
        if len(self.rungs) == 1:
            return round(seconds, 2)
        split = {**run.trial.user_attrs.get(f"rung_{key}", {}), str(self.rungs[run.rung]): round(seconds, 2)}
        run.trial.set_user_attr(f"rung_{key}", split)
        return round(sum(split.values()), 2)

    def _count_infeasible(self) -> None:
        self.infeasible_in_a_row += 1
        if self.infeasible_in_a_row >= self.config.max_pruned_in_a_row:
            raise SearchAborted(f"{self.infeasible_in_a_row} infeasible candidates in a row; are the limits "
                                "(--max-latency-ms / --max-params) reachable?")

    def _on_train(self, run: _Running, res: TrainResult) -> None:
        run.trial.set_user_attr("train_s", self._seconds(run, "train_s", res.train_s))
        run.trial.set_user_attr("attempts", run.attempts)
        if res.error:
            if res.traceback:
                run.trial.set_user_attr("traceback", res.traceback[-2000:])
            self._fail(run, res.error_kind or "exception", res.error)
            return
        run.trial.set_user_attr("map50_95", res.map50_95)
        run.trial.set_user_attr("map50", res.map50)
        for key, value in res.extra.items():  # e.g. what was inherited from the base weights
            if key not in _RUNG_INTERNALS:
                run.trial.set_user_attr(key, self._seconds(run, key, value) if key in _SUMMED_OVER_RUNGS else value)
        self.infeasible_in_a_row = 0
        values = obj.values(self.config.objectives, self._scaled(run.latency), res)
        run.trial.set_user_attr("latency_ms", run.latency.latency_ms)
        if len(self.rungs) > 1 and self._finished_rung(run, res, values):
            return
        self.study.tell(run.trial, values)
        del self.running[run.trial.number]
        self.failures_in_a_row = 0
        self.done_by_hash[run.candidate.hash] = self.study.get_trials(deepcopy=False)[run.trial.number]
        self.progress.completed(run.trial.number, f"{run.candidate.describe()}  ({time.time() - run.started:.0f} s)")
        for follower in run.followers:
            self._reuse(follower, self.done_by_hash[run.candidate.hash])

    # -- latency re-measure ---------------------------------------------------------------------------------
    def remeasure_contended(self) -> None:
        """Time again, now that no training runs, every completed trial whose latency was recorded contended; the
        results go to the study's ``REMEASURED_ATTR`` (a finished trial's values cannot change), from which the
        front reads them (search/study.py ``front_trials``). Trials that fail again stay off the front."""
        done = self.study.user_attrs.get(st.REMEASURED_ATTR) or {}
        todo = [t for t in st.completed_trials(self.study) if t.user_attrs.get("latency_contended")
                and "reused_from" not in t.user_attrs and str(t.number) not in done]
        if not todo:
            return
        self.progress.note(f"timing {len(todo)} contended latenc{'y' if len(todo) == 1 else 'ies'} again")
        pending = {}
        for t in todo:
            key = ("remeasure", t.number)
            self.executor.submit_latency(key, self.space.suggest(optuna.trial.FixedTrial(t.params)),
                                         self.config.schedule.imgsz)
            pending[key] = t
        info = self.study.user_attrs.get(st.LATENCY_REF_ATTR) or {}
        while pending:
            for event in self.executor.wait(timeout_s=1.0):
                t = pending.pop(event.key, None)
                if t is None:
                    continue
                lat: LatencyResult = event.result
                ok = not lat.error and lat.accepted and lat.ratio is not None and "ms" in info
                entry = {"accepted": bool(ok), "error": lat.error, "rejected": lat.rejected, "ratio": lat.ratio,
                         "ci_low": lat.ci_low, "ci_high": lat.ci_high,
                         "latency_ms": lat.ratio * info["ms"] if ok else None}
                _write_windows(t.user_attrs.get("run_dir"), lat, "latency-windows-remeasured.json")
                done = {**(self.study.user_attrs.get(st.REMEASURED_ATTR) or {}), str(t.number): entry}
                self.study.set_user_attr(st.REMEASURED_ATTR, done)
                verdict = (f"ratio {lat.ratio:.4f} [{lat.ci_low:.4f}, {lat.ci_high:.4f}]" if ok
                           else f"still not trusted ({lat.error or '; '.join(lat.rejected)}): left off the front")
                self.progress.note(f"trial {t.number:>3}  latency timed again: {verdict}")

    # -- confirmation --------------------------------------------------------------------------------------
    def confirm(self, seeds: int) -> None:
        """Train the top-rung front and the base again with ``seeds`` more seeds (seed + 1, ...), up to
        ``workers`` at a time, recording each result in the study as it arrives (see search/confirm.py)."""
        from . import confirm

        todo = confirm.todo(self.study, self.config.objectives, seeds)
        if not todo:
            return
        self.progress.note(f"confirming the front: {len(todo)} training(s) of {len({t.number for t, _ in todo})} "
                           f"trial(s) with other seeds")
        pending: dict[tuple, optuna.trial.FrozenTrial] = {}
        try:
            while todo or pending:
                self._beat()
                while todo and len(pending) < self.executor.workers:
                    trial, k = todo.pop(0)
                    key = ("confirm", trial.number, k)
                    self.executor.submit_train(key, self._confirm_job(trial, k))
                    pending[key] = trial
                for event in self.executor.wait(timeout_s=1.0):
                    if event.kind != "train" or event.key not in pending:
                        continue
                    trial, res = pending.pop(event.key), event.result
                    values = None if res.error else obj.values(self.config.objectives, measured(trial), res)
                    confirm.record(self.study, trial.number, event.key[2], values, res.error, res.train_s)
                    shown = res.error or "  ".join(f"{o.name} {o.show(v)}" for o, v in
                                                   zip(self.config.objectives, values) if o.needs_training)
                    self.progress.note(f"trial {trial.number:>3}  seed +{event.key[2]}  {shown}")
        finally:
            if pending:
                with contextlib.suppress(Exception):
                    self.executor.cancel_all()

    def _confirm_job(self, trial: optuna.trial.FrozenTrial, offset: int) -> TrainJob:
        c = self.config
        candidate = self.space.suggest(optuna.trial.FixedTrial(trial.params))
        return TrainJob(trial=trial.number, candidate_hash=candidate.hash,
                        yaml_text=to_yaml(candidate, {"study": self.study.study_name, "trial": trial.number}),
                        data=c.data_yaml, schedule=replace(c.schedule, seed=c.schedule.seed + offset),
                        run_dir=str(c.study_dir / "trials" / str(trial.number) / f"confirm-seed+{offset}"),
                        device=c.train_device, threads=c.threads_per_trial,
                        weights=c.weights.state_path if c.weights else None, base_layers=candidate.base_layers,
                        skip_keys=c.weights.skip_keys if c.weights else (), attempt=0)

    # -- rungs -----------------------------------------------------------------------------------------------
    def _finished_rung(self, run: _Running, res: TrainResult, values: list[float]) -> bool:
        """Record a rung result; True when the candidate pauses below the top rung (False: it reached the top)."""
        n = run.trial.number
        epochs = self.rungs[run.rung]
        run.rung_results[str(epochs)] = values
        run.trial.set_user_attr(st.RUNG_RESULTS, run.rung_results)
        run.trial.set_user_attr("rung_epochs", epochs)
        self.ladder.record(n, run.rung, values)
        self.seen_hashes.add(run.candidate.hash)
        if run.rung == self.ladder.top:
            self._drop_checkpoint(run)  # the previous rung's; the top rung keeps none
            return False
        run.checkpoint = res.extra.get("checkpoint")
        run.trial.set_user_attr("rung_checkpoint", run.checkpoint)
        run.training = False
        del self.running[n]
        self.paused[n] = run
        self.failures_in_a_row = 0
        main = next(i for i, o in enumerate(self.config.objectives) if o.needs_training)
        self.progress.note(f"trial {n:>3}  rung  {epochs} epochs: "
                           f"{self.config.objectives[main].name} {self.config.objectives[main].show(values[main])}; "
                           "waits for a promotion")
        if run.trial.user_attrs.get("role") == "base":  # the reference of every front reaches the top rung
            self._promote(n, run.rung)
        self._stop_hopeless()
        return True

    def _promote(self, number: int, rung: int) -> None:
        """Continue a paused candidate from its checkpoint to the next rung."""
        run = self.paused.pop(number)
        self.ladder.mark_promoted(number, rung)
        run.rung = rung + 1
        run.trial.set_user_attr("promoted_to", self.rungs[run.rung])
        run.training = True
        self.running[number] = run
        self.executor.submit_train(number, self._train_job(run))

    def _stop_hopeless(self) -> None:
        """Candidates that can never be promoted any more stop now (PRUNED) and their checkpoints go."""
        for number, run in list(self.paused.items()):
            if self.ladder.hopeless(number, run.rung, self.config.budget):
                self._stop(run, "dominated by more candidates than its rung can still promote")

    def _stop_paused(self) -> None:
        """The budget is spent and no promotion is left: every waiting candidate stops at its rung."""
        for run in list(self.paused.values()):
            self._stop(run, "the budget was spent before it was promoted")

    def _stop(self, run: _Running, why: str) -> None:
        del self.paused[run.trial.number]
        self._drop_checkpoint(run)
        run.trial.set_user_attr("stopped_at_rung", self.rungs[run.rung])
        run.trial.set_user_attr("stopped_because", why)
        self.study.tell(run.trial, state=TrialState.PRUNED)

    def _drop_checkpoint(self, run: _Running) -> None:
        if run.checkpoint:
            Path(run.checkpoint).unlink(missing_ok=True)
            run.checkpoint = None

    def _adopt_rung_trials(self) -> None:
        """Rebuild the ladder from the study, and take over the candidates a stopped driver left between rungs
        (RUNNING with rung results): each waits again, or trains again the rung it was promoted to."""
        for t in self.study.get_trials(deepcopy=False):
            results = st.rung_results(t)
            for epochs, values in results.items():
                if epochs in self.rungs:
                    self.ladder.record(t.number, self.rungs.index(epochs), values)
            reached = [self.rungs.index(e) for e in results if e in self.rungs]
            for rung in range(max(reached, default=-1)):
                self.ladder.mark_promoted(t.number, rung)
            if results and "candidate_hash" in t.user_attrs:
                self.seen_hashes.add(t.user_attrs["candidate_hash"])
            if t.state != TrialState.RUNNING or not results:
                continue
            last = max(reached)
            run = _Running(optuna.Trial(self.study, t._trial_id), self.space.suggest(optuna.trial.FixedTrial(t.params)),
                           "", time.time(), latency=measured(t), rung=last, checkpoint=t.user_attrs.get("rung_checkpoint"),
                           ready=True, rung_results={str(e): v for e, v in results.items()})
            run.yaml_text = to_yaml(run.candidate, {"study": self.study.study_name, "trial": t.number})
            if not (run.checkpoint and Path(run.checkpoint).is_file()):  # nothing to continue from
                run.trial.set_user_attr("fail_kind", "driver-stopped")
                run.trial.set_user_attr("fail_reason", "its rung checkpoint is gone; parameters queued again")
                self.study.tell(run.trial, state=TrialState.FAIL)
                self.study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number})
                continue
            promoted_to = t.user_attrs.get("promoted_to")
            if promoted_to in self.rungs and self.rungs.index(promoted_to) > last:  # it was training that rung
                self.ladder.mark_promoted(t.number, last)
                run.rung = self.rungs.index(promoted_to)
                self.running[t.number] = run
            else:
                self.paused[t.number] = run

    def _fail(self, run: _Running, kind: str, reason: str) -> None:
        for trial in [run.trial, *run.followers]:
            trial.set_user_attr("fail_kind", kind)
            trial.set_user_attr("fail_reason", reason if trial is run.trial
                                else f"same candidate as trial {run.trial.number}, which failed: {reason}")
            self.study.tell(trial, state=TrialState.FAIL)
        del self.running[run.trial.number]
        self.progress.failed(run.trial.number, f"{kind}: {reason}")
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= self.config.max_failures_in_a_row:
            raise SearchAborted(f"{self.failures_in_a_row} trials in a row failed; last: {kind}: {reason}")

    def _abandon_running(self) -> None:
        """On interrupt or abort: stop the work, fail the in-flight trials and queue their parameters again."""
        with contextlib.suppress(Exception):
            self.executor.cancel_all()
        for run in list(self.running.values()):
            if run.rung > 0:  # a promoted candidate keeps its rung results and checkpoint: a resume adopts it
                continue
            for trial in [run.trial, *run.followers]:
                with contextlib.suppress(Exception):
                    trial.set_user_attr("fail_kind", "driver-stopped")
                    trial.set_user_attr("fail_reason", "the driver stopped while this trial ran; "
                                                       "parameters queued again")
                    self.study.tell(trial, state=TrialState.FAIL)
                    self.study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
        self.running.clear()


_RUNG_INTERNALS = frozenset({"checkpoint", "lr", "state_at_start", "state_at_end", "start_epoch"})
# Seconds a result carries in its extras (the executor adds them) that, like train_s, are a candidate's total over
# the rungs it trained, with the split by rung in rung_<key>.
_SUMMED_OVER_RUNGS = frozenset({"parked_s"})


def _write_windows(run_dir: str | None, lat: LatencyResult, name: str = "latency-windows.json") -> None:
    """Every window's raw runs beside the trial (the estimator can be re-read from them later); best effort."""
    if not run_dir or not lat.windows:
        return
    with contextlib.suppress(OSError):
        (Path(run_dir) / name).write_text(json.dumps({"ratio": lat.ratio, "accepted": lat.accepted,
                                                      "windows": lat.windows}))


def measured(trial: optuna.trial.FrozenTrial) -> LatencyResult:
    """The meter's measurement of a trial, as its attributes recorded it (for objectives known before training)."""
    a = trial.user_attrs
    return LatencyResult(median_ms=a.get("latency_own_ms"), latency_ms=a.get("latency_ms"), params=a.get("n_params"),
                         gflops=a.get("gflops"), peak_mem_mb=a.get("peak_mem_mb"))


def make_sampler(name: str, seed: int, budget: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The multi-objective sampler for ``--sampler`` (see the README for why ``evolution`` is the default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "evolution":
            from .strategy import EvolutionSampler

            return EvolutionSampler(space, seed=seed)
        if name == "tpe":
            # multivariate+group models the conditional parameters (P4.module exists only if P4 is placed) jointly;
            # constant_liar keeps parallel asks from proposing the candidate that is already training.
            return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                              n_startup_trials=min(10, max(2, budget // 5)))
        if name == "nsga2":
            # The default population of 50 would give a single generation at budget 50.
            return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, budget // 4)), seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


SAMPLERS = ("evolution", "tpe", "nsga2", "gp", "random")


def front_rows(study: optuna.Study, objectives: tuple[obj.Objective, ...]) -> list[dict[str, Any]]:
    """The Pareto-optimal trials as table rows: each objective, then size and candidate."""
    rows = []
    for t in st.pareto_trials(study, objectives):
        a = t.user_attrs
        row: dict[str, Any] = {"trial": t.number}
        row.update({o.name: o.show(v) for o, v in zip(objectives, t.values)})
        row.update({"mAP50": f"{a.get('map50', float('nan')):.4f}", "p90 ms": f"{a.get('latency_p90_ms', float('nan')):.2f}",
                    "params": f"{a.get('n_params', 0) / 1e6:.3f}M", "GFLOPs": f"{a.get('gflops', 0):.2f}",
                    "candidate": a.get("placements", "?")})
        rows.append(row)
    return rows
