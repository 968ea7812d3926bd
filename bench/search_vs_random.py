"""Does the default search strategy find better fronts than random sampling with the same number of trials?

    python bench/search_vs_random.py [--objective known] [--seeds 20] [--trials 50] [--workers 1]
                                     [--samplers evolution tpe nsga2 random] [--bases yolov8n yolo11n two-modules]

``--objective known``: a known-answer objective over the real search space (the space's own
``SearchSpace.suggest``, candidates and canonical hashes), cheap to evaluate: mAP is a base value plus seeded
random effects per slot×module, slot×module×mode and slot×module×hyper-parameter value, plus pairwise slot
interactions; latency is a base value plus seeded positive costs per slot×module and smaller per value and mode.
Each seed draws a new objective and a new sampler seed. Every run is an Optuna study driven like
``search.driver`` drives one: the base model is trial 0, ``--workers`` trials are in flight (ask ahead, tell the
oldest), a candidate whose network was already evaluated completes with that result and counts as a trial,
an invalid one is pruned and does not count.

Hypervolume is measured on the front of (mAP, latency), normalised per seed to the box spanned by the union of
all runs' fronts (10 % margin), in percent of that box; regret is the union's hypervolume minus the run's.
Printed: median [IQR] hypervolume and regret after 10, 25 and 50 trials, the trials each sampler needs to reach
random's median 50-trial hypervolume, and the regret ratio to random.

Measured (seeds 0-19, 1 in flight, shared 2-core CPU; the default was tuned on seeds 100-107): regret at 50
trials relative to random's, and the trials needed to reach random's median 50-trial hypervolume:
yolov8n default space: evolution 0.34 (38.5), TPE 0.64 (31.5); yolo11n default space: evolution 0.62 (29.5),
TPE 0.83 (32.5); yolov8n CGA+CoT: evolution 0.28 (20.5), TPE 0.57 (37). NSGA-II's trials equal random's at
this budget. The issue's target (<= 25 trials and <= 0.5x) is met on the two-module space only.
``--cache DIR`` keeps each run, so a table with a changed strategy recomputes only its runs.

``--objective proxy`` (real trainings) is not implemented: on a 2-core machine 3 seeds × 50 trainings × 2
samplers is a day of compute. Run ``python -m search.run --sampler X`` per seed on a machine that has it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from search.driver import make_sampler as driver_sampler  # noqa: E402
from search.rungs import pareto_ranks  # noqa: E402
from search.strategy import EvolutionSampler  # noqa: E402
from search.study import loss_hypervolume  # noqa: E402
from space import Candidate, SearchSpace, SpaceConfig, build_space, load_base  # noqa: E402

CHECKPOINTS = (10, 25, 50)
TWO_MODULES = {"modules": {"CGA": {}, "CoT": {}}}
BASE_MAP, BASE_LATENCY = 0.50, 10.0


class KnownObjective:
    """A seeded random function of a candidate's placements: (mAP, latency) with known structure.

    Every effect is drawn lazily from its own key, so it does not depend on which candidates were evaluated."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def _draw(self, *key) -> np.random.Generator:
        return np.random.default_rng(zlib.crc32(repr((self.seed, *key)).encode()))

    def __call__(self, candidate: Candidate) -> tuple[float, float]:
        m, lat = BASE_MAP, BASE_LATENCY
        for p in candidate.placements:
            m += self._draw("module", p.slot, p.module).normal(0.0, 0.012)
            lat += self._draw("cost", p.slot, p.module).lognormal(np.log(1.5), 0.7)
            m += self._draw("mode", p.slot, p.module, p.mode).normal(0.0, 0.004)
            lat += self._draw("mode-cost", p.slot, p.module, p.mode).normal(0.0, 0.2)
            for hp, value in p.hparams:
                m += self._draw("hp", p.slot, p.module, hp, value).normal(0.0, 0.004)
                lat += abs(self._draw("hp-cost", p.slot, p.module, hp, value).normal(0.0, 0.25))
        slots = sorted(p.slot for p in candidate.placements)
        for i, a in enumerate(slots):
            for b in slots[i + 1:]:
                m += self._draw("pair", a, b).normal(0.0, 0.008)
        return float(m), float(max(lat, 1.0))


def make_sampler(name: str, space: SearchSpace, seed: int, budget: int) -> optuna.samplers.BaseSampler:
    """The samplers compared, as ``search.driver.make_sampler`` makes them; ``evolution:beta=2,n_children=16`` tries
    the default strategy with other settings."""
    if name.startswith("evolution:"):
        options = dict(kv.split("=") for kv in name.partition(":")[2].split(",") if kv)
        return EvolutionSampler(space, seed=seed, **{k: type(getattr(EvolutionSampler(space), k))(v)
                                                     for k, v in options.items()})
    return driver_sampler(name, seed, budget, space)


def run_search(space: SearchSpace, sampler: optuna.samplers.BaseSampler, objective, n_trials: int,
               workers: int = 1) -> list[tuple[float, float]]:
    """(mAP, latency) of each counted trial in completion order, driven like ``search.driver`` drives a study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.enqueue_trial({"placement": "none"})
    done: dict[str, tuple[float, float]] = {}
    results: list[tuple[float, float]] = []
    in_flight: list[tuple[optuna.Trial, str, tuple[float, float]]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while len(results) < n_trials:
            while len(in_flight) < workers and len(results) + len(in_flight) < n_trials:
                trial = study.ask()
                try:
                    candidate = space.suggest(trial)
                except optuna.TrialPruned:
                    study.tell(trial, state=TrialState.PRUNED)
                    continue
                trial.set_user_attr("candidate_hash", candidate.hash)
                in_flight.append((trial, candidate.hash, done.get(candidate.hash) or objective(candidate)))
            trial, h, values = in_flight.pop(0)
            study.tell(trial, list(values))
            done[h] = values
            results.append(values)
    return results


def front_hv(points: list[tuple[float, float]], box: tuple[np.ndarray, np.ndarray]) -> float:
    """Hypervolume of (mAP, latency) points in percent of the normalisation box (ideal, reference)."""
    ideal, ref = box
    losses = (np.array([[-m, lat] for m, lat in points]) - ideal) / (ref - ideal)
    return 100.0 * loss_hypervolume(losses, np.ones(2))


def union_box(runs: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Ideal and reference point (10 % beyond the nadir) of the union of all runs' fronts, as losses."""
    losses = np.array([[-m, lat] for run in runs for m, lat in run])

    front = losses[pareto_ranks(losses) == 0]
    ideal, nadir = front.min(0), front.max(0)
    span = np.where(nadir > ideal, nadir - ideal, 1.0)
    return ideal, nadir + 0.1 * span


def median_iqr(values: list[float]) -> str:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return f"{med:6.1f} [{q1:5.1f}-{q3:5.1f}]"


def trials_to_reach(run: list[tuple[float, float]], target: float, box) -> int | None:
    for k in range(1, len(run) + 1):
        if front_hv(run[:k], box) >= target:
            return k
    return None


def cached_run(space: SearchSpace, which: str, name: str, seed: int, n_trials: int, workers: int,
               cache: Path | None) -> tuple[list[tuple[float, float]], float]:
    """One sampler's run on one seed's objective and its seconds, read from ``cache`` when it holds it (the
    baselines do not change while the default strategy is developed, so only its runs need computing again)."""
    path = cache / f"{which}-{name}-seed{seed}-t{n_trials}-w{workers}.json" if cache else None
    if path is not None and path.is_file():
        stored = json.loads(path.read_text())
        return [tuple(v) for v in stored["run"]], stored["seconds"]
    t0 = time.perf_counter()
    run = run_search(space, make_sampler(name, space, seed, n_trials), KnownObjective(seed), n_trials, workers)
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run": run, "seconds": seconds}))
    return run, seconds


def compare(space: SearchSpace, label: str, samplers: list[str], seed_list: list[int], n_trials: int, workers: int,
            which: str = "", cache: Path | None = None) -> dict:
    """Run every sampler on every seed's objective; print and return the table."""
    runs: dict[str, list[list[tuple[float, float]]]] = {s: [] for s in samplers}
    seconds = {s: 0.0 for s in samplers}
    seeds = len(seed_list)
    for seed in seed_list:
        for name in samplers:
            run, spent = cached_run(space, which, name, seed, n_trials, workers, cache)
            runs[name].append(run)
            seconds[name] += spent
    boxes = [union_box([runs[s][seed] for s in samplers]) for seed in range(seeds)]
    hv = {s: {k: [front_hv(runs[s][i][:k], boxes[i]) for i in range(seeds)] for k in CHECKPOINTS if k <= n_trials}
          for s in samplers}
    best = [front_hv([p for s in samplers for p in runs[s][i]], boxes[i]) for i in range(seeds)]
    regret = {s: {k: [best[i] - v for i, v in enumerate(vals)] for k, vals in hv[s].items()} for s in samplers}
    last = max(hv[samplers[0]])
    target = [statistics.median(hv["random"][last])] * seeds if "random" in hv else None
    print(f"\n{label}: {space.size():,} candidates, {len(space.placements)} placements; {seeds} seeds, "
          f"{n_trials} trials, {workers} in flight; hypervolume (% of the union's box) and regret, median [IQR]")
    head = "".join(f"  HV@{k:<16} regret@{k:<12}" for k in hv[samplers[0]])
    print(f"{'sampler':<10}{head}  reach rnd@{last}  regret/rnd  s/run")
    for s in samplers:
        cells = "".join(f"  {median_iqr(hv[s][k]):<19} {median_iqr(regret[s][k]):<19}" for k in hv[s])
        reach = "-"
        if target:
            needed = [trials_to_reach(r, target[0], boxes[i]) for i, r in enumerate(runs[s])]
            med = statistics.median([n if n is not None else math.inf for n in needed])
            reach = f"{med:g}" if med < math.inf else f">{n_trials}"
        ratio = (statistics.median(regret[s][last]) / statistics.median(regret["random"][last])
                 if "random" in regret and statistics.median(regret["random"][last]) > 0 else float("nan"))
        print(f"{s:<10}{cells}  {reach:>12}  {ratio:10.2f}  {seconds[s] / seeds:5.2f}")
    return {"hv": hv, "regret": regret}


def load_space(which: str) -> tuple[SearchSpace, str]:
    if which == "two-modules":
        return build_space(load_base("yolov8n.yaml"), SpaceConfig.from_dict(TWO_MODULES)), "yolov8n, CGA+CoT only"
    if which.endswith((".yaml", ".yml")) and Path(which).is_file():
        return build_space(load_base("yolov8n.yaml"), SpaceConfig.load(which)), f"yolov8n, space {which}"
    return build_space(load_base(f"{which}.yaml")), f"{which}, default space"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objective", choices=["known"], default="known",
                   help="known-answer objective (proxy trainings are not implemented; see the module docstring)")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed ... first-seed+seeds-1 (tune on others)")
    p.add_argument("--cache", type=Path, help="folder that keeps each run (sampler, seed, space) for later tables")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--workers", type=int, default=1, help="trials in flight")
    p.add_argument("--samplers", nargs="+", default=["evolution", "tpe", "nsga2", "random"])
    p.add_argument("--bases", nargs="+", default=["yolov8n", "yolo11n", "two-modules"],
                   help="yolov8n, yolo11n (default spaces), two-modules, or a space YAML over yolov8n")
    args = p.parse_args(argv)
    for which in args.bases:
        space, label = load_space(which)
        seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
        compare(space, label, args.samplers, seed_list, args.trials, args.workers, which, args.cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
