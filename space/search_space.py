"""The search space over a base: which slots, modules, modes and hyper-parameter values; Optuna sampling."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

import modules
from modules.registry import freeze

from .base import Base
from .candidate import Candidate, make_candidate
from .errors import SpaceError, first_line
from .graph import MODES, Placement, Slot, as_list, find_slots

NONE = "none"  # the placement with no attention layer: the base itself


@dataclass(frozen=True)
class SpaceConfig:
    """What a user may restrict (a space YAML file); every field left out means "everything the base allows".

    ``modules`` maps a module name to ``{hyper-parameter: [values]}`` (an empty mapping keeps all its choices).
    ``imgsz`` is the deployment input size that decides which values fit a slot's feature map.
    """

    slots: tuple[str, ...] | None = None
    modules: dict[str, dict[str, tuple]] | None = None
    modes: tuple[str, ...] = MODES
    min_layers: int = 0
    max_layers: int = 3
    imgsz: int = 640

    @classmethod
    def load(cls, path: str | Path | None) -> "SpaceConfig":
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise SpaceError(f"space file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SpaceError(f"space file {path}: not valid YAML ({first_line(err)})") from None
        if not isinstance(raw, dict):
            raise SpaceError(f"space file {path}: expected a mapping of settings")
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "space") -> "SpaceConfig":
        known = {"slots", "modules", "modes", "min_layers", "max_layers", "imgsz"}
        unknown = set(raw) - known
        if unknown:
            raise SpaceError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        mods = raw.get("modules")
        if isinstance(mods, list):
            mods = {m: {} for m in mods}
        if mods is not None and not isinstance(mods, dict):
            raise SpaceError(f"{where}: 'modules' must be a list of names or a mapping name -> {{hparam: [values]}}")
        parsed_mods = None
        if mods is not None:
            parsed_mods = {}
            for name, hps in mods.items():
                if not isinstance(hps, dict | None):
                    raise SpaceError(f"{where}: modules.{name} must map hyper-parameters to lists of values")
                parsed_mods[name] = {k: freeze(as_list(v)) for k, v in (hps or {}).items()}
        modes = tuple(as_list(raw.get("modes", MODES)))
        bad_modes = set(modes) - set(MODES)
        if bad_modes or not modes:
            raise SpaceError(f"{where}: modes must be a non-empty subset of {list(MODES)}, got {list(modes)}")
        config = cls(
            slots=tuple(as_list(raw["slots"])) if raw.get("slots") is not None else None,
            modules=parsed_mods,
            modes=modes,
            min_layers=int(raw.get("min_layers", 0)),
            max_layers=int(raw.get("max_layers", 3)),
            imgsz=int(raw.get("imgsz", 640)),
        )
        if not 0 <= config.min_layers <= config.max_layers:
            raise SpaceError(f"{where}: need 0 <= min_layers <= max_layers, got {config.min_layers}..{config.max_layers}")
        return config


@dataclass(frozen=True)
class SearchSpace:
    """A base and, per slot, the modules, modes and hyper-parameter values a candidate may use there."""

    base: Base
    config: SpaceConfig
    slots: tuple[Slot, ...]
    options: dict[str, dict[str, dict[str, tuple]]] = field(repr=False)  # slot -> module -> hparam -> values
    placements: tuple[str, ...] = field(repr=False)  # "none", "P3", "P3+N4", ...

    def modes(self, slot: Slot) -> tuple[str, ...]:
        return tuple(m for m in slot.modes if m in self.config.modes)

    def size(self) -> int:
        """Number of distinct candidates in the space (the base counts once when 0 layers are allowed)."""
        per_slot = {s.name: len(self.modes(s)) * sum(math.prod(len(v) for v in hps.values())
                                                      for hps in self.options[s.name].values())
                    for s in self.slots}
        return sum(math.prod(per_slot[n] for n in p.split("+")) if p != NONE else 1 for p in self.placements)

    def suggest(self, trial: optuna.Trial) -> Candidate:
        """Ask ``trial`` for one candidate. Parameter names read well in optuna-dashboard: ``placement``,
        ``P4.module``, ``P4.mode``, ``P4.STA.stoken_size``. A combination that the layer itself refuses
        prunes the trial, with the reason in its ``invalid_reason`` user attribute."""
        placement = trial.suggest_categorical("placement", self.placements)
        chosen: dict[str, Placement] = {}
        for name in ([] if placement == NONE else placement.split("+")):
            slot = next(s for s in self.slots if s.name == name)
            module = trial.suggest_categorical(f"{name}.module", tuple(self.options[name]))
            modes = self.modes(slot)
            mode = trial.suggest_categorical(f"{name}.mode", modes) if len(modes) > 1 else modes[0]
            hparams = {}
            for hp, values in self.options[name][module].items():
                encoded = [encode(v) for v in values]
                pick = trial.suggest_categorical(f"{name}.{module}.{hp}", encoded) if len(values) > 1 else encoded[0]
                hparams[hp] = values[encoded.index(pick)]
            chosen[name] = Placement(name, module, mode, tuple(sorted(hparams.items())))
        try:
            return make_candidate(self.base, chosen)
        except ValueError as err:
            trial.set_user_attr("invalid_reason", str(err))
            raise optuna.TrialPruned(f"invalid candidate: {err}") from None


def build_space(base: Base, config: SpaceConfig | None = None) -> SearchSpace:
    """Resolve ``config`` against ``base``: unknown slots, modules, hyper-parameters or values are errors."""
    config = config or SpaceConfig()
    all_slots = find_slots(base)
    names = [s.name for s in all_slots]
    if config.slots is not None:
        missing = [n for n in config.slots if n not in names]
        if missing:
            raise SpaceError(f"slot(s) {missing} do not exist in {base.name}; its slots are {', '.join(names)}")
    slots = tuple(s for s in all_slots if config.slots is None or s.name in config.slots)
    wanted = config.modules if config.modules is not None else {name: {} for name in modules.names()}
    specs = {}
    for name in wanted:
        try:
            specs[name] = modules.get_spec(name)
        except ValueError as err:
            raise SpaceError(f"space: {err}") from None
    for name, restricted in wanted.items():
        for hp, values in restricted.items():
            try:
                specs[name].hparam(hp)
            except ValueError as err:
                raise SpaceError(f"space: {err}") from None
            for v in values:
                if all(specs[name].reject(s.channels, None, hp, v) for s in slots):
                    reason = specs[name].reject(slots[0].channels, None, hp, v) if slots else "no slots"
                    raise SpaceError(f"space: {name}.{hp}={v!r} is not allowed at any slot ({reason})")
    options: dict[str, dict[str, dict[str, tuple]]] = {}
    for slot in slots:
        hw = slot.feature_hw(config.imgsz)
        per_module = {}
        for name, spec in specs.items():
            valid = {}
            for hp in spec.hparams:
                values = wanted[name].get(hp.name, hp.choices)
                valid[hp.name] = tuple(v for v in values if spec.reject(slot.channels, hw, hp.name, v) is None)
            if all(valid.values()):
                per_module[name] = valid
        if per_module:
            options[slot.name] = per_module
    slots = tuple(s for s in slots if s.name in options)
    if config.max_layers > 0 and not slots:
        raise SpaceError("space: no slot can hold any of the chosen modules")
    max_layers = min(config.max_layers, len(slots))
    if config.min_layers > max_layers:
        raise SpaceError(f"space: min_layers={config.min_layers} but only {len(slots)} usable slot(s)")
    placements = tuple(
        "+".join(s.name for s in combo) if combo else NONE
        for k in range(config.min_layers, max_layers + 1)
        for combo in itertools.combinations(slots, k)
    )
    return SearchSpace(base, config, slots, options, placements)


def encode(value: Any) -> Any:
    """Optuna categorical choices must be plain scalars: tuples become "5-5-5-5"."""
    return "-".join(str(v) for v in value) if isinstance(value, tuple) else value

