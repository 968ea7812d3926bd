"""Known-answer objectives over the real search space: seeded random functions of a candidate's placements.

A family of differently shaped generators (``FAMILY``), so a search strategy is judged on shapes it was not tuned
on. Each maps a :class:`space.Candidate` to (mAP, latency in ms); every effect is drawn lazily from its own key
(seed, kind, slot, module, ...), so it does not depend on which candidates were evaluated, and every generator
seed draws its own effect sizes from the ranges below (one per seed, from the seed alone).

Latency is shared by all: 10 ms plus, per layer, a slot×module cost ~ lognormal(log c, 0.7) with c in [0.8, 2.5]
per seed, a mode term ~ N(0, 0.2) and |N(0, 0.25)| per hyper-parameter value. The mAP of the base is 0.50 plus:

1. ``additive``: per layer a slot×module effect ~ N(0, s), s in [0.006, 0.02]; slot×module×mode ~ N(0, s m),
   m in [0.2, 0.5]; slot×module×value ~ N(0, s h), h in [0.2, 0.5]; per pair of placed slots ~ N(0, s p),
   p in [0.3, 0.8] (the generator the default strategy was developed on, with the sizes it had fixed: s 0.012,
   m h 1/3, p 2/3).
2. ``mode``: insert vs replace matters more than the module: per slot×mode ~ N(mu, s), s in [0.015, 0.04], with a
   shift mu ~ N(0, 0.01) per seed for replace; slot×module ~ N(0, s r), r in [0.1, 0.3]; values ~ N(0, s r / 2).
3. ``interaction``: pairs of slots matter more than single slots: per slot pair ~ N(q, s), s in [0.01, 0.025],
   q in [0.2, 0.6] x s; per layer ~ N(0, s r), r in [0.1, 0.3]; a 4th or later layer costs 2 s each, so the best
   candidates use 2-3 layers (spaces allowing them).
4. ``sparse``: one slot×module×value (drawn per seed among the space's) adds g in [0.03, 0.08], its slot×module
   without that value g / 2; everything else ~ N(0, e), e in [0.0005, 0.002].
5. ``costly``: gains grow with latency: a layer's effect is k x cost^gamma + N(0, e), k in [0.002, 0.006] per ms,
   gamma in [0.8, 1.5], e in [0.001, 0.004]; the front is long and the best mAP needs the dearest candidates.

``noisy=True`` adds evaluation noise ~ N(0, sd) to the mAP a search sees, sd = the median |single-layer effect|
over the space's slot×module×mode×value genes (the proxy's situation: seed sd comparable to the effects); regret
is scored on the noise-free values (:meth:`Generator.true`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from space import Candidate, Placement, SearchSpace
from space.search_space import encode

BASE_MAP, BASE_LATENCY = 0.50, 10.0
FAMILY = ("additive", "mode", "interaction", "sparse", "costly")


class Generator:
    """One generator seed of one shape: ``true(candidate)`` the noise-free (mAP, latency), ``__call__`` what a
    search sees (with noise when ``noisy``; the noise of the n-th evaluation is drawn from (seed, n))."""

    def __init__(self, shape: str, seed: int, space: SearchSpace, noisy: bool = False) -> None:
        if shape not in FAMILY:
            raise ValueError(f"unknown generator {shape!r}; known: {', '.join(FAMILY)}")
        self.shape, self.seed, self.space, self.noisy = shape, seed, space, noisy
        size = np.random.default_rng(zlib.crc32(repr(("sizes", shape, seed)).encode()))
        self.cost_scale = size.uniform(0.8, 2.5)
        self.s = {"additive": (0.006, 0.02), "mode": (0.015, 0.04), "interaction": (0.01, 0.025),
                  "sparse": (0.03, 0.08), "costly": (0.002, 0.006)}[shape]
        self.s = size.uniform(*self.s)  # the main effect size (sparse: the needle's gain; costly: k)
        self.m, self.h, self.p = size.uniform(0.2, 0.5), size.uniform(0.2, 0.5), size.uniform(0.3, 0.8)
        self.r, self.q = size.uniform(0.1, 0.3), size.uniform(0.2, 0.6)
        self.mu = size.normal(0.0, 0.01)
        self.e = size.uniform(0.0005, 0.002) if shape == "sparse" else size.uniform(0.001, 0.004)
        self.gamma = size.uniform(0.8, 1.5)
        genes = list(_genes(space))
        needles = [(slot, module, pair) for slot, module, _, hps in genes for pair in (hps or (None,))]
        self.needle = needles[int(size.integers(len(needles)))] if shape == "sparse" else None
        self.noise_sd = float(np.median([abs(self._layer_map(*g)) for g in genes])) if noisy else 0.0
        self.evaluations = 0

    # -- drawing ----------------------------------------------------------------------------------------------------
    def _draw(self, *key) -> np.random.Generator:
        return np.random.default_rng(zlib.crc32(repr((self.shape, self.seed, *key)).encode()))

    def _normal(self, sd: float, *key, mean: float = 0.0) -> float:
        return float(self._draw(*key).normal(mean, sd))

    def _cost(self, slot: str, module: str) -> float:
        return float(self._draw("cost", slot, module).lognormal(np.log(self.cost_scale), 0.7))

    # -- the objective ------------------------------------------------------------------------------------------------
    def _layer_map(self, slot: str, module: str, mode: str, hparams: tuple) -> float:
        """The mAP effect of one layer on its own."""
        s = self.s
        if self.shape == "additive":
            m = self._normal(s, "module", slot, module) + self._normal(s * self.m, "mode", slot, module, mode)
            return m + sum(self._normal(s * self.h, "hp", slot, module, hp, v) for hp, v in hparams)
        if self.shape == "mode":
            m = self._normal(s, "mode", slot, mode, mean=self.mu if mode == "replace" else 0.0)
            m += self._normal(s * self.r, "module", slot, module)
            return m + sum(self._normal(s * self.r / 2, "hp", slot, module, hp, v) for hp, v in hparams)
        if self.shape == "interaction":
            return self._normal(s * self.r, "module", slot, module, mode)
        if self.shape == "sparse":
            m = self._normal(self.e, "module", slot, module, mode)
            needle_slot, needle_module, needle_value = self.needle
            if (slot, module) == (needle_slot, needle_module):
                m += s if needle_value is None or needle_value in hparams else s / 2
            return m
        cost = self._cost(slot, module)  # costly
        return self.s * cost ** self.gamma + self._normal(self.e, "module", slot, module, mode, hparams)

    def true(self, candidate: Candidate) -> tuple[float, float]:
        """The noise-free (mAP, latency) of ``candidate``."""
        m, lat = BASE_MAP, BASE_LATENCY
        layers = [(p.slot, p.module, p.mode, tuple((k, encode(v)) for k, v in p.hparams)) for p in candidate.placements]
        for slot, module, mode, hparams in layers:
            m += self._layer_map(slot, module, mode, hparams)
            lat += self._cost(slot, module) + self._normal(0.2, "mode-cost", slot, module, mode)
            lat += sum(abs(self._normal(0.25, "hp-cost", slot, module, hp, v)) for hp, v in hparams)
        slots = sorted(p.slot for p in candidate.placements)
        for i, a in enumerate(slots):
            for b in slots[i + 1:]:
                if self.shape == "additive":
                    m += self._normal(self.s * self.p, "pair", a, b)
                elif self.shape == "interaction":
                    m += self._normal(self.s, "pair", a, b, mean=self.q * self.s)
        if self.shape == "interaction":
            m -= 2 * self.s * max(0, len(slots) - 3)
        return float(m), float(max(lat, 1.0))

    def __call__(self, candidate: Candidate) -> tuple[float, float]:
        m, lat = self.true(candidate)
        if self.noisy:
            m += float(self._draw("noise", self.evaluations).normal(0.0, self.noise_sd))
            self.evaluations += 1
        return m, lat


def _genes(space: SearchSpace):
    """Every (slot, module, mode, hparams) one layer of the space can be, hyper-parameters one value at a time
    (the others at their first value)."""
    for slot in space.slots:
        for module, hps in space.options[slot.name].items():
            for mode in space.modes(slot):
                first = tuple((hp, encode(values[0])) for hp, values in hps.items())
                yield slot.name, module, mode, first
                for i, (hp, values) in enumerate(hps.items()):
                    for v in values[1:]:
                        yield slot.name, module, mode, first[:i] + ((hp, encode(v)),) + first[i + 1:]


@dataclass(frozen=True)
class Cell:
    """One row of the family table: a generator shape, with or without noise."""

    shape: str
    noisy: bool

    @property
    def label(self) -> str:
        return f"{self.shape}{'+noise' if self.noisy else ''}"


CELLS = tuple(Cell(shape, noisy) for noisy in (False, True) for shape in FAMILY)
__all__ = ["BASE_LATENCY", "BASE_MAP", "CELLS", "Cell", "FAMILY", "Generator", "Placement"]
