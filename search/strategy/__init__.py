"""The samplers behind ``--sampler``: the default evolution strategy (:mod:`.evolution`: genomes, a surrogate
model and the sampler) and Optuna's own samplers as baselines, each set up for this search."""

from __future__ import annotations

import warnings

import optuna

from space import SearchSpace

from .evolution import EvolutionSampler

SAMPLERS = ("evolution", "tpe", "nsga2", "gp", "random")


def make_sampler(name: str, seed: int, budget: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The multi-objective sampler for ``--sampler`` (docs/design.md says why ``evolution`` is the default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "evolution":
            return EvolutionSampler(space, seed=seed)
        if name == "tpe":
            # multivariate+group models the conditional parameters (P4.module exists only if P4 is placed) jointly;
            # constant_liar keeps parallel asks from proposing the candidate that is already training.
            return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                              n_startup_trials=min(10, max(2, budget // 5)))
        if name == "nsga2":
            # The default population of 50 would give a single generation at budget 50.
            return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, budget // 4)), seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")

