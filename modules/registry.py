"""Names of the attention layers, their searchable hyper-parameters and the rules that bind them.

Each module file declares one :class:`ModuleSpec` next to its YOLO layer and the package registers it with
:func:`add_family`. A spec is plain data that ``space/`` reads to know what it may suggest for a layer of ``c1``
channels on an ``(h, w)`` feature map; the layer itself calls :func:`check_hparams` with the same rules, so a
YAML row and a search choice are validated by one piece of code. The small ``reason``-returning checks below
(:func:`positive_int`, :func:`divisor_of`, :func:`width_ratio`, :func:`probability`, :func:`int_tuple`) are
the building blocks every family's ``reject`` uses.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

# reject(c1, hw, name, value) -> why `value` is impossible for argument `name`, or None when it is fine.
# `hw` is the feature-map size the layer will see at deployment, or None when unknown (at construction).
RejectFn = Callable[[int, "tuple[int, int] | None", str, Any], "str | None"]


@dataclass(frozen=True)
class HParam:
    """One searchable constructor argument of a YOLO attention layer.

    ``choices`` are the values a search may pick (tuples for list-valued arguments such as kernels);
    ``default`` is what the layer uses when the argument is left out.
    """

    name: str
    choices: tuple[Any, ...]
    default: Any
    doc: str = ""


@dataclass(frozen=True)
class ModuleSpec:
    """A YOLO attention layer found by name: its class, searchable arguments and their constraints.

    ``name`` is the name YAML rows use and must equal the layer's class name (Ultralytics resolves rows by
    class name).
    """

    name: str
    layer: type[nn.Module]
    hparams: tuple[HParam, ...]
    reject: RejectFn
    doc: str = ""

    def hparam(self, name: str) -> HParam:
        for hp in self.hparams:
            if hp.name == name:
                return hp
        known = ", ".join(hp.name for hp in self.hparams)
        raise ValueError(f"{self.name} has no hyper-parameter {name!r}; searchable ones: {known}")

    def choices_for(self, c1: int, hw: tuple[int, int] | None = None) -> dict[str, tuple[Any, ...]]:
        """The search choices of every hyper-parameter that are valid at ``c1`` channels and map size ``hw``."""
        return {hp.name: tuple(v for v in hp.choices if self.reject(c1, hw, hp.name, v) is None) for hp in self.hparams}

    def check(self, c1: int, hw: tuple[int, int] | None = None, **hparams: Any) -> None:
        """Raise ``ValueError`` naming the first argument that is impossible at ``c1`` channels / size ``hw``."""
        for name in hparams:
            self.hparam(name)  # unknown argument names are an error too
        check_hparams(self.name, self.reject, c1, hw, hparams)


# ---------------------------------------------------------------------------------------------------------------
# The registry: explicit, filled by modules/__init__.py (built-in families) and by add_family callers.

_SPECS: dict[str, ModuleSpec] = {}


def add_family(spec: ModuleSpec) -> ModuleSpec:
    """Register an attention family so the space can place it and :func:`modules.register` binds it.

    Adding the same spec again is a no-op; another spec under a taken name is refused. Returns ``spec``.
    """
    if not isinstance(spec, ModuleSpec):
        raise TypeError(f"add_family takes a ModuleSpec, got {type(spec).__name__}")
    if spec.name != spec.layer.__name__:
        raise ValueError(f"ModuleSpec name {spec.name!r} must equal its layer's class name {spec.layer.__name__!r}")
    known = _SPECS.get(spec.name)
    if known is not None and known is not spec:
        raise ValueError(f"an attention module named {spec.name!r} is already registered ({known.layer.__module__})")
    _SPECS[spec.name] = spec
    return spec


def remove_family(name: str) -> ModuleSpec:
    """Unregister family ``name`` (e.g. a test's own family) and unbind it from Ultralytics if it was bound."""
    spec = get_spec(name)
    del _SPECS[name]
    tasks = sys.modules.get("ultralytics.nn.tasks")  # only bound if register() ran, which imported it
    if tasks is not None and getattr(tasks, name, None) is spec.layer:
        delattr(tasks, name)
    return spec


def specs() -> dict[str, ModuleSpec]:
    """All registered layers by name, in registration order."""
    return dict(_SPECS)


def names() -> tuple[str, ...]:
    return tuple(_SPECS)


def get_spec(name: str) -> ModuleSpec:
    """The spec of layer ``name``; raises ``ValueError`` listing the known names if there is none."""
    if name not in _SPECS:
        raise ValueError(f"unknown attention module {name!r}; known modules: {', '.join(_SPECS)}")
    return _SPECS[name]


# ---------------------------------------------------------------------------------------------------------------
# Argument checks shared by the families' `reject` functions: each returns why a value is impossible, or None.


def check_hparams(layer: str, reject: RejectFn, c1: int, hw: tuple[int, int] | None, hparams: dict[str, Any]) -> None:
    """Raise ``ValueError("<layer>: <arg>=<value> ...")`` for the first value ``reject`` refuses."""
    if not is_int(c1) or c1 < 1:
        raise ValueError(f"{layer}: c1 (input channels) must be a positive int, got {c1!r}")
    for name, value in hparams.items():
        reason = reject(c1, hw, name, value)
        if reason is not None:
            raise ValueError(f"{layer}: {name}={value!r} is impossible with c1={c1}: {reason}")


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (YAML ``true`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _meaning(what: str) -> str:
    return f" ({what})" if what else ""


def positive_int(value: Any, what: str = "") -> str | None:
    """Why ``value`` is not an int >= 1; ``what`` says what the argument means, for the message."""
    return None if is_int(value) and value >= 1 else f"must be a positive int{_meaning(what)}"


def divisor_of(c1: int, value: Any, choices: tuple[int, ...], what: str = "", why: str = "") -> str | None:
    """Why ``value`` is not a positive int dividing ``c1``; the message lists which of ``choices`` would.

    ``what`` explains the argument (in the not-an-int message), ``why`` why it must divide c1.
    """
    reason = positive_int(value, what)
    if reason is None and c1 % value:
        return f"must divide c1{_meaning(why)}; {divisors_message(c1, choices)}"
    return reason


def width_ratio(c1: int, value: Any, what: str = "hidden width") -> str | None:
    """Why ``value`` is not a ratio > 0 that leaves ``int(c1 * value) >= 1`` channels of ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return f"must be a positive number ({what} = int(c1 * ratio)), e.g. 2 or 4"
    if int(c1 * value) < 1:
        return f"{what} = int({c1} * {value}) = 0; the ratio must be >= {1 / c1:.3g}"
    return None


def probability(value: Any) -> str | None:
    """Why ``value`` is not a probability in [0, 1) (dropout and drop-path rates)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value < 1.0
    return None if ok else "must be a probability in [0, 1)"


def int_tuple(value: Any, length: int | None = None, odd: bool = False, example: str = "") -> str | None:
    """Why ``value`` is not a tuple/list of positive ints (``length`` of them when given; all odd when ``odd``)."""
    count = f"a tuple of {length} " if length else "a non-empty tuple of "
    kind = f"{count}{'odd ' if odd else ''}positive ints{_meaning(example)}"
    if not isinstance(value, (tuple, list)) or not value or (length is not None and len(value) != length):
        return f"must be {kind}"
    bad = [v for v in value if not is_int(v) or v < 1 or (odd and v % 2 == 0)]
    return f"must be {kind}; {bad} are not" if bad else None


def divisors_message(c1: int, candidates: tuple[int, ...]) -> str:
    """A hint listing the candidate values that divide ``c1``, for error messages."""
    ok = [c for c in candidates if c1 % c == 0]
    return f"valid values that divide {c1}: {ok}" if ok else f"none of {list(candidates)} divides {c1}"


def freeze(value: Any) -> Any:
    """Lists (as YAML gives them) become tuples, recursively, so they equal and hash like the specs' choices."""
    return tuple(freeze(v) for v in value) if isinstance(value, (list, tuple)) else value
