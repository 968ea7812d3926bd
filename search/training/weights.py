"""Weights every candidate inherits: a user's checkpoint of the base (``--weights PATH``), the base trained once
by the driver (``--weights auto``), or none (``--weights none``, training from scratch).

Short proxies only carry signal from trained weights (see the README): a few epochs from scratch rank noise.
The checked base state dict is stored with the study (``<study>/base-weights.pt``) and read by every worker;
``auto`` reuses it on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import modules
from space import Base, SpaceError, build_model, check_checkpoint, make_candidate, to_yaml

from ..errors import SearchError, writing
from .proxy import FAITHFUL, ProxySchedule, TrainJob, TrainResult, run_training

STATE_FILE = "base-weights.pt"


@dataclass(frozen=True)
class WeightsPlan:
    """What ``--weights`` asked for: ``mode`` is "none", "auto" or "path"."""

    mode: str
    path: str | None = None
    base_epochs: int = 40
    train_args: tuple[tuple[str, Any], ...] = ()  # Ultralytics arguments of the base training (auto)
    sha256: str | None = None  # content of the checkpoint (path)

    @classmethod
    def parse(cls, value: str, base_epochs: int, train_args: tuple[tuple[str, Any], ...] = ()) -> "WeightsPlan":
        if value in ("none", "auto"):
            if base_epochs < 1:
                raise SearchError(f"--base-epochs must be at least 1, got {base_epochs}")
            return cls(value, None, base_epochs, train_args)
        path = Path(value).expanduser()
        if not path.is_file():
            raise SearchError(f"--weights {value}: no such checkpoint (give a .pt file, 'auto' or 'none')")
        return cls("path", str(path.resolve()), base_epochs, train_args, file_sha256(path)[:16])

    def as_dict(self) -> dict[str, Any]:
        """As recorded in the study's settings (what makes two studies' inherited starts equal)."""
        return {"mode": self.mode, "path": self.path, "sha256": self.sha256, "base_epochs": self.base_epochs,
                "train_args": dict(self.train_args)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WeightsPlan":
        return cls(d["mode"], d["path"], d["base_epochs"], tuple(sorted(d["train_args"].items())), d["sha256"])


@dataclass(frozen=True)
class BaseWeights:
    """The stored state dict workers load, and what the driver learnt making it (for the study's attributes)."""

    state_path: str
    skip_keys: tuple[str, ...]
    info: dict[str, Any]


@dataclass
class BaseSource:
    """What a run's candidates inherit: stored weights, or the base training the pool runs first (``--weights auto``,
    ``job``), and the cache a trained base is also kept in for other studies."""

    weights: BaseWeights | None = None
    job: TrainJob | None = None
    cache: BaseCache | None = None
    cache_key: str | None = None


def check_user_checkpoint(plan: WeightsPlan, base: Base, nc: int) -> tuple[dict, tuple[str, ...]]:
    """Load ``--weights PATH`` and compare it with the base built for ``nc`` classes; SearchError if it is of
    another base or scale. Returns its float state dict and the head keys a class-count mismatch leaves out."""
    import torch

    modules.register()
    try:
        ckpt = torch.load(plan.path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise SearchError(f"--weights {plan.path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    model = _model_of(ckpt)
    if not isinstance(model, torch.nn.Module):
        raise SearchError(f"--weights {plan.path}: no model in it (expected an Ultralytics checkpoint with 'model')")
    state = _float_state(model)
    reference = build_model(make_candidate(_with_nc(base, nc))).model.state_dict()
    try:
        skip = check_checkpoint(state, reference, f"--weights {plan.path}")
    except SpaceError as err:
        raise SearchError(str(err)) from None
    return state, skip


def prepare_base_weights(plan: WeightsPlan, base: Base, nc: int, data_yaml: str, schedule: ProxySchedule,
                         study_dir: Path, threads: int,
                         checked: tuple[dict, tuple[str, ...]] | None = None,
                         device: str = "cpu") -> BaseWeights | None:
    """The state dict the candidates inherit, made now; None for ``--weights none``. ``--weights auto`` trains the
    base here unless the study already stored it (the search itself runs :func:`base_training_job` in its pool).
    ``checked`` is what :func:`check_user_checkpoint` already returned for ``--weights PATH``; ``device`` is where
    ``--weights auto`` trains the base (an Ultralytics device string, as for the trials)."""
    if plan.mode == "none":
        return None
    if plan.mode == "path":
        state, skip = checked or check_user_checkpoint(plan, base, nc)
        if skip:
            print(f"--weights: the checkpoint has another class count than the data ({nc}); its class branch "
                  f"({len(skip)} tensors) is not inherited", file=sys.stderr)
        target = study_dir / STATE_FILE
        save_state(state, target)
        return BaseWeights(str(target), skip, {"source": plan.path, "skipped_head_keys": len(skip)})
    stored = stored_base_weights(study_dir)
    if stored is not None:
        return stored
    job = base_training_job(plan, base, data_yaml, schedule, study_dir, threads, device)
    _stderr(f"--weights auto: training the base model once ({plan.base_epochs} epochs); every candidate inherits it")
    return store_base_weights(job, run_training(job), study_dir)


def stored_base_weights(study_dir: Path, cache: "BaseCache | None" = None, key: str | None = None) -> BaseWeights | None:
    """``--weights auto``: the base an earlier run of this study trained, else the same base trained by another
    study (``cache`` hit on ``key``, copied into this study), else None (it must be trained)."""
    target = study_dir / STATE_FILE
    if target.is_file():
        return BaseWeights(str(target), (), {"source": "auto", "reused": str(target)})
    hit = cache.get(key) if cache is not None and key else None
    if hit is None:
        return None
    study_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(target, lambda tmp: shutil.copyfile(hit[0], tmp))
    return BaseWeights(str(target), (), {**hit[1], "source": "cache", "cache_key": key})


class BaseCache:
    """Trained bases shared by the studies under one ``--out``, addressed by what makes two base trainings equal
    (:func:`base_cache_key`): a second study on the same base, data and base-training arguments starts training
    candidates at once. Entries are written whole (temporary file, then rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """The entry's state file and info; None on a miss, and for an entry whose content does not match the
        hash recorded with it (a truncated copy, a disk error): it is removed, so the base is trained again."""
        state, info_path = self.root / f"{key}.pt", self.root / f"{key}.json"
        if not (state.is_file() and info_path.is_file()):
            return None
        try:
            info = json.loads(info_path.read_text())
            sound = info.get("sha256") in (None, file_sha256(state))  # entries from before hashes: trusted as before
        except (OSError, ValueError):
            info, sound = {}, False
        if sound:
            return state, info
        _stderr(f"--weights auto: the cached base {state} does not match its recorded hash; removed, "
                "the base is trained again")
        for path in (state, info_path):
            path.unlink(missing_ok=True)
        return None

    def put(self, key: str, state_path: str | Path, info: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        info = {**info, "sha256": file_sha256(Path(state_path))}
        write_atomically(self.root / f"{key}.pt", lambda tmp: shutil.copyfile(state_path, tmp))
        write_atomically(self.root / f"{key}.json", lambda tmp: tmp.write_text(json.dumps(info, default=str)))


def base_cache_key(job: TrainJob, data_fingerprint: str) -> str:
    """Content address of a base training: the base network, the data's content and the schedule (epochs, size,
    batch, fraction, seed, train arguments). The recipe of fresh layers is left out: a base has none, and bases
    cached before the recipe settings existed keep their address."""
    schedule = {k: v for k, v in job.schedule.as_dict().items() if k not in FAITHFUL}
    blob = json.dumps({"base": hashlib.sha256(job.yaml_text.encode()).hexdigest(), "data": data_fingerprint,
                       "schedule": schedule}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def base_training_job(plan: WeightsPlan, base: Base, data_yaml: str, schedule: ProxySchedule, study_dir: Path,
                      threads: int, device: str = "cpu") -> TrainJob:
    """The one training of the base for ``--weights auto``: ``--base-epochs`` with the base's train arguments."""
    candidate = make_candidate(base)
    return TrainJob(trial=-1, candidate_hash=candidate.hash, yaml_text=to_yaml(candidate), data=data_yaml,
                    schedule=replace(schedule, epochs=plan.base_epochs, train_args=plan.train_args),
                    run_dir=str(study_dir / "base-training"), threads=threads, save_weights=True, device=device,
                    val_every=base_val_every(plan.base_epochs))


def base_val_every(epochs: int) -> int:
    """How often the base training validates: about eight times (a few seconds each on 256 images), so the status
    line shows its mAP as it grows."""
    return max(1, round(epochs / 8))


def store_base_weights(job: TrainJob, result: TrainResult, study_dir: Path,
                       say: Callable[[str], None] | None = None, cache: BaseCache | None = None,
                       key: str | None = None) -> BaseWeights:
    """Keep the trained base's float state dict with the study (and in ``cache`` under ``key``); SearchError if its
    training failed. ``say`` reports it (default: a line on stderr)."""
    import torch

    if result.error:
        raise SearchError(f"--weights auto: training the base failed: {result.error}")
    ckpt = torch.load(Path(job.run_dir) / "weights" / "last.pt", map_location="cpu", weights_only=False)
    state = _float_state(_model_of(ckpt))
    target = study_dir / STATE_FILE
    save_state(state, target)
    (say or _stderr)(f"--weights auto: base mAP50-95 {result.map50_95:.4f} after {job.schedule.epochs} epochs "
                     f"({result.train_s:.0f} s); stored {target}")
    info = {"source": "auto", "base_map50_95": result.map50_95, "base_map50": result.map50,
            "train_s": round(result.train_s, 1)}
    if cache is not None and key:
        cache.put(key, target, info)
    return BaseWeights(str(target), (), info)


def save_state(state: dict, target: Path) -> None:
    """``torch.save`` through memory, then written atomically: torch's own file writer reports a full disk as an
    opaque RuntimeError, a plain write as the OSError (ENOSPC) that :func:`search.errors.disk_fault` names."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(target, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def write_atomically(target: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` beside ``target``, then renamed onto it: a write cut short (a full disk, a crash) never leaves a
    file that looks whole, nor a temporary one."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with writing(target):
            write(tmp)
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _model_of(ckpt: Any) -> Any:
    """The network of an Ultralytics checkpoint: its EMA when saved (what Ultralytics itself evaluates)."""
    if not isinstance(ckpt, dict):
        return ckpt
    return ckpt["ema"] if ckpt.get("ema") is not None else ckpt.get("model")


def _float_state(model) -> dict:
    """The state dict with floating tensors in fp32 (checkpoints store fp16), as every candidate loads it."""
    return {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _with_nc(base: Base, nc: int) -> Base:
    return replace(base, yaml={**base.yaml, "nc": nc})


def file_sha256(path: Path) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 1 MiB chunks: what identifies a checkpoint or state dict."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
