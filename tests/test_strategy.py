"""The default search strategy (search/strategy.py): determinism, resume from a stored study, batch proposals
without duplicates, infeasible candidates never proposed again, and better fronts than random on a tiny
known-answer space (real Optuna studies, real SQLite, the real yolov8n search space)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search.strategy.evolution import EvolutionSampler
from search.strategy.genome import genome_from_params, params_from_genome, random_genome
from space import SpaceConfig, build_space, load_base

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from known_answers import CELLS, Generator  # noqa: E402
from search_vs_random import KnownObjective, front_hv, proxy_hv, run_search, union_box  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def space():
    """Three slots, two modules, every value: small enough to run tens of trials in a second."""
    config = SpaceConfig.from_dict({"slots": ["P4", "P5_sppf", "N4"], "modules": {"CGA": {}, "CoT": {}}})
    return build_space(load_base("yolov8n.yaml"), config)


def _study(space, storage=None, name="s", seed=0, **kwargs) -> optuna.Study:
    return optuna.create_study(directions=["maximize", "minimize"], storage=storage, study_name=name,
                               sampler=EvolutionSampler(space, seed=seed, **kwargs), load_if_exists=True)


def _step(study: optuna.Study, space, objective) -> dict:
    """One ask → suggest → tell, as the driver does it; returns the trial's parameters."""
    trial = study.ask()
    candidate = space.suggest(trial)
    trial.set_user_attr("candidate_hash", candidate.hash)
    study.tell(trial, list(objective(candidate)))
    return dict(trial.params)


def test_genome_round_trip(space):
    rng = np.random.default_rng(0)
    for _ in range(50):
        genome = random_genome(space, rng)
        assert genome_from_params(space, params_from_genome(space, genome)) == genome


def test_same_seed_same_proposals_other_seed_others(space):
    objective = KnownObjective(0)
    runs = []
    for seed in (3, 3, 4):
        study = _study(space, seed=seed, n_startup_trials=3)
        runs.append([_step(study, space, objective) for _ in range(9)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("options", [{}, {"random_share": 0.3, "trust_growth": 2}])
def test_resume_from_storage_proposes_what_an_uninterrupted_run_would(space, tmp_path, options):
    objective = KnownObjective(1)
    straight = _study(space, seed=7, n_startup_trials=3, **options)
    expected = [_step(straight, space, objective) for _ in range(11)]

    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = _study(space, storage=url, seed=7, n_startup_trials=3, **options)
    got = [_step(first, space, objective) for _ in range(6)]
    del first  # a new process: a new sampler object that knows only the stored study
    resumed = _study(space, storage=url, seed=7, n_startup_trials=3, **options)
    got += [_step(resumed, space, objective) for _ in range(5)]
    assert got == expected
    origins = [t.system_attrs.get("attnas:origin") for t in resumed.trials]
    assert ("random (hedge)" in origins) == bool(options), "the hedge's share of plain random draws"


def test_batch_proposals_differ_from_each_other_and_from_the_study(space):
    objective = KnownObjective(2)
    study = _study(space, seed=0, n_startup_trials=3)
    for _ in range(6):
        _step(study, space, objective)
    hashes = {t.user_attrs["candidate_hash"] for t in study.trials}
    for _ in range(3):  # three rounds of 4 trials in flight: asked together, told together
        batch = [study.ask() for _ in range(4)]
        candidates = [space.suggest(t) for t in batch]
        for t, c in zip(batch, candidates):
            t.set_user_attr("candidate_hash", c.hash)
        new = [c.hash for c in candidates]
        assert len(set(new)) == 4 and not set(new) & hashes
        hashes |= set(new)
        for t, c in zip(batch, candidates):
            study.tell(t, list(objective(c)))


def test_infeasible_candidates_are_never_parents_nor_proposed_again(space):
    """With a latency limit most candidates break, the sampler learns to propose ones that keep it."""
    objective = KnownObjective(3)
    rng = np.random.default_rng(0)
    latencies = []
    while len(latencies) < 40:
        try:
            latencies.append(objective(space.suggest(optuna.trial.FixedTrial(
                params_from_genome(space, random_genome(space, rng)))))[1])
        except optuna.TrialPruned:
            pass
    limit = float(np.percentile(latencies, 30))  # 70 % of random candidates break it
    study = _study(space, seed=1, n_startup_trials=4)
    proposed, feasible_late = [], 0
    for i in range(30):
        trial = study.ask()
        candidate = space.suggest(trial)
        proposed.append(candidate.hash)
        trial.set_user_attr("candidate_hash", candidate.hash)
        mAP, latency = objective(candidate)
        trial.set_constraint("latency_ms", latency - limit)
        if latency > limit:
            trial.set_user_attr("infeasible", "latency")
            mAP = 0.0
        elif i >= 15:
            feasible_late += 1
        study.tell(trial, [mAP, latency])
    assert len(set(proposed)) == len(proposed)
    early = sum("infeasible" not in t.user_attrs for t in study.trials[:15])
    assert feasible_late > early, (early, feasible_late)


def test_enqueued_trials_keep_their_parameters(space):
    study = _study(space, seed=0)
    study.enqueue_trial({"placement": "none"})
    trial = study.ask()
    assert space.suggest(trial).placements == ()


def test_beats_random_on_a_tiny_known_answer_space(space):
    """The benchmark's smallest setting: median hypervolume after 20 trials over 5 seeds."""
    hv = {"evolution": [], "random": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(5):
            objective = KnownObjective(seed)
            runs = {"evolution": run_search(space, EvolutionSampler(space, seed=seed), objective, 20),
                    "random": run_search(space, optuna.samplers.RandomSampler(seed=seed), objective, 20)}
            box = union_box(list(runs.values()))
            for name, run in runs.items():
                hv[name].append(front_hv(run, box))
    assert np.median(hv["evolution"]) > np.median(hv["random"]), hv
    assert sum(e >= r for e, r in zip(hv["evolution"], hv["random"])) >= 4, hv


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=lambda cell: cell.label)
def test_not_behind_random_on_any_generator_of_the_family(space, cell):
    """Each known-answer generator (bench/known_answers.py), with and without noise, on the three-slot space, 20
    trials, seeds 200-205: the driver's default sampler is not behind random beyond the seeds' noise (the mean
    paired hypervolume difference is above -2 standard errors). Not the plain median: where the two are close
    (costly+noise: on development seeds 100-115 the default's median 51.7 against 51.5, 8 wins of 16) six seeds
    make it a coin toss, and on these seeds interaction+noise, ahead on the development seeds (44.4 against 37.4,
    12 of 16), had a median 39.4 against 44.8 (3 wins of 6)."""
    from search.strategy import make_sampler

    differences = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(200, 206):
            runs = {name: run_search(space, make_sampler(name, seed, 20, space), Generator(cell.shape, seed, space,
                                                                                            cell.noisy), 20)
                    for name in ("evolution", "random")}
            box = union_box(list(runs.values()))
            differences.append(front_hv(runs["evolution"], box) - front_hv(runs["random"], box))
    standard_error = np.std(differences, ddof=1) / np.sqrt(len(differences))
    assert np.mean(differences) >= -2 * standard_error, differences


def test_lower_rung_results_are_data_and_never_proposed_again(space):
    """Successive halving: candidates stopped (PRUNED) or waiting (RUNNING) below the top rung teach the sampler
    their highest rung's values; with only such trials the surrogate already proposes, and never one of them."""
    objective = KnownObjective(4)
    study = _study(space, seed=2, n_startup_trials=4)
    rng = np.random.default_rng(1)
    stopped = set()
    while len(stopped) < 6:
        study.enqueue_trial(params_from_genome(space, random_genome(space, rng)))
        trial = study.ask()
        try:
            candidate = space.suggest(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)  # refused by the layers: no rung results, no data
            continue
        mAP, latency = objective(candidate)
        trial.set_user_attr("candidate_hash", candidate.hash)
        trial.set_user_attr("rung_results", {"1": [mAP - 0.1, latency], "3": [mAP - 0.05, latency]})
        if len(stopped) < 5:
            study.tell(trial, state=TrialState.PRUNED)
        stopped.add(candidate.hash)  # the sixth stays RUNNING, waiting between rungs
    origins, proposed = [], set()
    for _ in range(4):
        trial = study.ask()
        candidate = space.suggest(trial)
        origins.append(study.trials[trial.number].system_attrs["attnas:origin"])
        proposed.add(candidate.hash)
        trial.set_user_attr("candidate_hash", candidate.hash)
        study.tell(trial, list(objective(candidate)))
    assert not proposed & stopped
    assert all(origin != "random" for origin in origins), origins


def test_proxy_bench_hypervolume_counts_only_what_beats_the_base():
    """The proxy bench's reference is the base: its own point, slower or less accurate networks add nothing;
    a network 0.01 mAP better at 1.5x the base latency adds 0.01 x (2 - 1.5) base latencies (in percent)."""
    base = (0.30, 10.0)
    assert proxy_hv([base, (0.29, 12.0), (0.35, 25.0)], base, factor=2.0) == 0.0
    assert proxy_hv([base, (0.31, 15.0)], base, factor=2.0) == pytest.approx(100 * 0.01 * 0.5)


def test_a_network_measured_twice_or_confirmed_is_learnt_from_its_mean(space):
    """Noise: the surrogate sees one value per network, the mean of its runs (repeats, and the seeds of a confirmed
    trial), not a single noisy run nor a repeat counted twice."""
    from search.front import confirm

    study = _study(space, seed=0)
    a = {"placement": "P4", "P4.module": "CoT"}
    b = {"placement": "N4", "N4.module": "CGA"}
    for params, values in ((a, [0.50, 10.0]), ("again", [0.60, 10.0]), (b, [0.40, 12.0])):
        study.enqueue_trial(study.trials[-1].params if params == "again" else params)
        trial = study.ask()
        trial.set_user_attr("candidate_hash", space.suggest(trial).hash)
        study.tell(trial, values)
    assert study.trials[0].user_attrs["candidate_hash"] == study.trials[1].user_attrs["candidate_hash"]
    confirm.record(study, 2, 1, [0.50, 12.0])  # b's second seed
    seen = study.sampler._read(study, None)
    genomes, values, _ = seen.fits["objective:0"]
    assert len(genomes) == 2 and values == pytest.approx([-0.55, -0.45])  # losses: -mAP
    assert sorted(loss[0] for loss in seen.front) == pytest.approx([-0.55, -0.45])


def test_a_candidate_that_extends_the_front_within_the_reference_margin_is_credited():
    """Hypervolume added against an independent formula: the front (0, 1), (1, 0) (normalised losses) and a point
    with 0.2 better first loss at 1.3 of the second's span; it adds a 0.2-wide strip up to the reference."""
    from search.strategy.evolution import _improvement

    front, none = np.array([[0.0, 1.0], [1.0, 0.0]]), np.zeros((0, 2))
    extending = np.array([[-0.2, 1.3]])
    assert _improvement(front, none, extending, margin=0.5)[0] == pytest.approx(0.2 * (1.5 - 1.3))
    assert _improvement(front, none, extending, margin=0.1)[0] < 0, "beyond a 0.1 margin it scored as dominated"
    inside = np.array([[0.5, 0.5]])  # fills the front's corner: 0.5 x 0.5, whatever the margin
    assert _improvement(front, none, inside, margin=0.5)[0] == pytest.approx(0.25)
    assert _improvement(front, none, inside, margin=0.1)[0] == pytest.approx(0.25)


def test_a_chebyshev_ranking_credits_the_front_s_ends_by_an_independent_formula():
    """The augmented Chebyshev scalarisation (losses normalised by the known points' range): max_i w_i z_i + 0.05
    sum_i w_i z_i. Under a weighting on the first loss alone, a point beyond the front's end (first loss -0.2, at 1.3
    of the second's span) ranks first, where the hypervolume gain (0.1 margin) scores it as dominated."""
    from search.strategy.evolution import _chebyshev, _improvement

    front, none = np.array([[0.0, 10.0], [2.0, 0.0]]), np.zeros((0, 2))  # spans 2 and 10
    points = np.array([[-0.4, 13.0], [1.0, 5.0], [2.0, 0.0]])
    z = np.array([[-0.2, 1.3], [0.5, 0.5], [1.0, 0.0]])  # the same points, normalised by hand
    for w in (np.array([0.5, 0.5]), np.array([0.9, 0.1]), np.array([1.0, 0.0])):
        expected = (w * z).max(1) + 0.05 * (w * z).sum(1)
        assert _chebyshev(front, none, points, w) == pytest.approx(expected)
    assert np.argmin(_chebyshev(front, none, points, np.array([1.0, 0.0]))) == 0
    assert _improvement(front, none, points[:1], margin=0.1)[0] < 0


def test_the_scalarized_share_of_proposals_is_recorded_and_reproducible(space):
    """Three proposals in four (by default) rank the pool under a drawn weighting, named in the trial's origin; a
    share of 0 never does, and the share is refused outside [0, 1]."""
    objective = KnownObjective(3)
    origins = {}
    for share in (0.75, 0.0):
        study = _study(space, seed=5, n_startup_trials=3, scalarized_share=share)
        for _ in range(16):
            _step(study, space, objective)
        origins[share] = [t.system_attrs.get("attnas:origin", "") for t in study.trials]
    ranked = [o for o in origins[0.75] if "ranked under weighting" in o]
    assert 6 <= len(ranked) <= 13, origins[0.75]  # 12 modelled proposals at share 0.75
    assert not any("ranked under weighting" in o for o in origins[0.0])
    with pytest.raises(ValueError, match="scalarized_share"):
        EvolutionSampler(space, scalarized_share=1.5)
