"""One run of ``python -m search.run`` after its inputs are checked: Ray up, study opened, loop, report."""

from __future__ import annotations

import signal
import sys
import time
import warnings
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from space.cli import table

from . import study as st
from .driver import Driver, SearchAborted, SearchConfig, front_rows, make_sampler
from .errors import SearchError
from .executor import Executor, PoolSettings
from .weights import base_training_job, prepare_base_weights, stored_base_weights

if TYPE_CHECKING:
    from .run import Prepared


class Progress:
    """tqdm bar of completed trials / budget with best mAP and Pareto size; one line per finished trial."""

    def __init__(self, study: optuna.Study, budget: int) -> None:
        self.study = study
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
            self.bar.set_postfix_str(f"best mAP50-95 {max(t.values[0] for t in done):.4f}, "
                                     f"Pareto {len(st.pareto_trials(self.study))}")
        self.bar.n = min(len(done), self.budget)
        self.bar.refresh()

    def note(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def completed(self, number: int, text: str) -> None:
        t = self.study.get_trials(deepcopy=False)[number]
        self.note(f"{self._count()} trial {number:>3}  ok    mAP50-95 {t.values[0]:.4f}  "
                  f"latency {t.values[1]:8.2f} ms  {text}")
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
    args = prep.args
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = st.open_storage(prep.storage_url)
    existing = st.find_study(storage, prep.study_name)
    if existing is not None:
        try:
            st.check_driver_lock(existing)
        except SearchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        unfinished = existing.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        if len(st.counted_trials(existing)) >= args.budget and not unfinished:  # nothing to run: no Ray needed
            print(f"study {prep.study_name!r} already holds {args.budget} completed trial(s); raise --budget to "
                  "continue it", file=sys.stderr)
            _finish(existing, prep, 0.0)
            return 0
    pool = PoolSettings(workers=args.workers, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                        trial_timeout_s=args.trial_timeout, ray_address=args.ray_address)
    try:
        executor = Executor(pool, prep.latency)
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _run(prep, storage, existing, executor)
    finally:
        executor.shutdown()


def _run(prep: "Prepared", storage, existing, executor: Executor) -> int:
    args = prep.args
    study_dir = prep.out / prep.study_name
    artifact_dir = study_dir / "artifacts"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    # Offset by the trials already there: a resumed run must not replay the first run's random draws.
    sampler = make_sampler(args.sampler, prep.schedule.seed + (len(existing.trials) if existing else 0), args.budget)
    study = optuna.create_study(study_name=prep.study_name, storage=storage, sampler=sampler,
                                directions=list(st.DIRECTIONS), load_if_exists=True)
    started = time.time()
    st.heartbeat(study, started)
    if existing is None:
        study.set_metric_names(list(st.OBJECTIVES))
        study.set_user_attr(st.SETTINGS_ATTR, prep.settings)
        study.set_user_attr(st.PATHS_ATTR, {"out": str(prep.out), "study_dir": str(study_dir),
                                            "artifact_dir": str(artifact_dir), "storage": prep.storage_url})
        if "none" in prep.space.placements:  # the base itself first: the reference point of every front
            study.enqueue_trial({"placement": "none"}, user_attrs={"role": "base"})
    study.set_user_attr(st.VERSIONS_ATTR, st.versions())
    study.set_user_attr("attnas_last_run", {"sampler": args.sampler, "workers": args.workers, "budget": args.budget,
                                            "resources": executor.describe(), "started": started})
    requeued = st.recover_stale_trials(study)
    stale = (f"; re-queued {len(requeued)} trial(s) a stopped driver left running "
             f"({', '.join(str(n) for n, _ in requeued)})" if requeued else "")
    print(f"study {prep.study_name!r} in {prep.storage_url}: {len(st.completed_trials(study))} completed trial(s), "
          f"budget {args.budget}{stale}", file=sys.stderr)
    print(f"data: {prep.data.describe()}", file=sys.stderr)
    print(f"proxy: {prep.schedule.epochs} epochs at {prep.schedule.imgsz} px, batch {prep.schedule.batch}, "
          f"fraction {prep.settings['proxy']['fraction']}, {dict(prep.schedule.train_args)}; latency on "
          f"{prep.latency.device} at {prep.latency.imgsz} px (median of {prep.latency.runs})", file=sys.stderr)
    print(f"resources: {executor.describe()}; sampler {args.sampler}", file=sys.stderr)
    train_device = "0" if args.gpus_per_trial > 0 else "cpu"  # the first GPU Ray gives a trial
    threads = max(1, int(executor.cpus_per_trial))
    base_job = None
    try:
        if prep.weights.mode == "auto":
            weights = stored_base_weights(study_dir)  # resume: an earlier run trained it
            if weights is None:  # trained in the pool, on one worker slot, while the meter times candidates
                base_job = base_training_job(prep.weights, prep.space.base, str(prep.data.yaml), prep.schedule,
                                             study_dir, threads, train_device)
        else:
            weights = prepare_base_weights(prep.weights, prep.space.base, prep.data.nc, str(prep.data.yaml),
                                           prep.schedule, study_dir, threads, checked=prep.checkpoint)
            if weights is not None:
                study.set_user_attr("attnas_base_weights", {"path": weights.state_path, **weights.info})
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    constraints = prep.settings["constraints"]
    config = SearchConfig(budget=args.budget, schedule=prep.schedule, data_yaml=str(prep.data.yaml),
                          study_dir=study_dir, latency_imgsz=prep.latency.imgsz, train_device=train_device,
                          threads_per_trial=threads, save_weights=args.save_weights,
                          faults=prep.faults, max_failures_in_a_row=args.max_failures_in_a_row, weights=weights,
                          base_job=base_job, lookahead=args.workers,
                          max_latency_ms=constraints["max_latency_ms"], max_params=constraints["max_params"])
    progress = Progress(study, args.budget)
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
    _finish(study, prep, time.time() - t0)
    return status


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _finish(study: optuna.Study, prep: "Prepared", wall: float) -> None:
    study_dir = prep.out / prep.study_name
    report(study, prep, study_dir / "artifacts", wall)
    if not prep.args.no_export and st.completed_trials(study):
        from .export import export_study

        written = export_study(study, study_dir)
        print(f"exported the front to {written}", file=sys.stderr)


def report(study: optuna.Study, prep: "Prepared", artifact_dir, wall: float) -> None:
    """Print the Pareto front as a table and the dashboard command."""
    done = st.completed_trials(study)
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    took = f"; this run took {wall:.0f} s" if wall else ""
    print(f"\n{len(done)} completed, {len(failed)} failed trial(s) in the study{took}")
    rows = front_rows(study) if done else []
    if rows:
        print(f"Pareto front ({len(rows)} trial(s); mAP50-95 up, latency down):")
        print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    print(f"\nDashboard: {st.dashboard_command(prep.storage_url, artifact_dir)}")
