"""Attention layers for Ultralytics YOLO: STA, CoT, CGA, DualViT, GMA.

Every layer maps ``B×C×H×W -> B×C×H×W`` and takes the input channel count as its first argument, so a
model YAML row reads ``[-1, 1, STA, [256]]``. Call :func:`register` once per process (it is idempotent)
before building such a YAML with ``ultralytics.YOLO``.

A family is one file defining its layer and a ``SPEC`` (:class:`ModuleSpec`); the built-in ones are listed
in ``_BUILT_IN`` below, and code outside the package adds its own with :func:`add_family`.

>>> import modules
>>> modules.register()
>>> modules.get_spec("STA").choices_for(256)["num_heads"]
(1, 2, 4, 8)
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
import yaml

from .common import residual_gates
from .registry import HParam, ModuleSpec, add_family, check_hparams, get_spec, names, remove_family, specs

__all__ = [
    "HParam", "ModuleSpec", "add_family", "check_hparams", "get_spec", "names", "register", "remove_family", "residual_gates", "specs",
]

# One file per attention family, each defining SPEC next to its YOLO layer: a new family is one name here.
_BUILT_IN = ("sta", "cot", "cga", "dualvit", "gma")

for _family in _BUILT_IN:
    add_family(importlib.import_module(f"{__name__}.{_family}").SPEC)

_bound: set[str] = set()  # names register() has bound in Ultralytics (it may rebind those, and only those)


def register() -> None:
    """Make Ultralytics' YAML parser and checkpoint loader resolve every registered layer. Safe to call repeatedly.

    ``parse_model`` looks a YAML module name up in the globals of ``ultralytics.nn.tasks``, so the layers are
    bound there (Ultralytics' files are not edited). They are also allow-listed for ``torch.load(weights_only=True)``
    so checkpoints load under Ultralytics' restricted loading. Call it in every process that builds or loads a
    model (Ray workers, subprocesses): registration is per process, and again after :func:`add_family`.
    """
    import ultralytics.nn.tasks as tasks

    for spec in specs().values():
        bound = getattr(tasks, spec.name, None)
        ours = spec.name in _bound or getattr(bound, "__module__", None) == spec.layer.__module__  # e.g. a reload
        if bound is not None and not ours:
            # Binding would silently change what every YAML row of that Ultralytics module builds.
            raise ValueError(f"attention module {spec.name!r} would shadow Ultralytics' own {spec.name}; rename it")
        setattr(tasks, spec.name, spec.layer)
        _bound.add(spec.name)
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
    """Every ``nn.Module`` class defined in a registered family's file, and the shared blocks of ``common``."""
    files = {importlib.import_module(f"{__name__}.common")}
    files |= {sys.modules[spec.layer.__module__] for spec in specs().values()}
    return [
        obj
        for mod in files
        for obj in vars(mod).values()
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == mod.__name__
    ]
