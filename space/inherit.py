"""Weight inheritance: a candidate starts from a checkpoint of its base, layer by layer through the renumbering.

Each kept base layer ``i`` of a candidate lives at index ``j`` (``Candidate.base_layers``), so the checkpoint's
``model.i.*`` tensors become the candidate's ``model.j.*``. Inserted attention layers and replaced blocks start
fresh. A checkpoint of another base or scale is refused; one trained for another class count gives everything but
the class-prediction convolutions of the head (the usual transfer-learning case, reported as such).
:func:`align` recovers that mapping from two YAMLs alone (a candidate file met outside its study).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Iterable

import torch

import modules

from .errors import SpaceError
from .graph import absolute_rows

_KEY = re.compile(r"^model\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Inheritance:
    """What a candidate took from the checkpoint: tensors and parameters copied, and what was left fresh."""

    tensors: int
    params: int
    fresh_layers: tuple[int, ...]  # candidate layer indices that start from their own initialisation
    skipped_head_keys: tuple[str, ...]  # class-count mismatch: head tensors not copied

    def as_dict(self) -> dict:
        return {"inherited_tensors": self.tensors, "inherited_params": self.params,
                "fresh_layers": list(self.fresh_layers), "skipped_head_keys": list(self.skipped_head_keys)}


def check_checkpoint(base_state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], where: str) -> tuple[str, ...]:
    """Compare a checkpoint's state dict with a freshly built base of the same YAML (and data class count).

    Returns the head keys whose shapes differ only through the class count; raises ``SpaceError`` naming the
    first tensor that shows the checkpoint belongs to another base or scale.
    """
    missing = [k for k in reference if k not in base_state]
    if missing:
        raise SpaceError(f"{where} does not match the base: it has no {missing[0]!r} "
                         f"({len(missing)} tensors missing) — was it trained from another base YAML?")
    head = max(int(_KEY.match(k).group(1)) for k in reference if _KEY.match(k))
    class_keys = []
    for key, ref in reference.items():
        got = base_state[key]
        if got.shape == ref.shape:
            continue
        layer = int(_KEY.match(key).group(1)) if _KEY.match(key) else -1
        if layer == head and ".cv3." in key:  # Detect's class branch: its width follows the class count
            class_keys.append(key)
            continue
        raise SpaceError(f"{where} does not match the base: {key} has shape {tuple(got.shape)}, the base needs "
                         f"{tuple(ref.shape)} — was it trained from another base or scale?")
    return tuple(class_keys)


def inherit(model: torch.nn.Module, base_layers: Iterable[tuple[int, int]], base_state: dict[str, torch.Tensor],
            skip: Iterable[str] = ()) -> Inheritance:
    """Copy ``base_state`` (a base model's state dict) into ``model`` in place, base layer ``i`` into candidate
    layer ``j`` for each ``(i, j)`` of ``base_layers`` (``Candidate.base_layers``)."""
    to_new = dict(base_layers)
    skip = tuple(skip)
    target = model.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for key, value in base_state.items():
        match = _KEY.match(key)
        if not match or key in skip or int(match.group(1)) not in to_new:
            continue
        new_key = f"model.{to_new[int(match.group(1))]}.{match.group(2)}"
        if new_key in target and target[new_key].shape == value.shape:
            copied[new_key] = value
    model.load_state_dict(copied, strict=False)
    params = {n for n, _ in model.named_parameters()}
    n_layers = len(model.model)
    fresh = tuple(sorted(set(range(n_layers)) - set(to_new.values())))
    return Inheritance(
        tensors=len(copied),
        params=sum(v.numel() for k, v in copied.items() if k in params),
        fresh_layers=fresh,
        skipped_head_keys=tuple(skip),
    )


def align(base_yaml: dict, candidate_yaml: dict) -> tuple[tuple[int, int], ...]:
    """``(base index, candidate index)`` of every base layer the candidate kept, found from the two model YAMLs:
    the longest common run of rows equal in module, repeats and arguments (``from`` is renumbered by an insertion,
    so it is left out). An inserted layer matches no base row; a replaced block leaves its base row unmatched."""
    def signatures(rows: list[list]) -> list[str]:
        return [json.dumps([n, m, a], default=str) for _, n, m, a in rows]

    base_rows, candidate_rows = absolute_rows(base_yaml), absolute_rows(candidate_yaml)
    matcher = difflib.SequenceMatcher(None, signatures(base_rows), signatures(candidate_rows), autojunk=False)
    pairs = tuple((block.a + k, block.b + k) for block in matcher.get_matching_blocks() for k in range(block.size))
    # What a candidate may add: attention layers only, and it may drop no more base rows than it has of them.
    kept = {j for _, j in pairs}
    added = [row for j, row in enumerate(candidate_rows) if j not in kept]
    foreign = [row[2] for row in added if row[2] not in modules.names()]
    if foreign or len(base_rows) - len(pairs) > len(added):
        raise SpaceError(f"the candidate is not made from this base: it keeps {len(pairs)} of the base's "
                         f"{len(base_rows)} layers"
                         + (f" and adds {foreign[0]}, not an attention layer" if foreign else ""))
    return pairs
