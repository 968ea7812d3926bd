"""Ready-to-train Ultralytics checkpoints of front candidates: what a user trains after a search.

``<name>.pt`` is the candidate with the study's base weights mapped in through the renumbering (each kept base layer
``i`` at its candidate index ``j``; Ultralytics' own ``YOLO(yaml).load(pt)`` matches tensors by layer index and so
drops every layer after an insertion). ``<name>-tuned.pt`` is the candidate's own top-rung training, where one was
kept (``--save-weights``). Both load with a plain ``YOLO(path)`` once ``modules.register()`` has run, and
``YOLO(path).train(data=..., epochs=...)`` trains on from them.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

import modules
from space import Inheritance, inherit

from ..training.weights import write_atomically


def mapped_checkpoint(yaml_text: str, base_layers: Iterable[tuple[int, int]], base_state: dict | None,
                      names: dict[int, str], train_args: dict[str, Any],
                      skip: Iterable[str] = ()) -> tuple[bytes, Inheritance | None]:
    """The candidate of ``yaml_text`` built for ``len(names)`` classes, ``base_state`` (a base state dict; None:
    fresh weights) copied in along ``base_layers``, as the bytes of an Ultralytics checkpoint. ``train_args`` are
    the defaults a ``YOLO(path)`` keeps (data, imgsz)."""
    from ultralytics import YOLO

    modules.register()
    data = yaml.safe_load(yaml_text)
    data["nc"] = len(names)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        model = YOLO(str(path), task="detect", verbose=False)
    inherited = inherit(model.model, base_layers, base_state, skip) if base_state is not None else None
    model.model.names = dict(names)
    model.ckpt = {"train_args": {"task": "detect", **train_args}}
    buffer = io.BytesIO()
    model.save(buffer)  # Ultralytics' own checkpoint layout (fp16 module, date, version)
    return buffer.getvalue(), inherited


def write_mapped(target: Path, *args, **kwargs) -> Inheritance | None:
    """:func:`mapped_checkpoint` written to ``target`` (whole or not at all)."""
    blob, inherited = mapped_checkpoint(*args, **kwargs)
    write_atomically(target, lambda tmp: tmp.write_bytes(blob))
    return inherited


def write_tuned(last: Path, target: Path) -> bool:
    """The training checkpoint ``last`` without its optimizer (Ultralytics' ``strip_optimizer``) as ``target``;
    False when ``last`` is not a readable Ultralytics checkpoint."""
    from ultralytics.utils.torch_utils import strip_optimizer

    written: dict = {}

    def strip(tmp: Path) -> None:
        written.update(strip_optimizer(str(last), str(tmp)))
        if not written:
            raise _NotACheckpoint

    try:
        write_atomically(target, strip)
    except _NotACheckpoint:
        return False
    return True


class _NotACheckpoint(Exception):
    pass
