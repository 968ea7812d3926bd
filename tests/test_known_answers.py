"""The known-answer generator family of bench/search_vs_random.py --family: each generator is a deterministic
function of its seed, independent of the order candidates are evaluated in, shaped as it says, and its noise is
reproducible and scored away."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from space import SpaceConfig, SpaceError, build_space, load_base

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
from known_answers import FAMILY, Generator  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def candidates():
    space = build_space(load_base("yolov8n.yaml"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    found = []
    while len(found) < 120:
        try:
            found.append(space.suggest(study.ask()))
        except (optuna.TrialPruned, SpaceError):
            pass
    return space, found


@pytest.mark.parametrize("shape", FAMILY)
def test_a_generator_is_a_function_of_its_seed_alone(shape, candidates):
    space, found = candidates
    one, again, other = Generator(shape, 5, space), Generator(shape, 5, space), Generator(shape, 6, space)
    values = [one.true(c) for c in found]
    assert [again.true(c) for c in reversed(found)] == values[::-1], "not the order of evaluation"
    assert [other.true(c) for c in found] != values
    base = next(c for c in found if not c.placements) if any(not c.placements for c in found) else None
    if base is not None:
        assert one.true(base) == (0.50, 10.0)


@pytest.mark.parametrize("shape", FAMILY)
def test_noise_is_reproducible_has_the_median_effect_size_and_leaves_the_truth(shape, candidates):
    space, found = candidates
    a, b = Generator(shape, 2, space, noisy=True), Generator(shape, 2, space, noisy=True)
    told = [a(c) for c in found]
    assert told == [b(c) for c in found]
    errors = np.array([m - a.true(c)[0] for (m, _), c in zip(told, found)])
    assert a.noise_sd > 0 and 0.6 < errors.std() / a.noise_sd < 1.4
    assert [lat for _, lat in told] == [a.true(c)[1] for c in found], "latency is measured exactly"


def test_the_shapes_differ_as_described(candidates):
    space, found = candidates
    layers = np.array([len(c.placements) for c in found])

    def corr(shape: str, seed: int = 0) -> float:
        values = np.array([Generator(shape, seed, space).true(c) for c in found])
        return float(np.corrcoef(values[:, 0], values[:, 1])[0, 1])

    assert min(corr("costly", s) for s in range(3)) > 0.7, "gains grow with latency"
    assert max(abs(corr("additive", s)) for s in range(3)) < 0.5
    sparse = Generator("sparse", 0, space)
    slot, module, _ = sparse.needle
    hit = [sparse.true(c)[0] for c in found if any((p.slot, p.module) == (slot, module) for p in c.placements)]
    miss = [sparse.true(c)[0] for c in found if c.placements and all(p.slot != slot or p.module != module
                                                                      for p in c.placements)]
    assert hit and min(hit) > max(miss), "the needle's slot x module is far better, the rest near zero"
    mode = Generator("mode", 1, space)
    small = build_space(load_base("yolov8n.yaml"), SpaceConfig.from_dict({"slots": ["P4"], "max_layers": 1}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    by_mode: dict[str, list[float]] = {"insert": [], "replace": []}
    for _ in range(200):
        try:
            c = small.suggest(study.ask())
        except (optuna.TrialPruned, SpaceError):
            continue
        if c.placements:
            by_mode[c.placements[0].mode].append(mode.true(c)[0])
    spread_within = np.mean([np.std(v) for v in by_mode.values()])
    assert abs(np.mean(by_mode["insert"]) - np.mean(by_mode["replace"])) > spread_within, "mode matters most"
    assert layers.max() == 3
