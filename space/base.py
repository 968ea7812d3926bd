"""Base YOLO model YAMLs: loading (bundled names or user paths), scale resolution, safety, layer shapes."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import yaml
from torch import nn

from .errors import SpaceError, first_line

# Ultralytics names a scaled bundled model by its family file plus a letter: yolov8s.yaml -> yolov8.yaml @ s.
_SCALED_NAME = re.compile(r"^(yolo(?:v)?\d+)([nslmx])((?:-[\w-]+)?)\.ya?ml$")
_PLAIN_ACTIVATION = re.compile(r"^nn\.([A-Za-z][A-Za-z0-9]*)\(\s*(?:[-+0-9.eE]+|True|False)?(?:\s*,\s*(?:[-+0-9.eE]+|True|False|inplace=(?:True|False)))*\s*\)$")
# Probe size for layer shapes: 256 px is what Ultralytics itself uses to find strides.
PROBE_PX = 256


@dataclass(frozen=True)
class LayerInfo:
    """What one base layer produces: index, type, output channels and stride (input px / output px)."""

    index: int
    type: str
    channels: int
    stride: int
    in_channels: int | None  # channels of its single input, None when it reads several layers
    backbone: bool


@dataclass(frozen=True)
class Base:
    """A base model: its YAML dict (unscaled rows, as Ultralytics reads them) at a resolved scale."""

    name: str  # what the user gave: "yolov8n.yaml" or a path
    yaml: dict
    scale: str | None
    layers: tuple[LayerInfo, ...]

    @property
    def n_backbone(self) -> int:
        return len(self.yaml["backbone"])

    def rows(self) -> list[list]:
        return copy.deepcopy(self.yaml["backbone"] + self.yaml["head"])


def bundled_yaml_path(name: str) -> Path | None:
    """Path of a YAML shipped with Ultralytics (``yolov8.yaml``, ``yolo11.yaml``, ...), or None."""
    from ultralytics.utils.checks import check_yaml

    try:
        found = check_yaml(name, hard=False)
    except Exception:  # check_yaml may raise on odd names instead of returning None
        return None
    return Path(found) if found else None


def load_base(spec: str | Path, scale: str | None = None) -> Base:
    """Load a base YAML by bundled name (``yolov8n.yaml``) or path, resolving its scale as Ultralytics does.

    The scale comes from ``scale`` if given, else from a ``scale:`` key in the file, else from the file name
    (``yolov8s`` -> s), else the first scale listed (Ultralytics' own fallback).
    """
    spec = str(spec)
    path = Path(spec)
    if path.is_file():
        data = _read_yaml(path)
        name_scale = _scale_from_name(path.name)
    else:
        match = _SCALED_NAME.match(path.name)
        family_file = f"{match.group(1)}{match.group(3)}.yaml" if match else path.name
        found = bundled_yaml_path(family_file)
        if found is None:
            raise SpaceError(f"unknown base {spec!r}: not a file and not a YAML bundled with Ultralytics "
                             "(try yolov8n.yaml, yolo11s.yaml or a path to a model YAML)")
        data = _read_yaml(found)
        name_scale = match.group(2) if match else None
    check_model_yaml(data, spec)
    scales = data.get("scales")
    chosen = scale or data.get("scale") or name_scale
    if scales:
        chosen = chosen or next(iter(scales))
        if chosen not in scales:
            raise SpaceError(f"base {spec!r} has no scale {chosen!r}; its scales are {', '.join(scales)}")
    else:
        chosen = None
    data = dict(data)
    data["scale"] = chosen
    return Base(name=spec, yaml=data, scale=chosen, layers=_layer_shapes(yaml.safe_dump(data, sort_keys=False)))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: a model YAML must be a mapping with 'backbone' and 'head' lists")
    return data


def _scale_from_name(filename: str) -> str | None:
    match = re.search(r"yolo(?:e-)?v?\d+([nslmx])", Path(filename).stem)
    return match.group(1) if match else None


def check_model_yaml(data: dict, where: str) -> None:
    """Refuse YAMLs that cannot be a detection model, or whose ``activation`` would run arbitrary code."""
    for key in ("backbone", "head"):
        rows = data.get(key)
        if not isinstance(rows, list) or not rows:
            raise SpaceError(f"{where}: missing or empty {key!r} list")
        for row in rows:
            if not (isinstance(row, list) and len(row) == 4 and isinstance(row[2], str) and isinstance(row[3], list)):
                raise SpaceError(f"{where}: {key} row {row!r} is not [from, repeats, module, args]")
    last = data["head"][-1][2]
    if "Detect" not in last:
        raise SpaceError(f"{where}: no Detect head (the last head row is {last!r}); only detection models are searched")
    act = data.get("activation")
    if act is not None:
        match = _PLAIN_ACTIVATION.match(str(act))
        known = match and isinstance(getattr(nn, match.group(1), None), type) and issubclass(getattr(nn, match.group(1)), nn.Module)
        if not known:
            raise SpaceError(f"{where}: activation {act!r} refused: only a plain nn.<Activation>() call is allowed "
                             "(Ultralytics evaluates this field as Python code)")


@lru_cache(maxsize=32)
def _layer_shapes(yaml_text: str) -> tuple[LayerInfo, ...]:
    """Build the base once and record each layer's output channels and stride with forward hooks."""
    from ultralytics.nn.tasks import DetectionModel

    data = yaml.safe_load(yaml_text)
    try:
        model = DetectionModel(copy.deepcopy(data), verbose=False)
    except Exception as err:
        raise SpaceError(f"base does not build with Ultralytics: {type(err).__name__}: {err}") from None
    outputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: outputs.__setitem__(i, out))
             for i, m in enumerate(model.model)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, PROBE_PX, PROBE_PX))
    for h in hooks:
        h.remove()
    n_backbone = len(data["backbone"])
    infos = []
    for i, m in enumerate(model.model):
        out = outputs[i]
        if not isinstance(out, torch.Tensor):  # the Detect head
            infos.append(LayerInfo(i, m.type, 0, 0, None, False))
            continue
        f = m.f
        single = f if isinstance(f, int) else None
        in_ch = None
        if single is not None and i > 0:
            src = i + single if single < 0 else single
            in_ch = outputs[src].shape[1] if isinstance(outputs[src], torch.Tensor) else None
        elif i == 0:
            in_ch = 3
        infos.append(LayerInfo(i, m.type.split(".")[-1], int(out.shape[1]), PROBE_PX // int(out.shape[-1]), in_ch,
                               i < n_backbone))
    return tuple(infos)
