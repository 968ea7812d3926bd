"""One run of ``python -m search.run`` after its inputs are checked: Ray up, study opened, base weights, the
driver to the budget, the contended latencies timed again, the front confirmed, reported and exported."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState
from space import make_candidate

from . import objectives as obj
from .engine import cluster
from .engine.driver import DiskFull, Driver, SearchAborted, StudyGone
from .engine.executor import Executor
from .engine.jobs import TrainJobs
from .errors import SearchError, disk_fault
from .front import confirm
from .front.export import confirmation_state, export_study
from .front.report import report
from .latency.audit import busy_warning
from .prepare import Prepared
from .progress import EpochPlan, Progress, StudyNotes
from .settings import RAY_START_S, differences
from .storage import study as st
from .storage.reconnect import DatabaseFull, DatabaseUnreachable
from .storage.study import recorded_study_dir
from .strategy import make_sampler
from .training.proxy import QuietFileHandler
from .training.weights import (BaseCache, BaseSource, base_cache_key, base_training_job, prepare_base_weights,
                               stored_base_weights)


def run_session(prep: Prepared) -> int:
    """Start Ray, open or create the study, run the driver to the budget, print the front and export.

    Nothing is written to the storage before Ray is up: a run refused at start leaves no study behind."""
    s, run = prep.settings, prep.settings.run
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # SIGTERM (a scheduler stopping the job) gets the same orderly stop as Ctrl-C, at every stage.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        storage, existing = None, None
        if st.may_hold_studies(s.storage_url):  # opening a SQLite/journal file that is not there would create it
            storage = st.open_storage(s.storage_url)
            existing = st.find_study(storage, s.study_name)
        if existing is not None:
            st.check_driver_lock(existing)
            unfinished = existing.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
            unconfirmed = confirm.todo(existing, prep.objectives, s.study.fidelity.confirm_seeds)
            if len(st.counted_trials(existing)) >= run.budget and not unfinished and not unconfirmed:
                # nothing to run: no Ray needed
                print(f"study {s.study_name!r} already holds {run.budget} completed trial(s); raise --budget to "
                      "continue it", file=sys.stderr)
                return _finish(existing, storage, prep, 0.0, study_dir_of(prep, existing))
        executor = start_executor(prep)
        try:
            prep = prepare_cluster(prep, executor, existing)
        except BaseException:
            executor.shutdown()
            raise
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted while starting; no study was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if storage is None:
            storage = st.open_storage(s.storage_url)
        return _run(prep, storage, existing, executor)
    except DatabaseUnreachable as err:  # nothing more can be written; the trials left RUNNING are re-queued on resume
        then = "Then continue with" if isinstance(err, DatabaseFull) else "Continue when it is back"
        print(f"error: {err}; stopped. {then}: {prep.settings.resume_command(s.study_name)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the driver ran (opening the study, storing the base weights): nothing lost
        print(f"interrupted; continue with: {prep.settings.resume_command(s.study_name)}", file=sys.stderr)
        return 130
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        executor.shutdown()


def start_executor(prep: Prepared) -> Executor:
    """Start or join Ray within RAY_START_S; SIGTERM and Ctrl-C stop it (Ray's own retries run for minutes).

    A handler that cannot run (Ray blocked in native code) is backed by a watchdog that ends the process: nothing
    has been written to any study yet, so a hard exit loses nothing."""
    run = prep.settings.run
    where = run.ray_address or "local Ray"
    starting = threading.Event()
    starting.set()

    def hard_exit(message: str, status: int) -> None:
        if starting.is_set():
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(status)

    def on_signal(signum, frame) -> None:
        threading.Timer(5.0, hard_exit, ("interrupted while starting Ray; no study was written", 130)).start()
        raise KeyboardInterrupt

    def on_alarm(signum, frame) -> None:
        raise SearchError(f"Ray at {where} did not start within {RAY_START_S:g} s; no study was written")

    watchdog = threading.Timer(RAY_START_S + 10.0, hard_exit,
                               (f"Ray at {where} did not start within {RAY_START_S:g} s; no study was written", 2))
    watchdog.daemon = True
    handlers = {sig: signal.signal(sig, h) for sig, h in
                ((signal.SIGTERM, on_signal), (signal.SIGINT, on_signal), (signal.SIGALRM, on_alarm))}
    signal.setitimer(signal.ITIMER_REAL, RAY_START_S)
    watchdog.start()
    try:
        # The meter times every candidate paired with the base network (search/latency).
        return Executor(run, prep.settings.study.latency, reference=make_candidate(prep.space.base),
                        base=prep.space.base, table_dir=str(prep.settings.out / "latency-table"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        starting.clear()
        watchdog.cancel()
        for sig, h in handlers.items():
            signal.signal(sig, h)


def prepare_cluster(prep: Prepared, executor: Executor, existing: optuna.Study | None) -> Prepared:
    """On a cluster (--ray-address), once Ray is up and before anything is written: the latency node's facts join
    the study's identity (a resume timed elsewhere is refused), and every training node is checked for the dataset
    and --out (or the dataset is shipped, --ship-data). Local Ray: nothing to do (one machine)."""
    s = prep.settings
    if not s.run.ray_address:  # local Ray: the meter runs on this machine, whose facts search.run.prepare recorded
        return prep
    ident = executor.latency_identity()
    facts = {k: ident[k] for k in ("backend_version", "device_model", "node")}
    if existing is not None:
        stored = existing.user_attrs[st.SETTINGS_ATTR].get("facts", {}).get("latency", {})
        if "node" not in stored:  # a study from before latency nodes were recorded: it was timed on its driver
            facts.pop("node")
        if stored != facts:
            raise SearchError(f"study {s.study_name!r} was timed on another latency machine: "
                              + "; ".join(differences(stored, facts, "latency.")) + "; pass --latency-node naming "
                              f"the node it was timed on ({stored.get('node', '?')})")
    study = dataclasses.replace(s.study, facts={**s.study.facts, "latency": facts})
    data_yaml, summary = cluster.prepare_nodes(prep.data.yaml, s.out, s.run.gpus_per_trial, s.run.ship_data)
    print(f"cluster: {summary}", file=sys.stderr)
    return dataclasses.replace(prep, settings=dataclasses.replace(s, study=study),
                               data=dataclasses.replace(prep.data, yaml=data_yaml))


def study_dir_of(prep: Prepared, study: optuna.Study | None) -> Path:
    """Where the study's files are: the directory recorded when it was created (a study renamed in the dashboard
    keeps it), else ``<out>/<study name>``."""
    recorded = recorded_study_dir(study) if study is not None else None
    return recorded or prep.settings.study_dir


def _run(prep: Prepared, storage, existing, executor: Executor) -> int:
    """Open the study, get the base weights, drive the search to the budget, confirm the front, report."""
    study_dir = study_dir_of(prep, existing)
    study = _open_study(prep, storage, existing, study_dir, executor)
    _say_what_runs(prep, study, storage, executor)
    threads = max(1, int(executor.cpus_per_trial))
    log = study_log(study_dir)
    try:
        base = _base_weights(prep, study, study_dir, threads)
    except DatabaseUnreachable:
        raise
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        full = disk_fault(err, "storing the base weights", study_dir, "free space there")
        if full is None:
            raise
        log.error("stopped: %s", full, exc_info=err)
        print(f"error: {full}; then continue with: {prep.settings.resume_command(study.study_name)}", file=sys.stderr)
        return 1
    notes = StudyNotes(study, prep.settings, study_dir, executor.describe(), storage)
    fidelity, run = prep.settings.study.fidelity, prep.settings.run
    plan = EpochPlan(fidelity.rungs, fidelity.eta, run.budget, fidelity.confirm_seeds, executor.workers)
    progress = Progress(study, prep.objectives, plan, log, run.verbose, on_update=notes.update)
    store = optuna.artifacts.FileSystemArtifactStore(str(study_dir / "artifacts"))
    jobs = TrainJobs(prep.settings, str(prep.data.yaml), study_dir, threads, base.weights)
    driver = Driver(study, prep.space, executor, prep.settings, jobs, base, progress, storage, store)
    t0 = time.time()
    status, stopped = 0, None  # stopped: the line that says why the run ended early, printed last
    resume = prep.settings.resume_command(study.study_name)
    # SIGTERM (a scheduler stopping the job) gets the same orderly stop as Ctrl-C, to the end of the export.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        confirming = False
        try:
            driver.run()
            confirming = True
            driver.remeasure_contended()  # before confirmation: its trainings would share the windows' cores
            driver.confirm(prep.settings.study.fidelity.confirm_seeds)
        except StudyGone as err:
            progress.close()
            return _study_gone(prep, storage, study_dir, executor, err)
        except SearchAborted as err:
            log.error("search stopped: %s", err, exc_info=err)
            stopped = f"search stopped: {err}" + (f"; then continue with: {resume}"
                                                  if isinstance(err, DiskFull) else "")
            status = 1
        except KeyboardInterrupt:
            stopped = ("interrupted while confirming the front: the seeds not recorded yet train on resume"
                       if confirming else "interrupted: running trials were failed and queued again")
            stopped += f"; continue with: {resume}"
            status = 130
        finally:
            progress.close()
        with contextlib.suppress(Exception):
            notes.update(status={0: "finished", 1: "stopped", 130: "interrupted"}.get(status, "stopped"))
        exported = _finish(study, storage, prep, time.time() - t0, study_dir)
        if stopped:
            log.info(stopped)
            print(stopped, file=sys.stderr)
        return status or exported
    finally:
        signal.signal(signal.SIGTERM, previous)


def _open_study(prep: Prepared, storage, existing, study_dir: Path, executor: Executor) -> optuna.Study:
    """Create the study (recording its settings, paths and the base as trial 0) or load it to continue."""
    s, run = prep.settings, prep.settings.run
    artifact_dir = study_dir / "artifacts"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    # The evolution strategy proposes from (seed, trial number) and the study alone, so a resumed study continues
    # exactly; the baselines are offset by the trials already there, so they do not replay the first run's draws.
    seed = s.study.proxy.seed + (len(existing.trials) if existing and run.sampler != "evolution" else 0)
    sampler = make_sampler(run.sampler, seed, run.budget, prep.space)
    study = optuna.create_study(study_name=s.study_name, storage=storage, sampler=sampler,
                                directions=obj.directions(prep.objectives), load_if_exists=True)
    started = time.time()
    st.heartbeat(study, started)
    if existing is None:
        study.set_metric_names(obj.names(prep.objectives))
        study.set_user_attr(st.SETTINGS_ATTR, s.study.as_dict())
        study.set_user_attr(st.PATHS_ATTR, {"out": str(s.out), "study_dir": str(study_dir),
                                            "artifact_dir": str(artifact_dir), "storage": s.storage_url})
        if "none" in prep.space.placements:  # the base itself first: the reference point of every front
            study.enqueue_trial({"placement": "none"}, user_attrs={"role": "base"})
    if study.metric_names is None:  # optuna-dashboard's rename copies trials and user attributes, not these
        study.set_metric_names(obj.names(prep.objectives))
    study.set_user_attr(st.VERSIONS_ATTR, st.versions())
    study.set_user_attr("attnas_last_run", {**dataclasses.asdict(run), "resources": executor.describe(), "started": started})
    node = executor.latency_node  # its id changes when the cluster restarts: recorded here, not in the identity
    study.set_user_attr("attnas_latency_node", {"id": node.id, "hostname": node.hostname, "ip": node.ip,
                                                "device": s.study.latency.device})
    return study


def _say_what_runs(prep: Prepared, study: optuna.Study, storage, executor: Executor) -> None:
    """Re-queue what a stopped driver left running, and print the settings this run works with."""
    s, run, fidelity = prep.settings, prep.settings.run, prep.settings.study.fidelity
    requeued = st.recover_stale_trials(study, storage)
    stale = (f"; re-queued {len(requeued)} trial(s) a stopped driver left running "
             f"({', '.join(str(n) for n, _ in requeued)})" if requeued else "")
    say = functools.partial(print, file=sys.stderr)
    say(f"study {s.study_name!r} in {s.storage_url}: {len(st.completed_trials(study))} completed trial(s), "
        f"budget {run.budget}{stale}")
    say(f"objectives: {', '.join(f'{o.name} ({o.direction})' for o in prep.objectives)}")
    say(f"data: {prep.data.describe()}")
    for note in prep.data.notes:  # images the label check found unusable: trials skip them too
        say(f"data: {note}")
    schedule, lat = s.study.proxy, s.study.latency
    say(f"proxy: {schedule.epochs} epochs at {schedule.imgsz} px, batch {schedule.batch}, "
        f"fraction {schedule.as_dict()['fraction']}, {dict(schedule.train_args)}; rungs {list(fidelity.rungs)} "
        f"epochs (eta {fidelity.eta}), {fidelity.confirm_seeds} confirmation seed(s)")
    say(f"latency: {lat.backend} on {lat.device} at {lat.imgsz} px, batch {lat.batch}, paired with the base "
        f"({min(lat.min_runs, lat.runs)}-{lat.runs} pairs, {lat.statistic}; a window is accepted within ±{lat.ci:.0%} "
        f"and an A/A control within ±{lat.aa_tolerance:.0%}, {lat.tries} tries)")
    say(f"resources: {executor.describe()}; sampler {run.sampler}")
    if lat.device == "cpu" and not run.ray_address:  # the meter shares this machine's cores
        warning = busy_warning(len(os.sched_getaffinity(0)))
        if warning:
            say(warning)



def _base_weights(prep: Prepared, study: optuna.Study, study_dir: Path, threads: int) -> BaseSource:
    """What candidates inherit: a stored base (--weights PATH, or auto trained by an earlier run or study), or the
    base training the pool runs first."""
    plan, schedule, s = prep.settings.study.weights, prep.settings.study.proxy, prep.settings
    if plan.mode != "auto":
        weights = prepare_base_weights(plan, prep.space.base, prep.data.nc, str(prep.data.yaml), schedule, study_dir,
                                       threads, checked=prep.checkpoint)
        if weights is not None:
            study.set_user_attr("attnas_base_weights", {"path": weights.state_path, **weights.info})
        return BaseSource(weights)
    job = base_training_job(plan, prep.space.base, str(prep.data.yaml), schedule, study_dir, threads,
                            s.run.train_device)
    cache, key = BaseCache(s.out / ".cache" / "base-weights"), base_cache_key(job, prep.data.fingerprint)
    # Resume: an earlier run of this study trained it; else another study under --out trained the same base.
    weights = stored_base_weights(study_dir, cache, key)
    if weights is None:  # trained in the pool, on one worker slot, while the meter times candidates
        print(f"--weights auto: training the base model once ({plan.base_epochs} epochs); every candidate inherits it",
              file=sys.stderr)
        return BaseSource(None, job, cache, key)
    if weights.info.get("source") == "cache":
        print(f"--weights auto: the same base was trained by an earlier study under --out (cache {key}); reusing it",
              file=sys.stderr)
        study.set_user_attr("attnas_base_weights", {"path": weights.state_path, **weights.info})
    return BaseSource(weights, None, cache, key)


def _study_gone(prep: Prepared, storage, study_dir: Path, executor: Executor, err: StudyGone) -> int:
    """The study was deleted or renamed from the dashboard: one line (with the command that continues a rename)."""
    if err.renamed_to is None:
        print(f"search stopped: {err}", file=sys.stderr)
        return 1
    renamed = optuna.load_study(study_name=err.renamed_to, storage=storage)
    command = prep.settings.resume_command(err.renamed_to)
    with contextlib.suppress(Exception):
        StudyNotes(renamed, prep.settings, study_dir, executor.describe()).update(status="stopped: renamed")
    print(f"search stopped: {err}; continue it with: {command}", file=sys.stderr)
    return 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _finish(study: optuna.Study, storage, prep: Prepared, wall: float, study_dir: Path) -> int:
    """Print the front and export it; the exit status of the export (0 when it was written or not asked for)."""
    report(study, prep.objectives, prep.settings.study.fidelity.rungs, prep.settings.storage_url,
           study_dir / "artifacts", wall)
    if not (prep.settings.run.export and st.completed_trials(study)):
        return 0
    again = shlex.join(["python", "-m", "search.export", "--study", study.study_name, "--out", str(study_dir.parent),
                        *(["--storage", prep.settings.storage_url]
                          if prep.settings.storage_url != st.default_storage(study_dir.parent, study.study_name)
                          else [])])
    try:
        if ("export", "hang") in prep.settings.run.faults:  # test hook: a stop that arrives during the export
            print("inject-fault: the export waits", file=sys.stderr, flush=True)
            time.sleep(10**6)
        written = export_study(study, study_dir, storage)
    except KeyboardInterrupt:
        print(f"interrupted while exporting the front (the study is saved); export it with: {again}",
              file=sys.stderr)
        return 130
    except Exception as err:
        full = disk_fault(err, "exporting the front", study_dir, "free space there")
        if full is None:
            raise
        study_log(study_dir).error("export failed: %s", full, exc_info=err)
        print(f"error: {full}; then export it with: {again}", file=sys.stderr)
        return 1
    state = confirmation_state(study, prep.objectives)
    flag = (f" (unconfirmed: single top-rung runs; {state['trainings_pending']} confirmation training(s) still to "
            "run on resume)" if state["trainings_pending"] else "")
    print(f"exported the front to {written}{flag}", file=sys.stderr)
    return 0


def study_log(study_dir: Path) -> logging.Logger:
    """The study's own log, ``<study>/search.log``: the tracebacks behind the one-line messages of the console."""
    log = logging.getLogger(f"attnas.study.{study_dir}")
    log.setLevel(logging.INFO)
    if not log.handlers:
        with contextlib.suppress(OSError):
            handler = QuietFileHandler(study_dir / "search.log", delay=True)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
        log.propagate = False
    return log
