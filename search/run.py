"""``python -m search.run``: multi-objective NAS (mAP50-95 up, measured latency down) over attention placements.

One driver process owns the Optuna study; a Ray pool trains candidates; a single latency meter per device times
them while trainings on its node are parked. Bad input exits with status 2 and a one-line message, before anything
is written to the study.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # a search never downloads weights, fonts or datasets
os.environ.setdefault("YOLO_VERBOSE", "False")

from space import SpaceConfig, SpaceError, build_space, canonical_hash, load_base  # noqa: E402

from . import study as st  # noqa: E402
from .data import check_data, parse_fraction, safe_batch  # noqa: E402
from .driver import SAMPLERS  # noqa: E402
from .errors import SearchError  # noqa: E402
from .latency import LatencySettings  # noqa: E402
from .proxy import FAULTS, RESERVED_ARGS, ProxySchedule  # noqa: E402
from .weights import WeightsPlan, check_user_checkpoint  # noqa: E402

# Ultralytics train arguments. Training from scratch (the base for --weights auto, or every candidate with
# --weights none): AdamW at 0.003 with the usual warm-up; measured on the built-in data, 20 epochs reach mAP50-95
# 0.12 with optimizer=auto, 0.15 at lr0 0.001, 0.10 with SGD 0.01, 0.25 at 0.003, and 40 epochs at 0.003 reach 0.57.
SCRATCH_TRAIN_ARGS = ["optimizer=AdamW", "lr0=0.003", "warmup_epochs=3"]
# Fine-tuning inherited weights: a third of that rate and no bias warm-up (Ultralytics starts bias learning rates at
# 0.1, which kicks a trained network off its optimum at step 0). Measured: the same candidate's 3-epoch proxy mAP
# varies with the seed by sd 0.005 this way, 0.018 with the scratch arguments.
FINETUNE_TRAIN_ARGS = ["optimizer=AdamW", "lr0=0.001", "warmup_epochs=3", "warmup_bias_lr=0.0"]

# Settings that define a study: on resume they come from the study unless given, and must not differ.
IDENTITY_DEFAULTS: dict[str, Any] = {
    # Candidates fine-tune the inherited base for a few epochs (3 epochs carry signal once the base is trained;
    # from scratch they rank noise: see the README). train_arg None: FINETUNE_TRAIN_ARGS, or SCRATCH_TRAIN_ARGS
    # with --weights none.
    "base": "yolov8n.yaml", "data": None, "space": None, "epochs": 3, "imgsz": 128, "batch": 16, "fraction": "1.0",
    "seed": 0, "train_arg": None, "base_train_arg": SCRATCH_TRAIN_ARGS,
    "latency_device": "cpu", "latency_imgsz": 640, "latency_warmup": 3, "latency_runs": 15, "latency_threads": 0,
    "weights": "auto", "base_epochs": 40, "max_latency_ms": None, "max_params": None,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the whole usage first)
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m search.run", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--budget", type=int, default=50, help="completed trials the study should hold, all runs together [50]")
    p.add_argument("--study-name", help="default: <base>-<data> (re-running the same command continues it)")
    p.add_argument("--storage", help="Optuna RDB URL (sqlite:///…, postgresql://…, mysql://…) or a journal file "
                                     "path; default sqlite:///<out>/<study>/study.db")
    p.add_argument("--out", default="runs", help="directory for everything a study writes [runs]")
    p.add_argument("--resume", action="store_true", help="continue an existing study, taking every setting not "
                                                         "given here from it")
    g = p.add_argument_group("what is searched (fixed for a study)")
    g.add_argument("--base", help=f"base model YAML of the space, bundled name or path [{IDENTITY_DEFAULTS['base']}]")
    g.add_argument("--space", help="space YAML restricting slots/modules/values (see space/)")
    g.add_argument("--data", help="Ultralytics dataset YAML [built-in shapes-v2 set, generated on first use]")
    g = p.add_argument_group("proxy training (fixed for a study)")
    g.add_argument("--epochs", type=int, help=f"[{IDENTITY_DEFAULTS['epochs']}]")
    g.add_argument("--imgsz", type=int, help=f"training image size, a multiple of 32 [{IDENTITY_DEFAULTS['imgsz']}]")
    g.add_argument("--batch", type=int, help=f"[{IDENTITY_DEFAULTS['batch']}]")
    g.add_argument("--fraction", help="train images used: ratio (0.5), count (8) or train,val (8,16) [1.0]")
    g.add_argument("--seed", type=int, help="training and sampler seed [0]")
    g.add_argument("--train-arg", action="append", metavar="KEY=VALUE",
                   help="further Ultralytics train argument of every candidate, repeatable [inheriting: "
                        f"{' '.join(FINETUNE_TRAIN_ARGS)}; --weights none: {' '.join(SCRATCH_TRAIN_ARGS)}]")
    g.add_argument("--weights", help="what every candidate starts from: 'auto' (the base trained once by the driver "
                   "for --base-epochs, stored with the study), a checkpoint .pt of the base, or 'none' (from "
                   f"scratch; then give more --epochs) [{IDENTITY_DEFAULTS['weights']}]")
    g.add_argument("--base-epochs", type=int, help=f"epochs of the base training for --weights auto "
                   f"[{IDENTITY_DEFAULTS['base_epochs']}]")
    g.add_argument("--base-train-arg", action="append", metavar="KEY=VALUE",
                   help=f"Ultralytics train argument of the base training, repeatable [{' '.join(SCRATCH_TRAIN_ARGS)}]")
    g = p.add_argument_group("constraints, checked before training (fixed for a study)")
    g.add_argument("--max-latency-ms", type=float, help="candidates slower than this are recorded infeasible, untrained")
    g.add_argument("--max-params", type=int, help="candidates with more parameters are recorded infeasible, untrained")
    g = p.add_argument_group("latency (fixed for a study)")
    g.add_argument("--latency-device", choices=("cpu", "cuda"), help="[cpu]")
    g.add_argument("--latency-imgsz", type=int, help="[640]")
    g.add_argument("--latency-warmup", type=int, help="[3]")
    g.add_argument("--latency-runs", type=int, help="timed runs; the median is the objective [15]")
    g.add_argument("--latency-threads", type=int, help="CPU threads for timing, 0 = all cores [0]")
    g = p.add_argument_group("execution (may change between runs)")
    g.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="[tpe]; see the README for the choice")
    g.add_argument("--workers", type=int, default=2, help="trials in flight at once [2]")
    g.add_argument("--cpus-per-trial", type=float, help="default: the cluster's CPUs / --workers")
    g.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractional allowed; needs a GPU [0]")
    g.add_argument("--ray-address", help="join an existing cluster: auto or ray://host:port (default: local Ray)")
    g.add_argument("--trial-timeout", type=float, help="seconds; a training running longer is FAIL")
    g.add_argument("--save-weights", action="store_true", help="keep each trial's last.pt in its run directory")
    g.add_argument("--max-failures-in-a-row", type=int, default=5, help="stop the search after this many [5]")
    g.add_argument("--no-export", action="store_true", help="skip writing pareto/ and the plots at the end")
    p.add_argument("--inject-fault", action="append", default=[], help=argparse.SUPPRESS)  # tests: KIND@TRIAL
    return p


@dataclass
class Prepared:
    """Checked inputs, ready to open a study with."""

    args: argparse.Namespace
    study_name: str
    storage_url: str
    out: Path
    settings: dict[str, Any]  # recorded identity
    schedule: ProxySchedule
    latency: LatencySettings
    space: Any
    data: Any
    faults: dict[int, str]
    weights: WeightsPlan
    checkpoint: tuple[dict, tuple[str, ...]] | None = None  # --weights PATH, loaded and checked


def resolve(args: argparse.Namespace, stored: dict[str, Any] | None) -> dict[str, Any]:
    """Identity values: given on the command line, else stored in the study (with --resume), else defaults.
    ``--train-arg`` and ``--base-train-arg`` add to (and override keys of) the stored or default list instead of
    replacing it; the default candidate arguments depend on whether candidates inherit weights."""
    base = {**IDENTITY_DEFAULTS, **(stored or {})}
    values = {k: (getattr(args, k) if getattr(args, k) is not None else base[k]) for k in IDENTITY_DEFAULTS}
    if base["train_arg"] is None:
        base["train_arg"] = SCRATCH_TRAIN_ARGS if str(values["weights"]) == "none" else FINETUNE_TRAIN_ARGS
    for key in ("train_arg", "base_train_arg"):
        values[key] = list(base[key]) + list(getattr(args, key) or [])
    return values


def check_args(args: argparse.Namespace) -> None:
    if args.budget <= 0:
        raise SearchError(f"--budget must be at least 1, got {args.budget}")
    if args.workers < 1:
        raise SearchError(f"--workers must be at least 1, got {args.workers}")
    if args.gpus_per_trial < 0 or (args.cpus_per_trial is not None and args.cpus_per_trial <= 0):
        raise SearchError("--gpus-per-trial must be >= 0 and --cpus-per-trial > 0")
    if args.gpus_per_trial > 0 and not args.ray_address:
        import torch

        if torch.cuda.device_count() == 0:
            raise SearchError(f"--gpus-per-trial {args.gpus_per_trial:g} but this machine has no GPU; "
                              "leave it at 0 for CPU trials")
    if args.sampler == "gp":
        import importlib.util

        if importlib.util.find_spec("scipy") is None:  # Optuna's GPSampler fits its kernel with scipy
            raise SearchError("--sampler gp needs scipy, which is not installed (pip install scipy)")
    if args.trial_timeout is not None and args.trial_timeout <= 0:
        raise SearchError(f"--trial-timeout must be positive, got {args.trial_timeout}")


def check_identity(v: dict[str, Any]) -> None:
    for name in ("imgsz", "latency_imgsz"):
        if v[name] <= 0 or v[name] % 32:
            raise SearchError(f"--{name.replace('_', '-')} must be a positive multiple of 32 (the largest stride), "
                              f"got {v[name]}")
    for name in ("epochs", "latency_runs"):
        if v[name] < 1:
            raise SearchError(f"--{name.replace('_', '-')} must be at least 1, got {v[name]}")
    if v["batch"] < 2:
        raise SearchError(f"--batch must be at least 2 (BatchNorm needs two images per batch), got {v['batch']}")
    if v["latency_warmup"] < 0 or v["latency_threads"] < 0:
        raise SearchError("--latency-warmup and --latency-threads must be >= 0")


def parse_train_args(items: list[str]) -> tuple[tuple[str, Any], ...]:
    import yaml
    from ultralytics.cfg import DEFAULT_CFG_DICT

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SearchError(f"--train-arg {item!r}: expected KEY=VALUE, e.g. warmup_epochs=1")
        if key not in DEFAULT_CFG_DICT:
            raise SearchError(f"--train-arg {key}: not an Ultralytics train argument")
        if key in RESERVED_ARGS:
            raise SearchError(f"--train-arg {key}: set by the search itself (use its own flag if there is one)")
        out[key] = yaml.safe_load(raw)
    return tuple(sorted(out.items()))


def parse_faults(items: list[str]) -> dict[int, str]:
    faults = {}
    for item in items:
        kind, _, number = item.partition("@")
        if kind not in FAULTS or not number.isdigit():
            raise SearchError(f"--inject-fault {item!r}: expected KIND@TRIAL with KIND in {FAULTS}")
        faults[int(number)] = kind
    return faults


def prepare(args: argparse.Namespace) -> Prepared:
    """Check everything the run needs, reading (never writing) an existing study's settings."""
    check_args(args)
    out = Path(args.out).expanduser().resolve()
    study_name = args.study_name or _default_name(resolve(args, None))
    if args.resume and not args.study_name:
        study_name = _study_to_resume(args, out, study_name)
    storage_url = args.storage or st.default_storage(out, study_name)
    stored_raw = None
    if args.resume:  # the study must exist; its recorded arguments fill in what is not given here
        stored_raw = _recorded(_existing(storage_url, study_name, required=True), storage_url)["args"]
    values = resolve(args, stored_raw if args.resume else None)
    check_identity(values)
    base = load_base(values["base"])
    space_config = SpaceConfig.load(values["space"])
    space = build_space(base, space_config)
    fraction = parse_fraction(values["fraction"])
    data = check_data(values["data"], out / ".data", fraction)
    batch = safe_batch(data.train_used, values["batch"])
    schedule = ProxySchedule(epochs=values["epochs"], imgsz=values["imgsz"], batch=batch,
                             fraction=tuple(fraction) if isinstance(fraction, list) else fraction, seed=values["seed"],
                             train_args=parse_train_args(values["train_arg"]))
    latency = LatencySettings(device=values["latency_device"], imgsz=values["latency_imgsz"],
                              warmup=values["latency_warmup"], runs=values["latency_runs"],
                              threads=values["latency_threads"])
    weights = WeightsPlan.parse(str(values["weights"]), values["base_epochs"],
                                parse_train_args(values["base_train_arg"]))
    for name in ("max_latency_ms", "max_params"):
        if values[name] is not None and values[name] <= 0:
            raise SearchError(f"--{name.replace('_', '-')} must be positive, got {values[name]}")
    # A mismatched checkpoint is refused before anything is written; the checked state is kept for the run.
    checkpoint = check_user_checkpoint(weights, base, data.nc) if weights.mode == "path" else None
    settings = {
        "base": {"name": base.name, "scale": base.scale, "hash": canonical_hash(base.yaml)},
        "weights": weights.identity(),
        "constraints": {"max_latency_ms": values["max_latency_ms"], "max_params": values["max_params"]},
        "space": _space_identity(space_config),
        "data": {"identity": data.identity, "fingerprint": data.fingerprint, "nc": data.nc,
                 "train_images": data.n_train, "val_images": data.n_val},
        "proxy": schedule.as_dict(),
        "latency": latency.as_dict(),
    }
    existing = _existing(storage_url, study_name, required=args.resume)
    if existing is not None:
        _recorded(existing, storage_url)
        diffs = st.settings_differences({k: v for k, v in existing.user_attrs[st.SETTINGS_ATTR].items() if k != "args"},
                                        settings)
        if diffs:
            hint = "" if args.resume else "; pass --resume to take the study's settings, or a new --study-name"
            raise SearchError(f"study {study_name!r} was run with other settings: " + "; ".join(diffs) + hint)
    settings["args"] = values
    return Prepared(args, study_name, storage_url, out, settings, schedule, latency, space, data,
                    parse_faults(args.inject_fault), weights, checkpoint)


def _study_to_resume(args: argparse.Namespace, out: Path, default: str) -> str:
    """``--resume`` without ``--study-name``: the default-named study if it exists, else the only one there is."""
    if args.storage:
        names = st.study_names(args.storage) if st.may_hold_studies(args.storage) else []
        where = args.storage
    else:
        names = [p.parent.name for p in sorted(out.glob("*/study.db"))]
        where = f"{out}/*/study.db"
    if default in names:
        return default
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


def _default_name(values: dict[str, Any]) -> str:
    data = "shapes-v2" if values["data"] is None else Path(values["data"]).stem
    return f"{Path(str(values['base'])).stem}-{data}"


def _space_identity(config: SpaceConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return json_ready(asdict(config))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prep = prepare(args)
    except (SearchError, SpaceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .session import run_session

    return run_session(prep)


if __name__ == "__main__":
    sys.exit(main())
