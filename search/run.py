"""``python -m search.run``: multi-objective NAS (mAP50-95 up, measured latency down) over attention placements.

One driver process owns the Optuna study; a Ray pool trains candidates; a single latency meter per device times
them while trainings on its node are parked. Bad input exits with status 2 and a one-line message, before anything
is written to the study.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # a search never downloads weights, fonts or datasets
os.environ.setdefault("YOLO_VERBOSE", "False")

from space import SearchSpace, SpaceError, build_space, canonical_hash, load_base  # noqa: E402

from . import objectives as obj  # noqa: E402
from . import study as st  # noqa: E402
from . import shapes  # noqa: E402
from .data import DataInfo, builtin_name, check_data, safe_batch  # noqa: E402
from .driver import SAMPLERS  # noqa: E402
from .errors import SearchError  # noqa: E402
from .latency import BACKENDS, ESTIMATORS, STATISTICS  # noqa: E402
from .settings import RunSettings, Settings, StudySettings, default, differences, run_settings, study_settings  # noqa: E402
from .weights import check_user_checkpoint  # noqa: E402


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # one path component, no '..', no hidden directory
RAY_CONNECT_S = 10.0  # a --ray-address whose port does not accept a TCP connection within this is refused
RAY_START_S = 120.0  # starting or joining Ray takes longer than this: refused (see search.session)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the whole usage first)
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m search.run", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    run = RunSettings()
    p.add_argument("--budget", type=int, default=run.budget,
                   help=f"completed trials the study should hold, all runs together [{run.budget}]")
    p.add_argument("--study-name", help="default: <base>-<data> (re-running the same command continues it); a new "
                                        "study's name is a directory under --out: letters, digits, '.', '_', '-'")
    p.add_argument("--storage", help="Optuna RDB URL (sqlite:///…, postgresql://…, mysql://…) or a journal file "
                                     "path; default sqlite:///<out>/<study>/study.db")
    p.add_argument("--out", default="runs", help="directory for everything a study writes [runs]")
    p.add_argument("--resume", action="store_true", help="continue an existing study, taking every setting not "
                                                         "given here from it")
    g = p.add_argument_group("what is searched (fixed for a study)")
    g.add_argument("--objectives", help=f"2-4 of {', '.join(obj.OBJECTIVES)}, comma-separated "
                                        f"[{default('objectives')}]")
    g.add_argument("--base", help=f"base model YAML of the space, bundled name or path [{default('base')}]")
    g.add_argument("--space", help="space YAML restricting slots/modules/values (see space/)")
    g.add_argument("--data", help="Ultralytics dataset YAML, or builtin:NAME for a built-in generated set "
                                  f"({', '.join(shapes.SETS)}) [builtin:{shapes.DEFAULT}, generated on first use]")
    g = p.add_argument_group("proxy training (fixed for a study)")
    g.add_argument("--rungs", help="epochs at each rung of asynchronous successive halving, e.g. 1,3,9: every "
                   "candidate trains to the first; the best 1/--eta of a rung by Pareto rank continue from their "
                   f"checkpoint to the next; one value = every candidate trains that long [{default('rungs')}]")
    g.add_argument("--eta", type=int, help=f"promote the best 1/eta of each rung [{default('eta')}]")
    g.add_argument("--epochs", type=int, help="same as --rungs N: every candidate trains N epochs")
    g.add_argument("--confirm-seeds", type=int, help="after the budget, train the top-rung front and the base again "
                   f"with this many more seeds; the exported front uses the seed means [{default('confirm_seeds')}]")
    g.add_argument("--imgsz", type=int, help=f"training image size, a multiple of 32 [{default('imgsz')}]")
    g.add_argument("--batch", type=int, help=f"[{default('batch')}]")
    g.add_argument("--fraction", help="train images used: ratio (0.5), count (8) or train,val (8,16) "
                                      f"[{default('fraction')}]")
    g.add_argument("--seed", type=int, help=f"training and sampler seed [{default('seed')}]")
    g.add_argument("--train-arg", action="append", metavar="KEY=VALUE",
                   help="further Ultralytics train argument of every candidate, repeatable [inheriting: "
                        f"{default('train_arg')}; --weights none: {default('base_train_arg')}]")
    g.add_argument("--weights", help="what every candidate starts from: 'auto' (the base trained once by the driver "
                   "for --base-epochs, stored with the study), a checkpoint .pt of the base, or 'none' (from "
                   f"scratch; then give more --epochs) [{default('weights')}]")
    g.add_argument("--base-epochs", type=int, help=f"epochs of the base training for --weights auto "
                   f"[{default('base_epochs')}]")
    g.add_argument("--base-train-arg", action="append", metavar="KEY=VALUE",
                   help=f"Ultralytics train argument of the base training, repeatable [{default('base_train_arg')}]")
    g = p.add_argument_group("constraints, checked before training (fixed for a study)")
    g.add_argument("--max-latency-ms", type=float, help="candidates slower than this are recorded infeasible, untrained")
    g.add_argument("--max-params", type=int, help="candidates with more parameters are recorded infeasible, untrained")
    g = p.add_argument_group("latency (fixed for a study)")
    g.add_argument("--latency-device", choices=("cpu", "cuda"), help=f"[{default('latency_device')}]")
    g.add_argument("--latency-backend", choices=BACKENDS, help="the runtime the latency is timed on: eager PyTorch, "
                   "ONNX Runtime (the fused model exported to ONNX), or TensorRT (needs the tensorrt package and a GPU) "
                   f"[{default('latency_backend')}]")
    g.add_argument("--latency-imgsz", help=f"SIZE or HEIGHT,WIDTH, e.g. 640,384 [{default('latency_imgsz')}]")
    g.add_argument("--latency-batch", type=int, help=f"[{default('latency_batch')}]")
    g.add_argument("--latency-half", action="store_const", const=True, help="time in fp16 (CUDA only)")
    g.add_argument("--latency-warmup", type=int, help=f"untimed runs of each network [{default('latency_warmup')}]")
    g.add_argument("--latency-runs", type=int, help="most timed pairs of base and candidate "
                   f"[{default('latency_runs')}]")
    g.add_argument("--latency-min-runs", type=int, help="pairs after which the meter stops once the ratio's 95%% "
                   f"interval is within ±--latency-ci [{default('latency_min_runs')}]")
    g.add_argument("--latency-ci", type=float, help="a window is accepted when the ratio's 95%% interval is within "
                   f"± this fraction; 0 accepts every window [{default('latency_ci')}]")
    g.add_argument("--latency-estimator", choices=ESTIMATORS, help="paired: time every candidate against the base; "
                   "table: predict it from per-placement costs timed once per machine and cached under --out "
                   f"(for shared machines) [{default('latency_estimator')}]")
    g.add_argument("--latency-statistic", choices=STATISTICS, help="how a window's runs give the ratio "
                   f"(search/latency/window.py) [{default('latency_statistic')}]")
    g.add_argument("--latency-aa-tolerance", type=float, help="a window is accepted when its A/A control (the base "
                   f"against itself) is within 1 ± this [{default('latency_aa_tolerance')}]")
    g.add_argument("--latency-tries", type=int, help="windows timed before a trial is recorded latency_contended "
                   f"[{default('latency_tries')}]")
    g.add_argument("--latency-threads", type=int, help=f"CPU threads for timing, 0 = all cores [{default('latency_threads')}]")
    g = p.add_argument_group("execution (may change between runs)")
    g.add_argument("--sampler", choices=SAMPLERS, default=run.sampler, help=f"[{run.sampler}]; see the README for the choice")
    g.add_argument("--workers", type=int, default=run.workers, help=f"trials in flight at once [{run.workers}]")
    g.add_argument("--cpus-per-trial", type=float, help="default: the cluster's CPUs / --workers")
    g.add_argument("--gpus-per-trial", type=float, default=run.gpus_per_trial, help="fractional allowed; needs a GPU [0]")
    g.add_argument("--ray-address", help="join an existing cluster: auto, host:port or ray://host:port (default: "
                                         f"local Ray); an address that does not answer within {RAY_CONNECT_S:g} s "
                                         f"is refused, and joining is given up after {RAY_START_S:g} s")
    g.add_argument("--latency-node", default=run.latency_node,
                   help="the one node every latency of the study is timed on: 'driver' (this process's node), a "
                        "node id, or an IP/hostname naming one node; its hostname and processor are part of the "
                        f"study's identity [{run.latency_node}]")
    g.add_argument("--ship-data", action="store_true",
                   help="with --ray-address: copy the dataset through Ray into each node's local cache "
                        "(/tmp/attnas-data or $ATTNAS_DATA_CACHE) instead of requiring it at the same path on every "
                        "node; at most 200 MB")
    g.add_argument("--trial-timeout", type=float, help="seconds; a training running longer is FAIL")
    g.add_argument("--save-weights", action="store_true", help="keep each trial's last.pt in its run directory")
    g.add_argument("--max-failures-in-a-row", type=int, default=run.max_failures_in_a_row,
                   help=f"stop the search after this many [{run.max_failures_in_a_row}]")
    g.add_argument("--no-export", action="store_true", help="skip writing pareto/ and the plots at the end")
    p.add_argument("--inject-fault", action="append", default=[], help=argparse.SUPPRESS)  # tests: KIND@TRIAL
    return p


@dataclass(frozen=True)
class Prepared:
    """The checked settings and what they resolve to, ready to open a study with."""

    settings: Settings
    space: SearchSpace
    data: DataInfo
    objectives: tuple[obj.Objective, ...]
    checkpoint: tuple[dict, tuple[str, ...]] | None = None  # --weights PATH, loaded and checked


def prepare(args: argparse.Namespace) -> Prepared:
    """Check everything the run needs, reading (never writing) an existing study's settings."""
    run = run_settings(args)
    _check_devices(run)
    out = Path(args.out).expanduser().resolve()
    check_out(out)
    study_name = args.study_name or _default_name(args)
    if args.resume and not args.study_name:
        study_name = _study_to_resume(args, out, study_name)
    if args.storage is None:
        check_study_name(study_name)  # the default storage is <out>/<name>/study.db
    storage_url = args.storage or st.default_storage(out, study_name)
    existing = _existing(storage_url, study_name, required=args.resume)
    if existing is None or not recorded_study_dir(existing):
        # A new study's files go to <out>/<name>/; a study renamed in optuna-dashboard keeps its recorded directory.
        check_study_name(study_name)
    stored = StudySettings.from_dict(_recorded(existing, storage_url)) if existing is not None else None
    s = study_settings(args, stored if args.resume else None)
    # What cannot be timed here (TensorRT, fp16 or CUDA without a GPU) is refused before anything is written; a
    # cluster's GPUs are checked once Ray is up, still before any study exists.
    s.latency.check(gpu_available=True if run.ray_address else None)
    if run.ray_address:
        check_ray_address(run.ray_address)
    base = load_base(s.base)
    space = build_space(base, s.space)
    _check_space_at_proxy_size(base, s)
    data = check_data(s.data, out / ".data", list(s.proxy.fraction) if isinstance(s.proxy.fraction, tuple)
                      else s.proxy.fraction)
    s = replace(s, proxy=replace(s.proxy, batch=safe_batch(data.train_used, s.proxy.batch)),
                facts={"base": {"scale": base.scale, "hash": canonical_hash(base.yaml)},
                       "data": {"identity": data.identity, "fingerprint": data.fingerprint, "nc": data.nc,
                                "train_images": data.n_train, "val_images": data.n_val},
                       # Latencies from another runtime version, processor or machine do not compare. Here: this
                       # machine's; the latency node's once Ray is up (search.session.check_latency_node).
                       "latency": _latency_facts(s, run, stored)})
    # A mismatched checkpoint is refused before anything is written; the checked state is kept for the run.
    checkpoint = check_user_checkpoint(s.weights, base, data.nc) if s.weights.mode == "path" else None
    if existing is not None:
        diffs = differences(existing.user_attrs[st.SETTINGS_ATTR], s.as_dict())
        if diffs:
            hint = "" if args.resume else "; pass --resume to take the study's settings, or a new --study-name"
            raise SearchError(f"study {study_name!r} was run with other settings: " + "; ".join(diffs) + hint)
    settings = Settings(s, run, study_name, storage_url, out, args.resume)
    return Prepared(settings, space, data, s.objective_table(), checkpoint)


def check_study_name(name: str) -> None:
    """A study name is a directory under ``--out``: one safe path component, so nothing is written outside it."""
    if not SAFE_NAME.fullmatch(name) or name.strip(".") == "":
        raise SearchError(f"study name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter "
                          "or digit (it is a directory under --out)")


def check_out(out: Path) -> None:
    """``--out`` must be a directory that exists or can be made, and be writable; checked without creating it."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise SearchError(f"--out {out}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SearchError(f"--out {out}: {probe} is not writable")


def check_ray_address(address: str) -> None:
    """Refuse a cluster address whose port does not answer, within RAY_CONNECT_S (Ray itself retries for minutes).

    ``auto`` is resolved by Ray from RAY_ADDRESS or the local session file; when neither names a cluster, ray.init
    fails at once, so only explicit host:port addresses need this check."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address or address == "auto":
            return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SearchError(f"--ray-address {address}: expected auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_S):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise SearchError(f"--ray-address {address}: cannot reach a Ray cluster there ({reason} within "
                          f"{RAY_CONNECT_S:g} s); start one with `ray start --head` or drop --ray-address") from None


def recorded_study_dir(study) -> Path | None:
    """The directory a study's files were written to when it was created (kept when the study is renamed)."""
    where = (study.user_attrs.get(st.PATHS_ATTR) or {}).get("study_dir")
    return Path(where) if where else None


def _check_space_at_proxy_size(base, s: StudySettings) -> None:
    """Values that fit the deployment size (the space's ``imgsz``) may fit no feature map at the proxy's --imgsz,
    where every candidate is built and trained: such a space has no candidate to train."""
    if s.proxy.imgsz >= s.space.imgsz:
        return
    try:
        build_space(base, replace(s.space, imgsz=s.proxy.imgsz))
    except SpaceError as err:
        raise SearchError(f"the space is empty at --imgsz {s.proxy.imgsz} (candidates train at that size): "
                          f"{str(err).removeprefix('space: ')}") from None


_LATENCY_FACTS = ("backend_version", "device_model", "node")


def _latency_facts(s: StudySettings, run: RunSettings, stored: StudySettings | None) -> dict[str, Any]:
    """The latency facts of this machine, or (latency timed on another node) the stored ones until Ray is up."""
    recorded = stored.facts.get("latency") if stored is not None else None
    if run.latency_node != "driver" and recorded is not None:
        return dict(recorded)
    here = {**{k: v for k, v in s.latency.identity().items() if k in _LATENCY_FACTS}, "node": socket.gethostname()}
    if recorded is not None and "node" not in recorded:  # a study from before latency nodes were recorded
        here.pop("node")
    return here


def _check_devices(run: RunSettings) -> None:
    if run.gpus_per_trial > 0 and not run.ray_address:
        import torch

        if torch.cuda.device_count() == 0:
            raise SearchError(f"--gpus-per-trial {run.gpus_per_trial:g} but this machine has no GPU; "
                              "leave it at 0 for CPU trials")
    if run.sampler == "gp":
        import importlib.util

        if importlib.util.find_spec("scipy") is None:  # Optuna's GPSampler fits its kernel with scipy
            raise SearchError("--sampler gp needs scipy, which is not installed (pip install scipy)")


def _study_to_resume(args: argparse.Namespace, out: Path, fallback: str) -> str:
    """``--resume`` without ``--study-name``: the default-named study if it exists, else the only one there is."""
    if args.storage:
        names = st.study_names(args.storage) if st.may_hold_studies(args.storage) else []
        where = args.storage
    else:
        names = [p.parent.name for p in sorted(out.glob("*/study.db"))]
        where = f"{out}/*/study.db"
    if fallback in names:
        return fallback
    if len(names) == 1:
        return names[0]
    listed = ", ".join(names) if names else "none"
    raise SearchError(f"--resume: which study? pass --study-name (studies in {where}: {listed})")


def _existing(storage_url: str, study_name: str, required: bool):
    if st.may_hold_studies(storage_url):
        found = st.find_study(st.open_storage(storage_url), study_name)
    else:
        st.check_new_storage(storage_url)
        found = None
    if required and found is None:
        raise SearchError(f"--resume: no study {study_name!r} in {storage_url}; run without --resume to start it")
    return found


def _recorded(study, storage_url: str) -> dict[str, Any]:
    stored = study.user_attrs.get(st.SETTINGS_ATTR)
    if not stored:
        raise SearchError(f"study {study.study_name!r} in {storage_url} was not made by attnas (no recorded settings)")
    return stored


def _default_name(args: argparse.Namespace) -> str:
    data = builtin_name(args.data) or Path(args.data).stem
    return f"{Path(str(args.base or default('base'))).stem}-{data}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prep = prepare(args)
    except KeyboardInterrupt:  # Ctrl-C while checking: nothing was written
        print("interrupted before anything was written", file=sys.stderr)
        return 130
    except (SearchError, SpaceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .session import run_session

    return run_session(prep)


if __name__ == "__main__":
    sys.exit(main())
