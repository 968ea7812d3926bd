"""Names of the attention layers, their searchable hyper-parameters and the rules that bind them.

Each module file declares one :class:`ModuleSpec` next to its YOLO layer. A spec is plain data that
``space/`` reads to know what it may suggest for a layer of ``c1`` channels on an ``(h, w)`` feature map;
the layer itself calls :func:`check_hparams` with the same rules, so a YAML row and a search choice are
validated by one piece of code.
"""

from __future__ import annotations

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
    """A YOLO attention layer found by name: its class, searchable arguments and their constraints."""

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


def check_hparams(layer: str, reject: RejectFn, c1: int, hw: tuple[int, int] | None, hparams: dict[str, Any]) -> None:
    """Raise ``ValueError("<layer>: <arg>=<value> ...")`` for the first value ``reject`` refuses."""
    if not isinstance(c1, int) or isinstance(c1, bool) or c1 < 1:
        raise ValueError(f"{layer}: c1 (input channels) must be a positive int, got {c1!r}")
    for name, value in hparams.items():
        reason = reject(c1, hw, name, value)
        if reason is not None:
            raise ValueError(f"{layer}: {name}={value!r} is impossible with c1={c1}: {reason}")


def divisors_message(c1: int, candidates: tuple[int, ...]) -> str:
    """A hint listing the candidate values that divide ``c1``, for error messages."""
    ok = [c for c in candidates if c1 % c == 0]
    return f"valid values that divide {c1}: {ok}" if ok else f"none of {list(candidates)} divides {c1}"
