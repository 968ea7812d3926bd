"""One typed settings object for a search, built once from the command line (or the stored study).

:class:`StudySettings` is what defines a study: what is searched, how candidates are trained and timed, the
objectives and constraints. Its :meth:`~StudySettings.as_dict` *is* the identity recorded in the study; resuming
rebuilds it with :meth:`~StudySettings.from_dict`, applies what the command line gives, and refuses any
difference by name. A new setting is a new field here: it is recorded and checked on resume with no other edit.
:class:`RunSettings` is how this run executes (workers, Ray, timeouts): it may change between runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from space import SpaceConfig

from . import objectives as obj
from .errors import SearchError
from .latency import LatencySettings, parse_imgsz
from .training.data import parse_fraction
from .training.proxy import FAULTS, RESERVED_ARGS, ProxySchedule
from .training.weights import WeightsPlan

# Ultralytics train arguments. Training from scratch (the base for --weights auto, or every candidate with
# --weights none): AdamW at 0.003 with the usual warm-up; measured on the built-in data, 20 epochs reach mAP50-95
# 0.12 with optimizer=auto, 0.15 at lr0 0.001, 0.10 with SGD 0.01, 0.25 at 0.003, and 40 epochs at 0.003 reach 0.57.
SCRATCH_TRAIN_ARGS = (("lr0", 0.003), ("optimizer", "AdamW"), ("warmup_epochs", 3))
# Fine-tuning inherited weights: a third of that rate and no bias warm-up (Ultralytics starts bias learning rates at
# 0.1, which kicks a trained network off its optimum at step 0). Measured: the same candidate's 3-epoch proxy mAP
# varies with the seed by sd 0.005 this way, 0.018 with the scratch arguments.
FINETUNE_TRAIN_ARGS = (("lr0", 0.001), ("optimizer", "AdamW"), ("warmup_bias_lr", 0.0), ("warmup_epochs", 3))
SETTINGS_LAYOUT = 2  # bumped when the recorded form changes incompatibly
RAY_CONNECT_S = 10.0  # a --ray-address whose port does not accept a TCP connection within this is refused
RAY_START_S = 120.0  # starting or joining Ray takes longer than this: refused (search/session.py)


@dataclass(frozen=True)
class Constraints:
    """Limits checked before training: a candidate that breaks one is recorded infeasible and never trained."""

    max_latency_ms: float | None = None
    max_params: int | None = None


@dataclass(frozen=True)
class Fidelity:
    """How long candidates train. ``rungs``: epochs at each rung of asynchronous successive halving (one value:
    every candidate trains that long); a candidate is promoted to the next rung when it is in the best 1/``eta``
    of its rung by Pareto rank. ``confirm_seeds``: after the budget, the top-rung front and the base are trained
    again with this many more seeds, and the exported front is recomputed on the seed means."""

    # 1, 3, 9 epochs: 50 candidates cost about as many epochs as 3 epochs each, but the front is decided at 9.
    rungs: tuple[int, ...] = (1, 3, 9)
    eta: int = 3
    confirm_seeds: int = 1
    # "capped": at most floor(n / eta) of a rung's n results promoted (search/engine/rungs.py), or "asha"
    promotion: str = "capped"


@dataclass(frozen=True)
class StudySettings:
    """Everything that defines a study; fixed for its life. ``facts`` are content fingerprints resolved from the
    inputs (the base's hash, the dataset's fingerprint and counts), so a changed file is caught on resume."""

    objectives: tuple[str, ...] = obj.DEFAULT
    base: str = "yolov8n.yaml"
    space: SpaceConfig = SpaceConfig()
    data: str | None = None  # an Ultralytics dataset YAML; None: the built-in shapes set
    # Candidates fine-tune the inherited base for a few epochs (3 epochs carry signal once the base is trained;
    # from scratch they rank noise: see the README).
    # The schedule's epochs are the top rung's: every rung follows the top rung's learning-rate schedule.
    proxy: ProxySchedule = ProxySchedule(epochs=9, imgsz=128, batch=16, train_args=FINETUNE_TRAIN_ARGS)
    fidelity: Fidelity = Fidelity()
    weights: WeightsPlan = WeightsPlan("auto", None, 40, SCRATCH_TRAIN_ARGS)
    latency: LatencySettings = LatencySettings()
    constraints: Constraints = Constraints()
    facts: dict[str, Any] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The recorded identity (JSON-ready)."""
        return json_ready({"layout": SETTINGS_LAYOUT, "objectives": list(self.objectives), "base": self.base,
                           "space": asdict(self.space), "data": self.data, "proxy": self.proxy.as_dict(),
                           "fidelity": asdict(self.fidelity),
                           "weights": self.weights.as_dict(), "latency": self.latency.as_dict(),
                           "constraints": asdict(self.constraints), "facts": self.facts})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudySettings":
        if d.get("layout") != SETTINGS_LAYOUT:
            raise SearchError("the study was made by an older attnas (its recorded settings have another layout); "
                              "start a new study with another --study-name")
        return cls(objectives=tuple(d["objectives"]), base=d["base"], space=SpaceConfig.from_dict(_space_raw(d)),
                   data=d["data"], proxy=ProxySchedule.from_dict(d["proxy"]),
                   # a study recorded before --promotion used asynchronous halving
                   fidelity=Fidelity(**{"promotion": "asha", **d["fidelity"], "rungs": tuple(d["fidelity"]["rungs"])}),
                   weights=WeightsPlan.from_dict(d["weights"]), latency=LatencySettings(**d["latency"]),
                   constraints=Constraints(**d["constraints"]), facts=dict(d.get("facts", {})))

    def objective_table(self) -> tuple[obj.Objective, ...]:
        return obj.parse(self.objectives)


@dataclass(frozen=True)
class RunSettings:
    """How this run executes; may change between runs of a study. Each field is the flag of the same name
    (``--max-failures-in-a-row`` sets ``max_failures_in_a_row``; a field true by default is turned off by
    ``--no-<name>``): :func:`run_settings` reads them all and :meth:`Settings.resume_command` repeats them."""

    budget: int = 50
    workers: int = 2
    sampler: str = "evolution"
    cpus_per_trial: float | None = None  # None: the cluster's CPUs / workers
    gpus_per_trial: float = 0.0
    ray_address: str | None = None
    latency_node: str = "driver"  # the one node every latency is timed on: driver, a node id, IP or hostname
    ship_data: bool = False  # copy the dataset to every node through Ray (search/engine/cluster.py)
    trial_timeout: float | None = None
    save_weights: bool = False
    max_failures_in_a_row: int = 5
    export: bool = True
    verbose: bool = False  # every event (trial finished, rung result, retry) on the console too, not only in search.log
    faults: tuple[tuple[int | str, str], ...] = ()  # test hook (--inject-fault): (trial number or "export", kind)

    def __post_init__(self) -> None:
        if self.budget <= 0:
            raise SearchError(f"--budget must be at least 1, got {self.budget}")
        if self.workers < 1:
            raise SearchError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_trial < 0 or (self.cpus_per_trial is not None and self.cpus_per_trial <= 0):
            raise SearchError("--gpus-per-trial must be >= 0 and --cpus-per-trial > 0")
        if self.trial_timeout is not None and self.trial_timeout <= 0:
            raise SearchError(f"--trial-timeout must be positive, got {self.trial_timeout}")
        if self.max_failures_in_a_row < 1:
            raise SearchError(f"--max-failures-in-a-row must be at least 1, got {self.max_failures_in_a_row}")

    @property
    def train_device(self) -> str:
        """Ultralytics' device for a training: the first GPU Ray gives the trial, or the CPU."""
        return "0" if self.gpus_per_trial > 0 else "cpu"


@dataclass(frozen=True)
class Settings:
    """A whole search: the study's identity, this run's execution, and where the study lives."""

    study: StudySettings
    run: RunSettings
    study_name: str
    storage_url: str
    out: Path
    resume: bool = False

    @property
    def study_dir(self) -> Path:
        return self.out / self.study_name

    def resume_command(self, study_name: str, budget: int | None = None) -> str:
        """The exact command that continues (or, with a larger ``budget``, extends) the study: its settings come
        from the study (``--resume``); this run's execution flags that differ from their defaults are repeated."""
        argv = ["python", "-m", "search.run", "--resume", "--study-name", study_name, "--out", str(self.out),
                "--storage", self.storage_url, "--budget", str(budget or self.run.budget)]
        defaults = RunSettings()
        for f in fields(RunSettings):
            value = getattr(self.run, f.name)
            if f.name in ("budget", "faults") or value == getattr(defaults, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else f"--no-{flag[2:]}")
            else:
                argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return shlex.join(argv)


# -- from the command line --------------------------------------------------------------------------------------
# Flags that set one field of a part of StudySettings: CLI dest -> (part, field).
_FIELD_FLAGS = {
    "imgsz": ("proxy", "imgsz"), "batch": ("proxy", "batch"), "seed": ("proxy", "seed"),
    "fresh_lr_mult": ("proxy", "fresh_lr_mult"),
    "base_epochs": ("weights", "base_epochs"), "eta": ("fidelity", "eta"), "confirm_seeds": ("fidelity", "confirm_seeds"),
    "promotion": ("fidelity", "promotion"),
    "latency_device": ("latency", "device"), "latency_warmup": ("latency", "warmup"),
    "latency_runs": ("latency", "runs"), "latency_min_runs": ("latency", "min_runs"),
    "latency_threads": ("latency", "threads"), "latency_backend": ("latency", "backend"),
    "latency_half": ("latency", "half"), "latency_batch": ("latency", "batch"),
    "latency_ci": ("latency", "ci"), "latency_statistic": ("latency", "statistic"),
    "latency_estimator": ("latency", "estimator"),
    "latency_aa_tolerance": ("latency", "aa_tolerance"), "latency_tries": ("latency", "tries"),
    "max_latency_ms": ("constraints", "max_latency_ms"), "max_params": ("constraints", "max_params"),
}


def default(dest: str) -> Any:
    """The default of an identity flag, for ``--help`` (read from :class:`StudySettings`, the one place)."""
    d = StudySettings()
    if dest in _FIELD_FLAGS:
        part, name = _FIELD_FLAGS[dest]
        return getattr(getattr(d, part), name)
    return {"objectives": ",".join(d.objectives), "base": d.base, "weights": d.weights.mode,
            "rungs": ",".join(map(str, d.fidelity.rungs)), "latency_imgsz": d.latency.imgsz,
            "train_arg": _show_args(d.proxy.train_args), "base_train_arg": _show_args(d.weights.train_args),
            "fraction": d.proxy.fraction, "fresh_init": _show_init(d.proxy.fresh_init)}[dest]


def study_settings(args: argparse.Namespace, stored: StudySettings | None) -> StudySettings:
    """The study's settings: each flag given on the command line, else the stored study's value (``--resume``),
    else the default. ``--train-arg`` / ``--base-train-arg`` add to (and override keys of) the stored or default
    list. Inputs are parsed and checked here; files are resolved later (:func:`search.run.prepare`)."""
    s = stored or StudySettings()
    if args.objectives is not None:
        s = replace(s, objectives=tuple(o.name for o in obj.parse(args.objectives)))
    for dest in ("base", "data"):
        if getattr(args, dest) is not None:
            s = replace(s, **{dest: getattr(args, dest)})
    if args.space is not None:
        s = replace(s, space=SpaceConfig.load(args.space))
    parts = {name: getattr(s, name) for name in ("proxy", "weights", "latency", "constraints", "fidelity")}
    for dest, (part, name) in _FIELD_FLAGS.items():
        if getattr(args, dest) is not None:
            parts[part] = replace(parts[part], **{name: getattr(args, dest)})
    if args.fresh_init is not None:
        parts["proxy"] = replace(parts["proxy"], fresh_init=parse_fresh_init(args.fresh_init))
    if args.latency_imgsz is not None:
        parts["latency"] = replace(parts["latency"], imgsz=parse_imgsz(args.latency_imgsz))
    rungs = _rungs(args)
    if rungs is not None:
        parts["fidelity"] = replace(parts["fidelity"], rungs=rungs)
    parts["proxy"] = replace(parts["proxy"], epochs=parts["fidelity"].rungs[-1])
    if args.fraction is not None:
        fraction = parse_fraction(args.fraction)
        parts["proxy"] = replace(parts["proxy"], fraction=tuple(fraction) if isinstance(fraction, list) else fraction)
    if args.weights is not None:
        plan = WeightsPlan.parse(args.weights, parts["weights"].base_epochs, parts["weights"].train_args)
        if stored is None and plan.mode == "none":  # from scratch: candidates train like the base
            parts["proxy"] = replace(parts["proxy"], train_args=SCRATCH_TRAIN_ARGS)
        parts["weights"] = plan
    parts["proxy"] = replace(parts["proxy"], train_args=_merge(parts["proxy"].train_args, args.train_arg))
    parts["weights"] = replace(parts["weights"], train_args=_merge(parts["weights"].train_args, args.base_train_arg))
    s = replace(s, **parts)
    check(s)
    return s


def run_settings(args: argparse.Namespace) -> RunSettings:
    """Every :class:`RunSettings` field from the flag of the same name (``--inject-fault`` items are parsed)."""
    given = {f.name: getattr(args, f.name) for f in fields(RunSettings)}
    return RunSettings(**{**given, "faults": parse_faults(given["faults"])})


def check(s: StudySettings) -> None:
    """Values that are impossible whatever the files say."""
    for flag, value in (("--imgsz", s.proxy.imgsz),):
        if value <= 0 or value % 32:
            raise SearchError(f"{flag} must be a positive multiple of 32 (the largest stride), got {value}")
    if s.weights.base_epochs < 1:
        raise SearchError(f"--base-epochs must be at least 1, got {s.weights.base_epochs}")
    if s.fidelity.eta < 2:
        raise SearchError(f"--eta must be at least 2, got {s.fidelity.eta}")
    if s.fidelity.confirm_seeds < 0:
        raise SearchError(f"--confirm-seeds must be >= 0, got {s.fidelity.confirm_seeds}")
    if not s.proxy.fresh_lr_mult > 0:
        raise SearchError(f"--fresh-lr-mult must be positive, got {s.proxy.fresh_lr_mult:g}")
    if s.proxy.batch < 2:
        raise SearchError(f"--batch must be at least 2 (BatchNorm needs two images per batch), got {s.proxy.batch}")
    s.latency.check(gpu_available=True)  # impossible values; what this machine cannot run: search.run.prepare
    for flag, value in (("--max-latency-ms", s.constraints.max_latency_ms), ("--max-params", s.constraints.max_params)):
        if value is not None and value <= 0:
            raise SearchError(f"{flag} must be positive, got {value:g}")


def parse_rungs(text: str) -> tuple[int, ...]:
    """``"1,3,9"`` -> (1, 3, 9): strictly increasing positive epoch counts."""
    try:
        rungs = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--rungs {text!r}: expected increasing epoch counts, e.g. 1,3,9") from None
    if not rungs or rungs[0] < 1 or any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise ValueError(f"--rungs {text!r}: expected strictly increasing positive epoch counts, e.g. 1,3,9")
    return rungs


def parse_train_args(items: list[str] | tuple[str, ...], flag: str = "--train-arg") -> tuple[tuple[str, Any], ...]:
    """``KEY=VALUE`` items -> sorted (key, value) pairs, each key an Ultralytics train argument the search does not
    set itself."""
    from ultralytics.cfg import DEFAULT_CFG_DICT  # ultralytics takes ~1 s to import: only when the flag is given

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SearchError(f"{flag} {item!r}: expected KEY=VALUE, e.g. warmup_epochs=1")
        if key not in DEFAULT_CFG_DICT:
            raise SearchError(f"{flag} {key}: not an Ultralytics train argument")
        if key in RESERVED_ARGS:
            raise SearchError(f"{flag} {key}: set by the search itself (use its own flag if there is one)")
        out[key] = yaml.safe_load(raw)
    return tuple(sorted(out.items()))


def parse_fresh_init(text: str) -> float | None:
    """``--fresh-init``: ``none`` (residual gates start as the papers start them) or the positive value they start at."""
    if str(text).strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise SearchError(f"--fresh-init {text!r}: expected 'none' or a positive number, e.g. 0.1")
    return value


def _show_init(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def parse_faults(items: list[str]) -> tuple[tuple[int | str, str], ...]:
    """``--inject-fault`` items (tests only): KIND@TRIAL, a training's fault, or ``hang@export``, which holds the
    export at its start (a stop during the export)."""
    faults: list[tuple[int | str, str]] = []
    for item in items:
        kind, _, where = item.partition("@")
        if item == "hang@export":
            faults.append(("export", kind))
        elif kind in FAULTS and where.isdigit():
            faults.append((int(where), kind))
        else:
            raise SearchError(f"--inject-fault {item!r}: expected KIND@TRIAL with KIND in {FAULTS}, or hang@export")
    return tuple(faults)


def differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two recorded settings, e.g. ``proxy.epochs: study has 10, this run 3``."""
    def show(value: Any) -> str:
        text = json.dumps(value, sort_keys=True, default=str)
        return text if len(text) <= 80 else text[:77] + "..."

    diffs = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            diffs.append(f"{prefix}{key}: study has {show(a)}, this run {show(b)}")
    return diffs


def json_ready(value: Any) -> Any:
    """Tuples to lists and keys to strings, recursively (what JSON storage gives back)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _rungs(args: argparse.Namespace) -> tuple[int, ...] | None:
    """``--rungs 1,3,9``, or ``--epochs N`` (one rung: every candidate trains N epochs); None when neither is given."""
    if args.epochs is not None and args.rungs is not None:
        raise SearchError("give --rungs or --epochs, not both (--epochs N is --rungs N)")
    if args.epochs is not None and args.epochs < 1:
        raise SearchError(f"--epochs must be at least 1, got {args.epochs}")
    try:
        return parse_rungs(str(args.epochs)) if args.epochs is not None else (
            parse_rungs(args.rungs) if args.rungs is not None else None)
    except ValueError as err:
        raise SearchError(str(err)) from None


def _merge(current: tuple[tuple[str, Any], ...], items: list[str] | None) -> tuple[tuple[str, Any], ...]:
    if not items:
        return current
    return tuple(sorted({**dict(current), **dict(parse_train_args(items))}.items()))


def _show_args(pairs: tuple[tuple[str, Any], ...]) -> str:
    return " ".join(f"{k}={v}" for k, v in pairs)


def _space_raw(d: dict[str, Any]) -> dict[str, Any]:
    """The recorded space in the form a space file has (None entries mean "everything")."""
    return {k: v for k, v in d["space"].items() if v is not None}


__all__ = ["Constraints", "Fidelity", "RunSettings", "Settings", "StudySettings", "FINETUNE_TRAIN_ARGS", "SCRATCH_TRAIN_ARGS",
           "default", "differences", "json_ready", "parse_faults", "parse_rungs", "parse_train_args", "run_settings",
           "study_settings"]

