"""Attention layers for Ultralytics YOLO: STA, CoT, CGA, DualViT, GMA.

Every layer maps ``B×C×H×W -> B×C×H×W`` and takes the input channel count as its first argument, so a
model YAML row reads ``[-1, 1, STA, [256]]``. Call :func:`register` once per process (it is idempotent)
before building such a YAML with ``ultralytics.YOLO``.

>>> import modules
>>> modules.register()
>>> modules.get_spec("STA").choices_for(256)["num_heads"]
(1, 2, 4, 8)
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import yaml

from .registry import HParam, ModuleSpec, check_hparams

__all__ = ["HParam", "ModuleSpec", "check_hparams", "get_spec", "names", "register", "specs"]

# One file per attention family; each defines SPEC (a ModuleSpec) next to its YOLO layer.
_FAMILIES = ("sta", "cot", "cga", "dualvit", "gma")


def specs() -> dict[str, ModuleSpec]:
    """All registered layers by name, in a fixed order."""
    found = {}
    for family in _FAMILIES:
        spec = importlib.import_module(f"{__name__}.{family}").SPEC
        found[spec.name] = spec
    return found


def names() -> tuple[str, ...]:
    return tuple(specs())


def get_spec(name: str) -> ModuleSpec:
    """The spec of layer ``name``; raises ``ValueError`` listing the known names if there is none."""
    known = specs()
    if name not in known:
        raise ValueError(f"unknown attention module {name!r}; known modules: {', '.join(known)}")
    return known[name]


def register() -> None:
    """Make Ultralytics' YAML parser and checkpoint loader resolve the layer names. Safe to call repeatedly.

    ``parse_model`` looks a YAML module name up in the globals of ``ultralytics.nn.tasks``, so the layers are
    bound there (Ultralytics' files are not edited). They are also allow-listed for ``torch.load(weights_only=True)``
    so checkpoints load under Ultralytics' restricted loading. Call it in every process that builds or loads a
    model (Ray workers, subprocesses): registration is per process.
    """
    import ultralytics.nn.tasks as tasks

    for spec in specs().values():
        setattr(tasks, spec.layer.__name__, spec.layer)
    if not getattr(tasks.guess_model_scale, "_attnas", False):
        tasks.guess_model_scale = _declared_scale_first(tasks.guess_model_scale)
    # A checkpoint pickles every submodule, so the core ops and helpers of each family are allow-listed too.
    torch.serialization.add_safe_globals(_module_classes())


def _declared_scale_first(guess):
    """Wrap Ultralytics' scale guess so a YAML's own ``scale:`` key wins over its file name.

    Ultralytics overwrites ``scale:`` with a letter guessed from the file name (``yolov8s...`` -> s) and builds
    the first listed scale when the name has none, so a ``scale: s`` YAML saved as ``trial-12.yaml`` would
    silently build another model. Bundled names (no file on disk) keep the original guess.
    """

    def guess_model_scale(model_path):
        path = Path(model_path)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                data = None
            if isinstance(data, dict) and data.get("scale") in (data.get("scales") or {}):
                return data["scale"]
        return guess(model_path)

    guess_model_scale._attnas = True
    return guess_model_scale


def _module_classes() -> list[type]:
    classes = []
    for family in ("common", *_FAMILIES):
        mod = importlib.import_module(f"{__name__}.{family}")
        classes += [
            obj
            for obj in vars(mod).values()
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == mod.__name__
        ]
    return classes
