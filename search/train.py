"""``python -m search.train pareto/<name>.pt|.yaml``: train a found candidate in full and print its mAP.

The command to run after a search. Its defaults are the *full training* a candidate's proxy score should predict:
the study's base schedule (``--base-epochs`` epochs at the study's image size and batch), fine-tuning from the
base's weights mapped into the candidate (``<name>.pt``, or ``--weights`` for a YAML) with the fine-tuning train
arguments the search uses. It is Ultralytics' own ``YOLO(...).train(...)``: a user may equally run that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # never downloads weights, fonts or datasets
os.environ.setdefault("YOLO_VERBOSE", "False")

import yaml  # noqa: E402

import modules  # noqa: E402
from space import SpaceError, align, load_base  # noqa: E402

from .errors import SearchError  # noqa: E402
from .front.checkpoints import write_mapped  # noqa: E402
from .settings import FINETUNE_TRAIN_ARGS, SCRATCH_TRAIN_ARGS, StudySettings, parse_train_args  # noqa: E402
from .training.data import data_names, resolve_data_yaml  # noqa: E402
from .training.weights import STATE_FILE  # noqa: E402

RESULT_FILE = "full.json"  # what a full training measured, in its run directory


@dataclass(frozen=True)
class FullTraining:
    """How a found candidate is trained in full (all Ultralytics train arguments but the model)."""

    data: str
    epochs: int = StudySettings().weights.base_epochs
    imgsz: int = StudySettings().proxy.imgsz
    batch: int = StudySettings().proxy.batch
    seed: int = 0
    device: str = "cpu"
    workers: int = 2
    fraction: float = 1.0  # of the training images
    train_args: tuple[tuple[str, Any], ...] = FINETUNE_TRAIN_ARGS  # from scratch: SCRATCH_TRAIN_ARGS

    def ultralytics_args(self) -> dict[str, Any]:
        return {"data": self.data, "epochs": self.epochs, "imgsz": self.imgsz, "batch": self.batch,
                "seed": self.seed, "deterministic": True, "device": self.device, "workers": self.workers,
                "fraction": self.fraction, "plots": False, **dict(self.train_args)}


@dataclass(frozen=True)
class FullResult:
    """What a full training gave: the final validation of its best weights, as Ultralytics reports it."""

    candidate: str
    start: str  # the checkpoint it started from, or "scratch"
    map50_95: float
    map50: float
    epochs: int
    seed: int
    train_s: float
    save_dir: str


def study_settings_of(candidate: Path) -> StudySettings | None:
    """The settings of the study a ``pareto/`` file belongs to (its ``summary.json``), or None."""
    summary = candidate.resolve().parent.parent / "summary.json"
    if candidate.resolve().parent.name != "pareto" or not summary.is_file():
        return None
    return StudySettings.from_dict(json.loads(summary.read_text())["settings"])


def defaults_for(candidate: Path, data: str | None = None) -> FullTraining:
    """The full training of ``candidate``: its study's base schedule and data (a ``pareto/`` file), else what an
    exported ``.pt`` records, else the built-in defaults (data must then be given)."""
    settings = study_settings_of(candidate)
    if settings is not None:
        cache = candidate.resolve().parent.parent.parent / ".data"
        identity = settings.facts.get("data", {}).get("identity") or settings.data
        return FullTraining(data=str(data or resolve_data_yaml(identity, cache)), epochs=settings.weights.base_epochs,
                            imgsz=settings.proxy.imgsz, batch=settings.proxy.batch, seed=settings.proxy.seed)
    recorded = _checkpoint_args(candidate) if candidate.suffix == ".pt" else {}
    data = data or recorded.get("data")
    if not data:
        raise SearchError(f"{candidate}: not in a study's pareto/ directory and records no data: pass --data")
    return FullTraining(data=str(data), **{k: recorded[k] for k in ("epochs", "imgsz", "batch") if k in recorded})


def start_checkpoint(candidate: Path, weights: str | None, run_dir: Path, names: dict[int, str]) -> Path | None:
    """The checkpoint training starts from: an exported ``.pt`` itself; for a YAML, ``weights`` (a base checkpoint
    or state dict; default: its study's base weights) mapped in through the renumbering, built for the classes
    ``names`` and written into ``run_dir``; None from scratch (``--weights none``)."""
    if candidate.suffix == ".pt":
        return candidate
    if weights == "none":
        return None
    if weights is None:
        stored = candidate.resolve().parent.parent / STATE_FILE
        if study_settings_of(candidate) is None or not stored.is_file():
            raise SearchError(f"{candidate}: no base weights known (not a pareto/ file of a study with base weights); "
                              "pass --weights BASE.pt, or --weights none to train from scratch")
        weights = str(stored)
    state, base_yaml = _base_of(Path(weights), candidate)
    text = candidate.read_text()
    try:
        pairs = align(base_yaml, yaml.safe_load(text))
    except SpaceError as err:
        raise SearchError(f"--weights {weights}: {err}") from None
    target = run_dir / f"start-{candidate.stem}.pt"
    run_dir.mkdir(parents=True, exist_ok=True)
    inherited = write_mapped(target, text, pairs, state, names, {})
    print(f"{candidate.name}: {inherited.tensors} tensors of {weights} mapped in; fresh layers "
          f"{list(inherited.fresh_layers)}", file=sys.stderr)
    return target


def train_full(candidate: Path, how: FullTraining, start: Path | None, run_dir: Path) -> FullResult:
    """Train ``candidate`` (from ``start``; None: its YAML from scratch, with ``how``'s arguments as given) with
    Ultralytics into ``run_dir``; the result is also written to ``run_dir/full.json``."""
    from ultralytics import YOLO

    modules.register()
    # Ultralytics' Ray Tune callback asks Ray for a Tune trial id outside Tune and warns; nothing to act on.
    warnings.filterwarnings("ignore", message=".*get_trial_id.*")
    began = time.perf_counter()
    model = YOLO(str(start or candidate), task="detect")
    model.train(**how.ultralytics_args(), pretrained=start is not None, project=str(run_dir.parent),
                name=run_dir.name, exist_ok=True)
    metrics = model.trainer.metrics
    result = FullResult(candidate=str(candidate), start=str(start) if start else "scratch",
                        map50_95=float(metrics["metrics/mAP50-95(B)"]), map50=float(metrics["metrics/mAP50(B)"]),
                        epochs=how.epochs, seed=how.seed, train_s=round(time.perf_counter() - began, 1),
                        save_dir=str(model.trainer.save_dir))
    (run_dir / RESULT_FILE).write_text(json.dumps({**asdict(result), "training": how.ultralytics_args()}, indent=1))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.train", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("candidate", help="an exported pareto/<name>.pt (base weights mapped in) or a candidate YAML")
    p.add_argument("--weights", help="for a YAML: a base checkpoint or state dict to map in, or 'none' (from scratch) "
                                     "[its study's base weights]")
    p.add_argument("--epochs", type=int, help="[the study's --base-epochs]")
    p.add_argument("--data", help="an Ultralytics dataset YAML [the study's data]")
    p.add_argument("--imgsz", type=int, help="[the study's]")
    p.add_argument("--batch", type=int, help="[the study's]")
    p.add_argument("--seed", type=int, help="[the study's]")
    p.add_argument("--device", default="cpu", help="Ultralytics device string, e.g. 0 for the first GPU [cpu]")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers [2]")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the training images used [1.0]")
    p.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="further Ultralytics train argument, repeatable "
                        f"[{' '.join(f'{k}={v}' for k, v in FINETUNE_TRAIN_ARGS)}]")
    p.add_argument("--out", help="run directory [<study>/full/<name>, or runs/full/<name> outside a study]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    candidate = Path(args.candidate).expanduser()
    try:
        if not candidate.is_file() or candidate.suffix not in (".pt", ".yaml", ".yml"):
            raise SearchError(f"{candidate}: no such .pt or .yaml file")
        if candidate.suffix == ".pt" and args.weights is not None:
            raise SearchError(f"{candidate} holds its own weights; give the candidate's YAML to start from --weights")
        how = defaults_for(candidate, args.data)
        chosen = {k: getattr(args, k) for k in ("epochs", "imgsz", "batch", "seed") if getattr(args, k) is not None}
        # From scratch a candidate trains as the base did; --train-arg adds to (and overrides) either default.
        defaults = SCRATCH_TRAIN_ARGS if args.weights == "none" else how.train_args
        given = dict(parse_train_args(args.train_arg))
        how = replace(how, device=args.device, workers=args.workers, fraction=args.fraction, **chosen,
                      train_args=tuple(sorted({**dict(defaults), **given}.items())))
        if not Path(how.data).is_file():
            raise SearchError(f"data YAML {how.data} does not exist (pass --data)")
        run_dir = Path(args.out) if args.out else _default_run_dir(candidate)
        start = start_checkpoint(candidate, args.weights, run_dir, data_names(how.data))
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = train_full(candidate, how, start, run_dir.resolve())
    print(f"{candidate.name}: mAP50-95 {result.map50_95:.4f}, mAP50 {result.map50:.4f} after {result.epochs} epochs "
          f"(seed {result.seed}, {result.train_s:.0f} s); weights {result.save_dir}/weights/best.pt")
    return 0


def _default_run_dir(candidate: Path) -> Path:
    if study_settings_of(candidate) is not None:
        return candidate.resolve().parent.parent / "full" / candidate.stem
    return Path("runs") / "full" / candidate.stem


def _checkpoint_args(path: Path) -> dict[str, Any]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise SearchError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    return dict(ckpt.get("train_args") or {}) if isinstance(ckpt, dict) else {}


def _base_of(weights: Path, candidate: Path) -> tuple[dict, dict]:
    """A base's float state dict and model YAML: from an Ultralytics checkpoint, or a plain state dict (a study's
    ``base-weights.pt``) with the base the candidate YAML's header names."""
    import torch

    modules.register()
    if not weights.is_file():
        raise SearchError(f"--weights {weights}: no such file")
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
    if isinstance(model, torch.nn.Module):
        state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        return state, model.yaml
    header = dict(line[2:].split(": ", 1) for line in candidate.read_text().splitlines()
                  if line.startswith("# ") and ": " in line)
    if "base" not in header:
        raise SearchError(f"--weights {weights} is a bare state dict and {candidate} names no base in its header")
    return ckpt, load_base(header["base"], header.get("scale") or None).yaml


if __name__ == "__main__":
    sys.exit(main())
