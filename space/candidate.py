"""Candidates: a base plus placements, their canonical hash, validation and YAML export with provenance."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

import modules

from .base import Base
from .errors import SpaceError
from .graph import Placement, absolute_rows, find_slots, mutate, slot_by_name

HASH_CHARS = 16


@dataclass(frozen=True)
class Candidate:
    """A network to evaluate: the model YAML dict, what produced it and its canonical hash."""

    base: str
    scale: str | None
    yaml: dict = field(repr=False)
    placements: tuple[Placement, ...]
    hash: str
    base_layers: tuple[tuple[int, int], ...] = ()  # (base index, candidate index) of every kept base layer

    def describe(self) -> str:
        return " ".join(p.describe() for p in self.placements) or "base"


@dataclass(frozen=True)
class Stats:
    """What validation measured: parameters, GFLOPs at ``flops_imgsz`` and the proxy-size forward check."""

    params: int
    gflops: float
    flops_imgsz: int
    imgsz: int


def make_candidate(base: Base, placements: Mapping[str, Placement] | None = None) -> Candidate:
    """The candidate that puts ``placements`` (slot name -> Placement) into ``base``; none gives the base."""
    placements = dict(placements or {})
    slots = find_slots(base)
    for name, p in placements.items():
        if p.slot != name:
            raise SpaceError(f"placement for slot {name!r} names slot {p.slot!r}")
        modules.get_spec(p.module).check(slot_by_name(slots, name).channels, **dict(p.hparams))
    data, kept = mutate(base, placements, slots)
    ordered = tuple(sorted(placements.values(), key=lambda p: slot_by_name(slots, p.slot).after))
    return Candidate(base.name, base.scale, data, ordered, canonical_hash(data), tuple(sorted(kept.items())))


def canonical_hash(data: dict) -> str:
    """Hash of what the YAML builds: absolute ``from`` indices, resolved scale, attention args with defaults.

    Equal networks get equal hashes whatever order or path produced their YAMLs; the backbone/head split,
    comments and key order do not count.
    """
    scales = data.get("scales") or {}
    scale = data.get("scale")
    canon = {
        "nc": data.get("nc"),
        "activation": data.get("activation"),
        "scale": scale,
        "multipliers": _numbers(scales.get(scale) if scale else [data.get("depth_multiple", 1.0), data.get("width_multiple", 1.0)]),
        "layers": [[f, n, m, _canonical_args(m, a)] for f, n, m, a in absolute_rows(data)],
    }
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:HASH_CHARS]


def _canonical_args(module: str, args: list) -> list:
    if module not in modules.names():
        return _numbers(args)
    bound = inspect.signature(modules.get_spec(module).layer).bind(*args)
    bound.apply_defaults()
    return _numbers([v for k, v in bound.arguments.items() if k not in ("args", "kwargs")])


def _numbers(value: Any) -> Any:
    """Lists/tuples as lists; 4.0 and 4 as the same number (both build the same layer)."""
    if isinstance(value, (list, tuple)):
        return [_numbers(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def to_yaml(candidate: Candidate, extra_header: Mapping[str, Any] | None = None) -> str:
    """An Ultralytics model YAML with a provenance header; it builds at the searched scale whatever its file name."""
    data = copy.deepcopy(candidate.yaml)
    if data.get("scales") and candidate.scale:
        # Only the searched scale is kept: Ultralytics falls back to the first scale when the file name names none.
        data["scales"] = {candidate.scale: data["scales"][candidate.scale]}
    header = {"attnas candidate": candidate.hash, "base": candidate.base, "scale": candidate.scale,
              "placements": candidate.describe(), **(extra_header or {})}
    lines = [f"# {k}: {v}" for k, v in header.items()]
    rows = {key: data.pop(key) for key in ("backbone", "head")}
    lines.append(yaml.safe_dump(_yaml_ready(data), sort_keys=False, default_flow_style=None, width=120).rstrip())
    for key, section in rows.items():  # one flow-style row per line, as Ultralytics writes its YAMLs
        lines.append(f"{key}:")
        lines += [f"  - {yaml.safe_dump(_yaml_ready(row), default_flow_style=True, width=1000).strip()}" for row in section]
    return "\n".join(lines) + "\n"


def write_yaml(candidate: Candidate, path: str | Path, extra_header: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(candidate, extra_header))
    return path


def _yaml_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _yaml_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_ready(v) for v in value]
    return value


def build_model(candidate: Candidate):
    """Build the candidate exactly as a user would: write its YAML, load it with ``ultralytics.YOLO``."""
    from ultralytics import YOLO

    modules.register()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_yaml(candidate, Path(tmp) / f"candidate-{candidate.hash}.yaml")
        return YOLO(str(path), task="detect", verbose=False)


def validate(candidate: Candidate, imgsz: int = 160, flops_imgsz: int = 640) -> Stats:
    """Check the candidate before it costs anything: it builds, a forward at ``imgsz`` is finite, and it has a
    non-zero FLOP count (counted with torch's FlopCounterMode, which also sees attention matmuls)."""
    return validated_model(candidate, imgsz, flops_imgsz)[1]


def validated_model(candidate: Candidate, imgsz: int = 160, flops_imgsz: int = 640) -> tuple[torch.nn.Module, Stats]:
    """:func:`validate`, also returning the built (eval-mode) network, e.g. to time it without building it again."""
    try:
        model = build_model(candidate).model
    except ValueError as err:
        raise SpaceError(f"candidate {candidate.hash} ({candidate.describe()}) does not build: {err}") from None
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, imgsz, imgsz))
        out = out[0] if isinstance(out, (list, tuple)) else out
        if not torch.isfinite(out).all():
            raise SpaceError(f"candidate {candidate.hash}: non-finite output at {imgsz} px")
        gflops = count_gflops(model, flops_imgsz)
    if not gflops > 0:
        raise SpaceError(f"candidate {candidate.hash}: FLOP count is 0, the model did not run at {flops_imgsz} px")
    stats = Stats(params=sum(p.numel() for p in model.parameters()), gflops=gflops, flops_imgsz=flops_imgsz,
                  imgsz=imgsz)
    return model, stats


def count_gflops(model: torch.nn.Module, imgsz: int) -> float:
    """GFLOPs (2 x multiply-adds, Ultralytics' convention) of one forward at ``imgsz`` x ``imgsz``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, imgsz, imgsz))
    return counter.get_total_flops() / 1e9

