"""Slots of a base graph and the mutation that inserts or swaps in attention layers, renumbering every ``from``."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Mapping

import modules

from .base import Base
from .errors import SpaceError

MODES = ("insert", "replace")


@dataclass(frozen=True)
class Slot:
    """A place for one attention layer: right after base layer ``after`` (or instead of it, if ``replaceable``)."""

    name: str
    after: int
    channels: int
    stride: int
    replaceable: bool
    backbone: bool

    def feature_hw(self, imgsz: int | tuple[int, int]) -> tuple[int, int]:
        """Feature-map size the slot sees for an input of ``imgsz`` pixels (square int or (h, w))."""
        h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.replaceable else ("insert",)


@dataclass(frozen=True)
class Placement:
    """One attention layer of a candidate: which module goes at which slot, how, with which arguments."""

    slot: str
    module: str
    mode: str = "insert"
    hparams: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        args = " ".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in self.hparams)
        return f"{self.slot}:{self.module}" + ("(replace)" if self.mode == "replace" else "") + (f" {args}" if args else "")


def find_slots(base: Base) -> tuple[Slot, ...]:
    """Slots derived from the graph: backbone stage outputs at stride >= 8 and the layers feeding Detect.

    A backbone layer is a stage output when it keeps the stride of its input (a C2f/C3k2/SPPF/C2PSA block,
    not a downsampling Conv). Each slot may *replace* its layer when that layer has a single input with the
    same channel count.
    """
    layers = base.layers
    detect_row = base.rows()[-1]
    feeds_head = {_absolute(len(layers) - 1, f) for f in as_list(detect_row[0])}
    slots: list[Slot] = []
    taken: set[str] = set()
    for info in layers[:-1]:
        if info.backbone:
            src = layers[info.index - 1] if info.index > 0 else None
            is_stage = src is not None and info.stride >= 8 and src.stride == info.stride
            if not is_stage:
                continue
            prefix = "P"
        elif info.index in feeds_head:
            prefix = "N"
        else:
            continue
        level = int(round(math.log2(info.stride)))
        name = f"{prefix}{level}"
        if name in taken:
            name = f"{name}_{info.type.lower()}"
        taken.add(name)
        slots.append(Slot(name, info.index, info.channels, info.stride,
                          replaceable=info.in_channels == info.channels, backbone=info.backbone))
    return tuple(slots)


def slot_by_name(slots: tuple[Slot, ...], name: str) -> Slot:
    for slot in slots:
        if slot.name == name:
            return slot
    raise SpaceError(f"no slot named {name!r} in this base; its slots are {', '.join(s.name for s in slots)}")


def attention_row_args(module: str, channels: int, hparams: Mapping[str, Any]) -> list:
    """Positional YAML args of an attention layer: the scaled channel count, then every argument up to the
    last searchable one, defaults filled in, so equal layers always get equal rows."""
    spec = modules.get_spec(module)
    params = list(inspect.signature(spec.layer.__init__).parameters.values())[2:]  # skip self, c1
    searchable = [hp.name for hp in spec.hparams]
    for name in hparams:
        spec.hparam(name)
    last = max((i for i, p in enumerate(params) if p.name in searchable), default=-1)
    return [channels] + [_plain(hparams.get(p.name, p.default)) for p in params[: last + 1]]


def mutate(base: Base, placements: Mapping[str, Placement],
           slots: tuple[Slot, ...] | None = None) -> tuple[dict, dict[int, int]]:
    """The base YAML dict with attention layers inserted after / swapped in at their slots, and where each kept
    base layer went (old index -> new index; replaced layers are absent). Weight inheritance uses that map.

    Every reference is renumbered: consumers of a slot's layer (relative ``-1``, absolute indices, Concat lists,
    the Detect list) now read the attention layer, so the network equals the base plus the new layers.
    """
    slots = slots or find_slots(base)
    by_layer: dict[int, tuple[Slot, Placement]] = {}
    for name, placement in placements.items():
        slot = slot_by_name(slots, name)
        if placement.mode not in slot.modes:
            raise SpaceError(f"slot {name} cannot be {placement.mode!r}d (its block changes the channel count); "
                             f"allowed: {', '.join(slot.modes)}")
        by_layer[slot.after] = (slot, placement)

    rows = base.rows()
    new_rows: list[list] = []
    new_index: dict[int, int] = {}  # old layer -> the new layer whose output its consumers read
    kept: dict[int, int] = {}  # old layer -> its own new position
    n_backbone = 0
    for i, (f, n, m, args) in enumerate(rows):
        targets = [_remap(new_index, _absolute(i, x)) for x in as_list(f)]
        here = len(new_rows)
        hit = by_layer.get(i)
        if hit and hit[1].mode == "replace":
            slot, p = hit
            new_rows.append([_reference(f, targets, here), 1, p.module, attention_row_args(p.module, slot.channels, dict(p.hparams))])
        else:
            kept[i] = here
            new_rows.append([_reference(f, targets, here), n, m, args])
            if hit:
                slot, p = hit
                new_rows.append([-1, 1, p.module, attention_row_args(p.module, slot.channels, dict(p.hparams))])
        new_index[i] = len(new_rows) - 1
        if i < base.n_backbone:
            n_backbone = len(new_rows)

    out = {k: v for k, v in base.yaml.items() if k not in ("backbone", "head")}
    out["backbone"], out["head"] = new_rows[:n_backbone], new_rows[n_backbone:]
    return out, kept


def absolute_rows(data: dict) -> list[list]:
    """All rows with every ``from`` as absolute layer indices (lists kept as lists)."""
    rows = data["backbone"] + data["head"]
    return [[[_absolute(i, x) for x in f] if isinstance(f, list) else _absolute(i, f), n, m, a]
            for i, (f, n, m, a) in enumerate(rows)]


def _remap(new_index: dict[int, int], source: int) -> int:
    return source if source < 0 else new_index[source]  # -1 of layer 0 is the input image


def _absolute(i: int, f: int) -> int:
    return i + f if f < 0 else f


def as_list(value: Any) -> list:
    """One value or a list/tuple of them as a list: a YAML ``from`` field (``-1`` or ``[-1, 6]``), a setting."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _reference(original: int | list[int], targets: list[int], here: int) -> int | list[int]:
    """Write new targets in the style of the original: negative stays relative, non-negative stays absolute."""
    styled = [t - here if o < 0 else t for o, t in zip(as_list(original), targets)]
    return styled if isinstance(original, list) else styled[0]


def _plain(value: Any) -> Any:
    """YAML-friendly value: tuples (e.g. kernel sizes) become lists."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
