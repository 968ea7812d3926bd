"""The per-slot encoding the evolution strategy works on: a candidate is a *genome* (slot -> :class:`Gene`), and
the moves between genomes (random draws, mutations, crossovers), always within what the space allows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from space import NONE, SearchSpace
from space.search_space import encode


@dataclass(frozen=True)
class Gene:
    """One slot's attention layer; hyper-parameter values in their encoded (Optuna choice) form."""

    module: str
    mode: str
    hparams: tuple[tuple[str, Any], ...]


Genome = dict  # slot name -> Gene, only placed slots


def genome_from_params(space: SearchSpace, params: dict[str, Any]) -> Genome | None:
    """Read a genome from a trial's parameters; None when they do not describe a candidate of this space."""
    placement = params.get("placement")
    if placement not in space.placements:
        return None
    genome: Genome = {}
    for name in ([] if placement == NONE else placement.split("+")):
        options = space.options[name]
        module = params.get(f"{name}.module", next(iter(options)) if len(options) == 1 else None)
        if module not in options:
            return None
        modes = slot_modes(space, name)
        mode = params.get(f"{name}.mode", modes[0]) if len(modes) > 1 else modes[0]
        hparams = []
        for hp, values in options[module].items():
            encoded = encoded_choices(values)
            value = params.get(f"{name}.{module}.{hp}") if len(values) > 1 else encoded[0]
            if value not in encoded:
                return None
            hparams.append((hp, value))
        genome[name] = Gene(module, mode, tuple(hparams))
    return genome


def params_from_genome(space: SearchSpace, genome: Genome) -> dict[str, Any]:
    """The parameters ``SearchSpace.suggest`` asks for this genome (single-valued choices are not asked)."""
    params: dict[str, Any] = {"placement": placement_of(space, genome)}
    for name in slot_names(space):
        gene = genome.get(name)
        if gene is None:
            continue
        params[f"{name}.module"] = gene.module
        if len(slot_modes(space, name)) > 1:
            params[f"{name}.mode"] = gene.mode
        for hp, value in gene.hparams:
            if len(space.options[name][gene.module][hp]) > 1:
                params[f"{name}.{gene.module}.{hp}"] = value
    return params


def placement_of(space: SearchSpace, genome: Genome) -> str:
    names = [n for n in slot_names(space) if n in genome]
    return "+".join(names) if names else NONE


def genome_key(genome: Genome) -> tuple:
    """A cheap identity for genomes (equal keys → equal networks; the canonical hash decides the rest)."""
    return tuple(sorted(genome.items()))


def random_gene(space: SearchSpace, slot: str, rng: np.random.Generator, module: str | None = None) -> Gene:
    options = space.options[slot]
    module = module if module is not None else _pick(rng, tuple(options))
    modes = slot_modes(space, slot)
    return Gene(module, _pick(rng, modes),
                tuple((hp, _pick(rng, encoded_choices(values))) for hp, values in options[module].items()))


def random_genome(space: SearchSpace, rng: np.random.Generator) -> Genome:
    """A draw with RandomSampler's distribution over ``SearchSpace.suggest`` (placement first, then per slot)."""
    placement = _pick(rng, space.placements)
    return {name: random_gene(space, name, rng) for name in ([] if placement == NONE else placement.split("+"))}


def mutate(space: SearchSpace, genome: Genome, rng: np.random.Generator) -> tuple[Genome, str] | None:
    """One per-slot change, chosen uniformly among those that apply; None if none applies."""
    placed = [n for n in slot_names(space) if n in genome]
    empty = [n for n in slot_names(space) if n not in genome]
    allowed = allowed_placements(space)
    ops = []
    for name in placed:
        gene = genome[name]
        for hp, value in gene.hparams:
            if len(space.options[name][gene.module][hp]) > 1:
                ops.append(("hparam", name, hp))
        if len(space.options[name]) > 1:
            ops.append(("module", name, None))
        if len(slot_modes(space, name)) > 1:
            ops.append(("mode", name, None))
        if placement_of(space, without(genome, name)) in allowed:
            ops.append(("remove", name, None))
        for other in empty:
            if placement_of(space, {**without(genome, name), other: gene}) in allowed:
                ops.append(("move", name, other))
    for name in empty:
        if placement_of(space, {**genome, name: None}) in allowed:
            ops.append(("add", name, None))
    if not ops:
        return None
    op, name, arg = ops[int(rng.integers(len(ops)))]
    child = dict(genome)
    if op == "hparam":
        gene = genome[name]
        current = dict(gene.hparams)[arg]
        values = [v for v in encoded_choices(space.options[name][gene.module][arg]) if v != current]
        new = _pick(rng, values)
        child[name] = replace(gene, hparams=tuple((hp, new if hp == arg else v) for hp, v in gene.hparams))
        return child, f"{name}.{gene.module}.{arg}"
    if op == "module":
        module = _pick(rng, tuple(m for m in space.options[name] if m != genome[name].module))
        child[name] = random_gene(space, name, rng, module)
        return child, f"{name} -> {module}"
    if op == "mode":
        others = tuple(m for m in slot_modes(space, name) if m != genome[name].mode)
        child[name] = replace(genome[name], mode=_pick(rng, others))
        return child, f"{name}.mode"
    if op == "remove":
        return without(genome, name), f"remove {name}"
    if op == "move":
        del child[name]
        child[arg] = _fit_gene(space, arg, genome[name], rng)
        return child, f"move {name} -> {arg}"
    child[name] = random_gene(space, name, rng)
    return child, f"add {name}"


def crossover(space: SearchSpace, a: Genome, b: Genome, rng: np.random.Generator) -> Genome | None:
    """Each slot's layer (or its absence) from one parent or the other; None if the result is not allowed."""
    child = {}
    for name in slot_names(space):
        gene = (a if rng.random() < 0.5 else b).get(name)
        if gene is not None:
            child[name] = gene
    return child if placement_of(space, child) in allowed_placements(space) else None


def _fit_gene(space: SearchSpace, slot: str, gene: Gene, rng: np.random.Generator) -> Gene:
    """``gene`` moved to ``slot``: values the slot does not allow (feature-size limits) are drawn again."""
    options = space.options[slot]
    if gene.module not in options:
        return random_gene(space, slot, rng)
    modes = slot_modes(space, slot)
    hparams = []
    for hp, values in options[gene.module].items():
        encoded = encoded_choices(values)
        value = dict(gene.hparams).get(hp)
        hparams.append((hp, value if value in encoded else _pick(rng, encoded)))
    return Gene(gene.module, gene.mode if gene.mode in modes else _pick(rng, modes), tuple(hparams))


def distance(a: Genome, b: Genome) -> int:
    """Slots whose layer differs between two genomes (added, removed or changed)."""
    return sum(a.get(n) != b.get(n) for n in set(a) | set(b))


_ALLOWED: dict[int, tuple[SearchSpace, frozenset]] = {}  # holds the space, so its id is not reused


def allowed_placements(space: SearchSpace) -> frozenset:
    """The space's placements as a set, built once per space (mutations ask for it thousands of times)."""
    if _ALLOWED.get(id(space), (None,))[0] is not space:
        _ALLOWED[id(space)] = (space, frozenset(space.placements))
    return _ALLOWED[id(space)][1]


def slot_names(space: SearchSpace) -> tuple[str, ...]:
    return tuple(s.name for s in space.slots)


def slot_modes(space: SearchSpace, name: str) -> tuple[str, ...]:
    return space.modes(next(s for s in space.slots if s.name == name))


def encoded_choices(values: Sequence) -> tuple:
    return tuple(encode(v) for v in values)


def without(genome: Genome, name: str) -> Genome:
    return {k: v for k, v in genome.items() if k != name}


def _pick(rng: np.random.Generator, values: Sequence) -> Any:
    return values[int(rng.integers(len(values)))]

