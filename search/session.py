"""One run of ``python -m search.run`` after its inputs are checked: Ray up, study opened, loop, report."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import time
import warnings
import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from space import make_candidate
from space.cli import table

from . import confirm
from . import objectives as obj
from . import study as st
from .driver import Driver, SearchAborted, SearchConfig, StudyGone, front_rows, make_sampler
from .errors import SearchError
from .executor import Executor, PoolSettings
from .latency.audit import busy_warning
from .proxy import TrainJob
from .reconnect import DatabaseUnreachable
from .weights import BaseCache, BaseWeights, base_cache_key, base_training_job, prepare_base_weights, stored_base_weights

if TYPE_CHECKING:
    from .run import Prepared


class Progress:
    """tqdm bar of completed trials / budget with the best value of each objective and the Pareto size; one line
    per finished trial."""

    def __init__(self, study: optuna.Study, objectives: tuple[obj.Objective, ...], budget: int,
                 on_update=None) -> None:
        self.on_update = on_update  # called after each finished trial (the study's dashboard note)
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
        told = [t for t in done if t.values]  # candidates stopped below the top rung have no values
        if told:
            best = []
            for i, o in enumerate(self.objectives):
                pick = max if o.maximize else min
                best.append(f"{o.name} {o.show(pick(t.values[i] for t in told))}")
            self.bar.set_postfix_str(f"best {', '.join(best)}; Pareto {len(st.pareto_trials(self.study, self.objectives))}")
        self.bar.n = min(len(done), self.budget)
        self.bar.refresh()
        if self.on_update is not None:
            self.on_update()

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
                _finish(existing, storage, prep, 0.0, study_dir_of(prep, existing))
                return 0
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
    try:
        if storage is None:
            storage = st.open_storage(s.storage_url)
        return _run(prep, storage, existing, executor)
    except DatabaseUnreachable as err:  # nothing more can be written; the trials left RUNNING are re-queued on resume
        print(f"error: {err}; stopped. Continue when it is back: {resume_command(prep, s.study_name)}",
              file=sys.stderr)
        return 1
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        executor.shutdown()


def start_executor(prep: "Prepared") -> Executor:
    """Start or join Ray within RAY_START_S; SIGTERM and Ctrl-C stop it (Ray's own retries run for minutes).

    A handler that cannot run (Ray blocked in native code) is backed by a watchdog that ends the process: nothing
    has been written to any study yet, so a hard exit loses nothing."""
    import threading

    from .run import RAY_START_S

    run = prep.settings.run
    pool = PoolSettings(workers=run.workers, cpus_per_trial=run.cpus_per_trial, gpus_per_trial=run.gpus_per_trial,
                        trial_timeout_s=run.trial_timeout, ray_address=run.ray_address, latency_node=run.latency_node)
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
        return Executor(pool, prep.settings.study.latency, reference=make_candidate(prep.space.base),
                        base=prep.space.base, table_dir=str(prep.settings.out / "latency-table"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        starting.clear()
        watchdog.cancel()
        for sig, h in handlers.items():
            signal.signal(sig, h)


def prepare_cluster(prep: "Prepared", executor: Executor, existing: optuna.Study | None) -> "Prepared":
    """On a cluster (--ray-address), once Ray is up and before anything is written: the latency node's facts join
    the study's identity (a resume timed elsewhere is refused), and every training node is checked for the dataset
    and --out (or the dataset is shipped, --ship-data). Local Ray: nothing to do (one machine)."""
    from dataclasses import replace

    from . import cluster

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
            from .settings import differences

            raise SearchError(f"study {s.study_name!r} was timed on another latency machine: "
                              + "; ".join(differences(stored, facts, "latency.")) + "; pass --latency-node naming "
                              f"the node it was timed on ({stored.get('node', '?')})")
    study = replace(s.study, facts={**s.study.facts, "latency": facts})
    data_yaml, summary = cluster.prepare_nodes(prep.data.yaml, s.out, s.run.gpus_per_trial, s.run.ship_data)
    print(f"cluster: {summary}", file=sys.stderr)
    return replace(prep, settings=replace(s, study=study), data=replace(prep.data, yaml=data_yaml))


def study_dir_of(prep: "Prepared", study: optuna.Study | None) -> Path:
    """Where the study's files are: the directory recorded when it was created (a study renamed in the dashboard
    keeps it), else ``<out>/<study name>``."""
    from .run import recorded_study_dir

    recorded = recorded_study_dir(study) if study is not None else None
    return recorded or prep.settings.study_dir


def _run(prep: "Prepared", storage, existing, executor: Executor) -> int:
    """Open the study, get the base weights, drive the search to the budget, confirm the front, report."""
    study_dir = study_dir_of(prep, existing)
    study = _open_study(prep, storage, existing, study_dir, executor)
    _say_what_runs(prep, study, storage, executor)
    train_device = "0" if prep.settings.run.gpus_per_trial > 0 else "cpu"  # the first GPU Ray gives a trial
    threads = max(1, int(executor.cpus_per_trial))
    try:
        base = _base_weights(prep, study, study_dir, threads, train_device)
    except DatabaseUnreachable:
        raise
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = _search_config(prep, study_dir, base, threads, train_device)
    notes = StudyNotes(study, prep, study_dir, executor.describe())
    progress = Progress(study, prep.objectives, prep.settings.run.budget, on_update=notes.update)
    store = optuna.artifacts.FileSystemArtifactStore(str(study_dir / "artifacts"))
    driver = Driver(study, prep.space, executor, config, store, progress, storage)
    t0 = time.time()
    status = 0
    # SIGTERM (a scheduler stopping the job) gets the same orderly stop as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        driver.run()
        driver.remeasure_contended()  # before confirmation: its trainings would share the windows' cores
        driver.confirm(prep.settings.study.fidelity.confirm_seeds)
    except StudyGone as err:
        progress.close()
        return _study_gone(prep, storage, study_dir, executor, err)
    except SearchAborted as err:
        progress.note(f"search stopped: {err}")
        status = 1
    except KeyboardInterrupt:
        progress.note("interrupted: running trials were failed and queued again; continue with --resume")
        status = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
    with contextlib.suppress(Exception):
        notes.update(status={0: "finished", 1: "stopped", 130: "interrupted"}.get(status, "stopped"))
    _finish(study, storage, prep, time.time() - t0, study_dir)
    return status


def _open_study(prep: "Prepared", storage, existing, study_dir: Path, executor: Executor) -> optuna.Study:
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
    study.set_user_attr("attnas_last_run", {**asdict(run), "resources": executor.describe(), "started": started})
    node = executor.latency_node  # its id changes when the cluster restarts: recorded here, not in the identity
    study.set_user_attr("attnas_latency_node", {"id": node.id, "hostname": node.hostname, "ip": node.ip,
                                                "device": s.study.latency.device})
    return study


def _say_what_runs(prep: "Prepared", study: optuna.Study, storage, executor: Executor) -> None:
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


@dataclass
class _Base:
    """What candidates inherit: stored weights, or the pool's first training (--weights auto), and its cache."""

    weights: BaseWeights | None = None
    job: TrainJob | None = None
    cache: BaseCache | None = None
    cache_key: str | None = None


def _base_weights(prep: "Prepared", study: optuna.Study, study_dir: Path, threads: int, device: str) -> _Base:
    plan, schedule, s = prep.settings.study.weights, prep.settings.study.proxy, prep.settings
    if plan.mode != "auto":
        weights = prepare_base_weights(plan, prep.space.base, prep.data.nc, str(prep.data.yaml), schedule, study_dir,
                                       threads, checked=prep.checkpoint)
        if weights is not None:
            study.set_user_attr("attnas_base_weights", {"path": weights.state_path, **weights.info})
        return _Base(weights)
    job = base_training_job(plan, prep.space.base, str(prep.data.yaml), schedule, study_dir, threads, device)
    cache, key = BaseCache(s.out / ".cache" / "base-weights"), base_cache_key(job, prep.data.fingerprint)
    # Resume: an earlier run of this study trained it; else another study under --out trained the same base.
    weights = stored_base_weights(study_dir, cache, key)
    if weights is None:  # trained in the pool, on one worker slot, while the meter times candidates
        print(f"--weights auto: training the base model once ({plan.base_epochs} epochs); every candidate inherits it",
              file=sys.stderr)
        return _Base(None, job, cache, key)
    if weights.info.get("source") == "cache":
        print(f"--weights auto: the same base was trained by an earlier study under --out (cache {key}); reusing it",
              file=sys.stderr)
        study.set_user_attr("attnas_base_weights", {"path": weights.state_path, **weights.info})
    return _Base(weights, None, cache, key)


def _search_config(prep: "Prepared", study_dir: Path, base: _Base, threads: int, device: str) -> SearchConfig:
    run, study = prep.settings.run, prep.settings.study
    return SearchConfig(budget=run.budget, schedule=study.proxy, objectives=prep.objectives,
                        data_yaml=str(prep.data.yaml), study_dir=study_dir, latency_imgsz=study.latency.imgsz,
                        train_device=device, threads_per_trial=threads, save_weights=run.save_weights,
                        faults=dict(run.faults), max_failures_in_a_row=run.max_failures_in_a_row,
                        weights=base.weights, base_job=base.job, lookahead=run.workers,
                        constraints=study.constraints, rungs=study.fidelity.rungs, eta=study.fidelity.eta,
                        base_cache=base.cache, base_cache_key=base.cache_key)


def _study_gone(prep: "Prepared", storage, study_dir: Path, executor: Executor, err: StudyGone) -> int:
    """The study was deleted or renamed from the dashboard: one line (with the command that continues a rename)."""
    if err.renamed_to is None:
        print(f"search stopped: {err}", file=sys.stderr)
        return 1
    renamed = optuna.load_study(study_name=err.renamed_to, storage=storage)
    command = resume_command(prep, err.renamed_to)
    with contextlib.suppress(Exception):
        StudyNotes(renamed, prep, study_dir, executor.describe()).update(status="stopped: renamed")
    print(f"search stopped: {err}; continue it with: {command}", file=sys.stderr)
    return 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _finish(study: optuna.Study, storage, prep: "Prepared", wall: float, study_dir: Path) -> None:
    report(study, prep, study_dir / "artifacts", wall)
    if prep.settings.run.export and st.completed_trials(study):
        from .export import export_study

        written = export_study(study, study_dir, storage)
        print(f"exported the front to {written}", file=sys.stderr)


def report(study: optuna.Study, prep: "Prepared", artifact_dir, wall: float) -> None:
    """Print the Pareto front as a table, the confirmed front, the study's fidelity and the dashboard command."""
    done = st.completed_trials(study)
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    stopped = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if st.RUNG_RESULTS in t.user_attrs]
    took = f"; this run took {wall:.0f} s" if wall else ""
    below = f", {len(stopped)} stopped below the top rung" if stopped else ""
    print(f"\n{len(done)} completed{below}, {len(failed)} failed trial(s) in the study{took}")
    rows = front_rows(study, prep.objectives) if done else []
    directions = ", ".join(f"{o.name} {'up' if o.maximize else 'down'}" for o in prep.objectives)
    if rows:
        print(f"Pareto front ({len(rows)} trial(s) at the top rung; {directions}):")
        print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    confirmed = confirm.confirmed_front(prep.objectives, confirm.confirmed(study, prep.objectives))
    if confirmed:
        print(f"\nConfirmed front on seed means ({len(confirmed)} trial(s)):")
        crow = [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in c.row(prep.objectives).items()}
                for c in confirmed]
        print(table(crow, list(crow[0])))
    fidelity = confirm.fidelity_report(study, prep.objectives, prep.settings.study.fidelity.rungs)
    with contextlib.suppress(Exception):
        study.set_user_attr("attnas_fidelity", fidelity)
    print("\n" + "\n".join(confirm.describe(fidelity)))
    print(f"\nDashboard: {st.dashboard_command(prep.settings.storage_url, artifact_dir)}")


def resume_command(prep: "Prepared", study_name: str, budget: int | None = None) -> str:
    """The exact command that continues (or, with a larger ``budget``, extends) the study: its settings come from
    the study (``--resume``); this run's execution flags are repeated."""
    s, run = prep.settings, prep.settings.run
    argv = ["python", "-m", "search.run", "--resume", "--study-name", study_name, "--out", str(s.out),
            "--storage", s.storage_url, "--budget", str(budget or run.budget), "--workers", str(run.workers),
            "--sampler", run.sampler]
    for flag, value in (("--cpus-per-trial", run.cpus_per_trial), ("--ray-address", run.ray_address),
                        ("--latency-node", run.latency_node if run.latency_node != "driver" else None),
                        ("--trial-timeout", run.trial_timeout),
                        ("--gpus-per-trial", run.gpus_per_trial or None)):
        if value is not None:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    argv += ["--save-weights"] * run.save_weights + ["--no-export"] * (not run.export) + ["--ship-data"] * run.ship_data
    argv += [f"--max-failures-in-a-row={run.max_failures_in_a_row}"]
    return shlex.join(argv)


class StudyNotes:
    """The study's optuna-dashboard note (markdown on the study page): settings, the commands that resume or
    extend the study, progress and the current front, rewritten after every finished trial."""

    def __init__(self, study: optuna.Study, prep: "Prepared", study_dir: Path, resources: str) -> None:
        self.study, self.prep, self.study_dir, self.resources = study, prep, study_dir, resources

    def update(self, status: str = "running") -> None:
        try:
            st.save_note(self.study, self.body(status))
        except Exception:  # a note is a convenience: never stop a search for it (e.g. the study was just renamed)
            pass

    def body(self, status: str) -> str:
        study, prep = self.study, self.prep
        run = prep.settings.run
        counted = len(st.counted_trials(study))
        by_state = {state: len(study.get_trials(deepcopy=False, states=(state,)))
                    for state in (TrialState.FAIL, TrialState.RUNNING)}
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = [f"## attnas study `{study.study_name}`", "",
                 f"**{status}** at {stamp}: {counted}/{run.budget} completed trial(s) counted, "
                 f"{by_state[TrialState.FAIL]} failed, {by_state[TrialState.RUNNING]} running "
                 f"(driver pid {os.getpid()}; {self.resources}).", "",
                 "Resume after a stop (settings come from the study):", "",
                 f"```\n{resume_command(prep, study.study_name)}\n```", "",
                 f"Extend to {2 * run.budget} completed trials:", "",
                 f"```\n{resume_command(prep, study.study_name, 2 * run.budget)}\n```", "",
                 f"Files: `{self.study_dir}` (trials, artifacts, pareto/).", "", "### Pareto front", ""]
        rows = front_rows(study, prep.objectives) if st.completed_trials(study) else []
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
        else:
            lines.append("(no completed trial yet)")
        recorded = prep.settings.study.as_dict()
        lines += ["", "### Settings (the study's identity)", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{_short_json(v)}` |" for k, v in recorded.items() if k != "layout"]
        return "\n".join(lines) + "\n"


def _short_json(value) -> str:
    import json

    text = json.dumps(value, sort_keys=True, default=str).replace("|", "\\|")
    return text if len(text) <= 300 else text[:297] + "..."
