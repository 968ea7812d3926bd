"""One run of ``python -m search.run`` after its inputs are checked: Ray up, study opened, loop, report."""

from __future__ import annotations

import signal
import sys
import time
import warnings
from dataclasses import asdict
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from space.cli import table

from . import objectives as obj
from . import study as st
from .driver import Driver, SearchAborted, SearchConfig, front_rows, make_sampler
from .errors import SearchError
from .executor import Executor, PoolSettings
from .weights import base_training_job, prepare_base_weights, stored_base_weights

if TYPE_CHECKING:
    from .run import Prepared


class Progress:
    """tqdm bar of completed trials / budget with the best value of each objective and the Pareto size; one line
    per finished trial."""

    def __init__(self, study: optuna.Study, objectives: tuple[obj.Objective, ...], budget: int) -> None:
        self.study = study
        self.objectives = objectives
        self.budget = budget
        done = len(st.counted_trials(study))
        # disable=None: a bar on a terminal; in logs (no TTY) only the one-line-per-trial records below.
        self.bar = tqdm(total=budget, initial=min(done, budget), desc="trials", unit="trial", file=sys.stderr,
                        dynamic_ncols=True, disable=None,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        self._refresh()

    def _refresh(self) -> None:
        done = st.counted_trials(self.study)
        if done:
            best = []
            for i, o in enumerate(self.objectives):
                pick = max if o.maximize else min
                best.append(f"{o.name} {o.show(pick(t.values[i] for t in done))}")
            self.bar.set_postfix_str(f"best {', '.join(best)}; Pareto {len(st.pareto_trials(self.study, self.objectives))}")
        self.bar.n = min(len(done), self.budget)
        self.bar.refresh()

    def note(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def completed(self, number: int, text: str) -> None:
        t = self.study.get_trials(deepcopy=False)[number]
        values = "  ".join(f"{o.name} {o.show(v)}" for o, v in zip(self.objectives, t.values))
        self.note(f"{self._count()} trial {number:>3}  ok    {values}  {text}")
        self._refresh()

    def failed(self, number: int, text: str) -> None:
        self.note(f"{self._count()} trial {number:>3}  FAIL  {text}")
        self._refresh()

    def _count(self) -> str:
        return f"[{len(st.counted_trials(self.study))}/{self.budget}]"

    def close(self) -> None:
        self.bar.close()


def run_session(prep: "Prepared") -> int:
    """Start Ray, open or create the study, run the driver to the budget, print the front and export."""
    s, run = prep.settings, prep.settings.run
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = st.open_storage(s.storage_url)
    existing = st.find_study(storage, s.study_name)
    if existing is not None:
        try:
            st.check_driver_lock(existing)
        except SearchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        unfinished = existing.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        if len(st.counted_trials(existing)) >= run.budget and not unfinished:  # nothing to run: no Ray needed
            print(f"study {s.study_name!r} already holds {run.budget} completed trial(s); raise --budget to "
                  "continue it", file=sys.stderr)
            _finish(existing, storage, prep, 0.0)
            return 0
    pool = PoolSettings(workers=run.workers, cpus_per_trial=run.cpus_per_trial, gpus_per_trial=run.gpus_per_trial,
                        trial_timeout_s=run.trial_timeout, ray_address=run.ray_address)
    try:
        executor = Executor(pool, s.study.latency)
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _run(prep, storage, existing, executor)
    finally:
        executor.shutdown()


def _run(prep: "Prepared", storage, existing, executor: Executor) -> int:
    s, run, study_settings = prep.settings, prep.settings.run, prep.settings.study
    study_dir = s.study_dir
    artifact_dir = study_dir / "artifacts"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    schedule = study_settings.proxy
    # Offset by the trials already there: a resumed run must not replay the first run's random draws.
    sampler = make_sampler(run.sampler, schedule.seed + (len(existing.trials) if existing else 0), run.budget)
    study = optuna.create_study(study_name=s.study_name, storage=storage, sampler=sampler,
                                directions=obj.directions(prep.objectives), load_if_exists=True)
    started = time.time()
    st.heartbeat(study, started)
    if existing is None:
        study.set_metric_names(obj.names(prep.objectives))
        study.set_user_attr(st.SETTINGS_ATTR, study_settings.as_dict())
        study.set_user_attr(st.PATHS_ATTR, {"out": str(s.out), "study_dir": str(study_dir),
                                            "artifact_dir": str(artifact_dir), "storage": s.storage_url})
        if "none" in prep.space.placements:  # the base itself first: the reference point of every front
            study.enqueue_trial({"placement": "none"}, user_attrs={"role": "base"})
    study.set_user_attr(st.VERSIONS_ATTR, st.versions())
    study.set_user_attr("attnas_last_run", {**asdict(run), "resources": executor.describe(), "started": started})
    requeued = st.recover_stale_trials(study, storage)
    stale = (f"; re-queued {len(requeued)} trial(s) a stopped driver left running "
             f"({', '.join(str(n) for n, _ in requeued)})" if requeued else "")
    print(f"study {s.study_name!r} in {s.storage_url}: {len(st.completed_trials(study))} completed trial(s), "
          f"budget {run.budget}{stale}", file=sys.stderr)
    print(f"objectives: {', '.join(f'{o.name} ({o.direction})' for o in prep.objectives)}", file=sys.stderr)
    print(f"data: {prep.data.describe()}", file=sys.stderr)
    lat = study_settings.latency
    print(f"proxy: {schedule.epochs} epochs at {schedule.imgsz} px, batch {schedule.batch}, "
          f"fraction {schedule.as_dict()['fraction']}, {dict(schedule.train_args)}; latency on "
          f"{lat.device} at {lat.imgsz} px (median of {lat.runs})", file=sys.stderr)
    print(f"resources: {executor.describe()}; sampler {run.sampler}", file=sys.stderr)
    train_device = "0" if run.gpus_per_trial > 0 else "cpu"  # the first GPU Ray gives a trial
    threads = max(1, int(executor.cpus_per_trial))
    plan = study_settings.weights
    base_job = None
    try:
        if plan.mode == "auto":
            weights = stored_base_weights(study_dir)  # resume: an earlier run trained it
            if weights is None:  # trained in the pool, on one worker slot, while the meter times candidates
                base_job = base_training_job(plan, prep.space.base, str(prep.data.yaml), schedule,
                                             study_dir, threads, train_device)
        else:
            weights = prepare_base_weights(plan, prep.space.base, prep.data.nc, str(prep.data.yaml),
                                           schedule, study_dir, threads, checked=prep.checkpoint)
            if weights is not None:
                study.set_user_attr("attnas_base_weights", {"path": weights.state_path, **weights.info})
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = SearchConfig(budget=run.budget, schedule=schedule, objectives=prep.objectives,
                          data_yaml=str(prep.data.yaml), study_dir=study_dir, latency_imgsz=lat.imgsz,
                          train_device=train_device, threads_per_trial=threads, save_weights=run.save_weights,
                          faults=dict(run.faults), max_failures_in_a_row=run.max_failures_in_a_row, weights=weights,
                          base_job=base_job, lookahead=run.workers, constraints=study_settings.constraints)
    progress = Progress(study, prep.objectives, run.budget)
    store = optuna.artifacts.FileSystemArtifactStore(str(artifact_dir))
    driver = Driver(study, prep.space, executor, config, store, progress)
    t0 = time.time()
    status = 0
    # SIGTERM (a scheduler stopping the job) gets the same orderly stop as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        driver.run()
    except SearchAborted as err:
        progress.note(f"search stopped: {err}")
        status = 1
    except KeyboardInterrupt:
        progress.note("interrupted: running trials were failed and queued again; continue with --resume")
        status = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
    _finish(study, storage, prep, time.time() - t0)
    return status


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _finish(study: optuna.Study, storage, prep: "Prepared", wall: float) -> None:
    study_dir = prep.settings.study_dir
    report(study, prep, study_dir / "artifacts", wall)
    if prep.settings.run.export and st.completed_trials(study):
        from .export import export_study

        written = export_study(study, study_dir, storage)
        print(f"exported the front to {written}", file=sys.stderr)


def report(study: optuna.Study, prep: "Prepared", artifact_dir, wall: float) -> None:
    """Print the Pareto front as a table and the dashboard command."""
    done = st.completed_trials(study)
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    took = f"; this run took {wall:.0f} s" if wall else ""
    print(f"\n{len(done)} completed, {len(failed)} failed trial(s) in the study{took}")
    rows = front_rows(study, prep.objectives) if done else []
    if rows:
        directions = ", ".join(f"{o.name} {'up' if o.maximize else 'down'}" for o in prep.objectives)
        print(f"Pareto front ({len(rows)} trial(s); {directions}):")
        print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    print(f"\nDashboard: {st.dashboard_command(prep.settings.storage_url, artifact_dir)}")
