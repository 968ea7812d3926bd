"""Does the default search strategy find better fronts than random sampling with the same number of trials?

    python bench/search_vs_random.py [--objective known] [--seeds 20] [--trials 50] [--workers 1]
                                     [--samplers evolution tpe nsga2 random] [--bases yolov8n yolo11n two-modules]
    python bench/search_vs_random.py --objective proxy [--seeds 3] [--budget 50] [--rungs 1,3,9]
                                     [--confirm-seeds 1] [--imgsz 128] [--fraction 1.0] [-- search.run args]
    python bench/search_vs_random.py --family [CELL ...] [--seeds 20] [--first-seed N] [--results FILE]
    python bench/search_vs_random.py --proposal-cost 200 [--bases yolov8n]

``--family``: the generator family of ``bench/known_answers.py`` (five shapes, each with and without evaluation
noise; regret scored on the noise-free values) on every ``--bases`` space, then a summary against the targets
(regret ratio to random per cell and overall, trials to reach random's 50-trial hypervolume), written as JSON.
Development seeds are 1000-1015; seeds 2000-2019 were the held-out table of the trust-region strategy and
3000-3019 that of the Chebyshev-ranked proposals (``scalarized_share``, 2026-12-07, docs/benchmarks.md): a later
choice develops on 1000-1015 (or 2000-2019, 3000-3019) and reports fresh held-out seeds (4000-4019) once.
``--proposal-cost N``: the seconds one proposal takes at every 25th trial up to N.

``--objective known``: a known-answer objective over the real search space (the space's own
``SearchSpace.suggest``, candidates and canonical hashes), cheap to evaluate: mAP is a base value plus seeded
random effects per slot×module, slot×module×mode and slot×module×hyper-parameter value, plus pairwise slot
interactions; latency is a base value plus seeded positive costs per slot×module and smaller per value and mode.
Each seed draws a new objective and a new sampler seed. Every run is an Optuna study driven like
``search.engine.driver`` drives one: the base model is trial 0, ``--workers`` trials are in flight (ask ahead, tell the
oldest), a candidate whose network was already evaluated completes with that result and counts as a trial,
an invalid one is pruned and does not count.

Hypervolume is measured on the front of (mAP, latency), normalised per seed to the box spanned by the union of
all runs' fronts (10 % margin), in percent of that box; regret is the union's hypervolume minus the run's.
Printed: median [IQR] hypervolume and regret after 10, 25 and 50 trials, the trials each sampler needs to reach
random's median 50-trial hypervolume ("reach"; the median over seeds, one target for every seed) and to reach the
same seed's random 50-trial hypervolume ("paired"), and the regret ratio to random.

Measured (seeds 0-19, 1 in flight, shared 2-core CPU): regret at 50 trials relative to random's, the trials
needed to reach random's median 50-trial hypervolume, and (paired) the same seed's: yolov8n default space:
evolution 0.31 (20.5; paired 20), TPE 0.71 (37; 35.5); yolo11n default space: evolution 0.27 (24; 19), TPE 0.78
(35; 38); yolov8n CGA+CoT: evolution 0.28 (18; 18), TPE 0.48 (31; 30). NSGA-II's trials equal random's at this
budget. The issue's targets (<= 25 trials and <= 0.5x) are met on all three. What got there is the trust region
(proposals within one slot of the front while results are few): the table before it (same seeds, its own
union box) read 0.34 (38.5), 0.62 (29.5) and 0.28 (20.5). It was developed on seeds 100-109 and 200-215.
Its length (twice the space's slot×module choices, so it spans all 50 trials of the two default spaces) was chosen
between 1x and 2x after a first held-out table: with 1x (off after 35 / 40 / 14 results) yolo11n needed 26 trials
(regret 0.33), with 2x 24; on the tiny 3-slot space of
the tests, a region that never ends beats random on 8 of 10 seeds at 20 trials, 1x and 2x on 10 and 9. Checked
afterwards on fresh seeds 300-315: 1x vs 2x regret ratio 0.63 vs 0.24 on yolov8n and 0.15 vs 0.20 on yolo11n; 2x
reached random's median 50-trial hypervolume after 26.5 (yolov8n) and 18.5 (yolo11n) trials there, so the
trials-to-reach figure moves by a few trials between seed sets.
Tried earlier on seeds 100-115 (25 trials) without reaching random's 50-trial hypervolume on more seeds than the
plain draw: a start-up covering the most unseen features, Thompson draws that shrink toward the posterior mean as
n grows (``evolution:anneal=10``), value and pair terms at their posterior mean (``evolution:fine_spread=0``),
alternating with the posterior mean's greedy proposal, the hypervolume gain averaged over 4 draws (a Monte-Carlo
expected improvement), pair terms held out for the first 15 results, fewer start-up trials, latency at its
posterior mean; on seeds 200-215, the optimistic acquisition (mean - beta sd) and a draw at 0.3 of the spread,
and a region of radius 2 (regret 0.53 / 0.61 vs radius 1's 0.40 / 0.40).
``--cache DIR`` keeps each run, so a table with a changed strategy recomputes only its runs.

``--objective proxy``: real ``python -m search.run`` studies on the default built-in data (``--data``), the
default strategy against ``random`` (``--samplers``), seeds 0-2 (``--seeds``): one ``--out`` per sampler and
seed below ``--out`` (default runs/bench-proxy), each with the same ``--budget``, ``--rungs``,
``--confirm-seeds``, ``--imgsz``, ``--fraction`` and ``--base-epochs`` (anything after ``--`` goes to every
run). Both samplers get the same budget of candidates on the same rungs, so the same epochs up to which
candidates successive halving promotes; the epochs each run spent are printed. The base trained by a seed's
first run is hard-linked into the others' ``.cache`` (same base, data and schedule: not trained again), and a
finished study is not trained again, so an interrupted bench resumes. Read back from each study's
``summary.json``: the exported front on the confirmed seed means (``<objective>_mean``; the base is the fastest
network, so always on it). Hypervolume of (mAP, latency / the run's own base latency) above the base's mAP (the
mean over the seed's runs) and below ``--latency-factor`` (2) base latencies, in mAP points × base latencies.
At full size (50 candidates, rungs 1,3,9, about 112 epochs + confirmation per study, 6 studies and a 40-epoch base
per seed) this is many hours on the shared 2-core CPU: it has not been run at full size. The smallest setting
(``--seeds 1 --budget 3 --rungs 1 --imgsz 64 --fraction 8,8 --base-epochs 1 -- --latency-imgsz 128
--latency-runs 3 --latency-min-runs 2``) took about 6-7 minutes per study there; its front is the base alone
(mAP 0 after one epoch on 8 images), so it shows the plumbing, not a result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
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

from search.strategy import make_sampler as driver_sampler  # noqa: E402
from search.front.ranks import pareto_ranks  # noqa: E402
from search.strategy.evolution import EvolutionSampler  # noqa: E402
from search.front.pareto import loss_hypervolume  # noqa: E402
from space import Candidate, SearchSpace, SpaceConfig, build_space, load_base  # noqa: E402

sys.path.append(str(REPO / "bench"))  # after the repository: bench/modules.py must not shadow modules/
from known_answers import CELLS, Cell, Generator  # noqa: E402

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
    """The samplers compared, as ``search.strategy.make_sampler`` makes them; ``evolution:beta=2,n_children=16`` tries
    the default strategy with other settings."""
    if name.startswith("evolution:"):
        options = dict(kv.split("=") for kv in name.partition(":")[2].split(",") if kv)
        return EvolutionSampler(space, seed=seed, **{k: type(getattr(EvolutionSampler(space), k))(v)
                                                     for k, v in options.items()})
    return driver_sampler(name, seed, budget, space)


def run_search(space: SearchSpace, sampler: optuna.samplers.BaseSampler, objective, n_trials: int,
               workers: int = 1, timed=None) -> list[tuple[float, float]]:
    """(mAP, latency) of each counted trial in completion order, driven like ``search.engine.driver`` drives a study.
    The study is told what ``objective`` returns; the run records its noise-free values (``objective.true``) when
    it has them, so a noisy objective is scored on the truth. ``timed(number, seconds)`` hears how long each
    proposal (ask and suggest) took."""
    truth = getattr(objective, "true", objective)
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
                started = time.perf_counter()
                trial = study.ask()
                try:
                    candidate = space.suggest(trial)
                except optuna.TrialPruned:
                    study.tell(trial, state=TrialState.PRUNED)
                    continue
                if timed is not None:
                    timed(trial.number, time.perf_counter() - started)
                trial.set_user_attr("candidate_hash", candidate.hash)
                told = done.get(candidate.hash) or (objective(candidate), truth(candidate))
                in_flight.append((trial, candidate.hash, told))
            trial, h, (values, true) = in_flight.pop(0)
            study.tell(trial, list(values))
            done[h] = (values, true)
            results.append(true)
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
               cache: Path | None, cell: Cell | None = None) -> tuple[list[tuple[float, float]], float]:
    """One sampler's run on one seed's objective (``cell``: a generator of the family; None: ``KnownObjective``)
    and its seconds, read from ``cache`` when it holds it (the baselines do not change while the default strategy
    is developed, so only its runs need computing again)."""
    tag = f"{cell.label}-" if cell else ""
    path = cache / f"{tag}{which}-{name}-seed{seed}-t{n_trials}-w{workers}.json" if cache else None
    if path is not None and path.is_file():
        stored = json.loads(path.read_text())
        return [tuple(v) for v in stored["run"]], stored["seconds"]
    t0 = time.perf_counter()
    objective = Generator(cell.shape, seed, space, cell.noisy) if cell else KnownObjective(seed)
    run = run_search(space, make_sampler(name, space, seed, n_trials), objective, n_trials, workers)
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run": run, "seconds": seconds}))
    return run, seconds


def _median_trials(needed: list[int | None], n_trials: int) -> str:
    med = statistics.median([n if n is not None else math.inf for n in needed])
    return f"{med:g}" if med < math.inf else f">{n_trials}"


def compare(space: SearchSpace, label: str, samplers: list[str], seed_list: list[int], n_trials: int, workers: int,
            which: str = "", cache: Path | None = None, cell: Cell | None = None) -> dict:
    """Run every sampler on every seed's objective; print and return the table (per sampler: hypervolume and regret
    per checkpoint and seed, trials to reach random's median 50-trial hypervolume, regret ratio to random)."""
    runs: dict[str, list[list[tuple[float, float]]]] = {s: [] for s in samplers}
    seconds = {s: 0.0 for s in samplers}
    seeds = len(seed_list)
    for seed in seed_list:
        for name in samplers:
            run, spent = cached_run(space, which, name, seed, n_trials, workers, cache, cell)
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
    print(f"{'sampler':<10}{head}  reach rnd@{last}  paired  regret/rnd  s/run")
    table = {"hv": hv, "regret": regret, "reach": {}, "ratio": {}, "seconds": {}}
    for s in samplers:
        cells = "".join(f"  {median_iqr(hv[s][k]):<19} {median_iqr(regret[s][k]):<19}" for k in hv[s])
        reach = paired = "-"
        if target:
            needed = [trials_to_reach(r, target[0], boxes[i]) for i, r in enumerate(runs[s])]
            reach = _median_trials(needed, n_trials)
            # Paired: each seed's own random 50-trial hypervolume as the target.
            needed = [trials_to_reach(r, hv["random"][last][i], boxes[i]) for i, r in enumerate(runs[s])]
            paired = _median_trials(needed, n_trials)
        ratio = (statistics.median(regret[s][last]) / statistics.median(regret["random"][last])
                 if "random" in regret and statistics.median(regret["random"][last]) > 0 else float("nan"))
        print(f"{s:<10}{cells}  {reach:>12}  {paired:>6}  {ratio:10.2f}  {seconds[s] / seeds:5.2f}")
        table["reach"][s], table["ratio"][s], table["seconds"][s] = reach, ratio, seconds[s] / seeds
    return table


def load_space(which: str) -> tuple[SearchSpace, str]:
    if which == "two-modules":
        return build_space(load_base("yolov8n.yaml"), SpaceConfig.from_dict(TWO_MODULES)), "yolov8n, CGA+CoT only"
    if which.endswith((".yaml", ".yml")) and Path(which).is_file():
        return build_space(load_base("yolov8n.yaml"), SpaceConfig.load(which)), f"yolov8n, space {which}"
    return build_space(load_base(f"{which}.yaml")), f"{which}, default space"


PROXY_STUDY = "proxy"


def proxy_run(out: Path, sampler: str, seed: int, args: argparse.Namespace) -> dict:
    """One real ``search.run`` study in its own ``--out``; returns its ``summary.json``. A finished study is not
    trained again (re-running the same command only prints its front), so an interrupted bench resumes."""
    if not (out / PROXY_STUDY / "summary.json").is_file() or args.proxy_rerun:
        out.mkdir(parents=True, exist_ok=True)
        _share_built(out.parent, out)
        cmd = [sys.executable, "-m", "search.run", "--out", str(out), "--study-name", PROXY_STUDY,
               "--sampler", sampler, "--seed", str(seed), "--budget", str(args.budget), "--rungs", args.rungs,
               "--confirm-seeds", str(args.confirm_seeds), "--imgsz", str(args.imgsz), "--fraction", args.fraction,
               "--base-epochs", str(args.base_epochs), "--workers", str(args.workers), "--data", args.data,
               *args.extra]
        print(f"[{sampler} seed {seed}] {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        log = out / "search.log"
        with open(log, "w") as f:  # each run starts its own local Ray (search.run without --ray-address)
            rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        if rc != 0:
            raise SystemExit(f"search.run exited with {rc} for {sampler} seed {seed}: see {log}")
        print(f"[{sampler} seed {seed}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((out / PROXY_STUDY / "summary.json").read_text())


def _share_built(root: Path, out: Path) -> None:
    """Hard-link the built-in data and the trained bases of an earlier run into ``out``: every run of a seed
    trains the same base (the cache is keyed by base, data and schedule), which need not be trained again."""
    for name in (".data", ".cache"):
        if (out / name).exists():
            continue
        earlier = next((d / name for d in sorted(root.iterdir()) if d != out and (d / name).is_dir()), None)
        if earlier is not None:
            shutil.copytree(earlier, out / name, copy_function=os.link)


def _confirmed_points(summary: dict) -> tuple[list[tuple[float, float]], tuple[float, float], float]:
    """(mAP, latency) of the exported front on the seed means when confirmed, the base's, and the epochs spent."""
    names = [o["name"] for o in summary["objectives"]]
    if len(names) != 2 or summary["objectives"][0]["direction"] != "maximize":
        raise SystemExit(f"--objective proxy compares (mAP, latency) studies, this one has {names}")

    def values(row: dict) -> tuple[float, float]:
        return tuple(float(row.get(f"{n}_mean", row[n])) for n in names)

    base_row = next((r for r in summary["pareto"] if r["trial"] == summary["base_trial"]["trial"]),
                    summary["base_trial"])  # the base is the fastest network, so on the front with its seed mean
    epochs = (summary.get("fidelity") or {}).get("epochs", {})
    return ([values(r) for r in summary["pareto"]], values(base_row),
            float(epochs.get("spent_on_candidates", 0)) + float(epochs.get("confirmation", 0)))


def proxy_hv(points: list[tuple[float, float]], base: tuple[float, float], factor: float) -> float:
    """Hypervolume of (mAP, latency / base latency) points above the base's mAP and below ``factor`` x its latency,
    in mAP points x base latencies (the base's own point adds nothing: it is the reference's corner)."""
    losses = np.array([[-m, lat / base[1]] for m, lat in points])
    return 100.0 * loss_hypervolume(losses, np.array([-base[0], factor]))


def compare_proxy(args: argparse.Namespace) -> dict:
    """Default strategy vs ``random`` (or ``--samplers``) on real trainings; prints and returns the table."""
    root = args.out
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results: dict[str, list[tuple[list, tuple, float]]] = {s: [] for s in args.samplers}
    for seed in seeds:
        for name in args.samplers:
            results[name].append(_confirmed_points(proxy_run(root / f"{name}-seed{seed}", name, seed, args)))
    # One reference per seed for every sampler: the base's mean over the runs (the same network, trained alike).
    refs = [tuple(statistics.fmean(results[s][i][1][k] for s in args.samplers) for k in (0, 1))
            for i in range(len(seeds))]
    hv = {s: [proxy_hv(results[s][i][0], refs[i], args.latency_factor) for i in range(len(seeds))]
          for s in args.samplers}
    print(f"\nproxy: {args.data}, budget {args.budget}, rungs {args.rungs}, "
          f"{args.confirm_seeds} confirmation seed(s), imgsz {args.imgsz}, fraction {args.fraction}, "
          f"extra {args.extra or '-'}; seeds {seeds}")
    print(f"hypervolume of the confirmed front above the base's mAP and below {args.latency_factor:g}x its latency "
          f"(mAP points x base latencies)")
    print(f"{'sampler':<12}{'HV median':>10}  {'per seed':<28}{'front':>6}  {'epochs':>7}  best mAP (gain over base)")
    for s in args.samplers:
        fronts = [len(r[0]) for r in results[s]]
        gains = [max(m for m, _ in r[0]) - ref[0] for r, ref in zip(results[s], refs)]
        per_seed = " ".join(f"{v:.3f}" for v in hv[s])
        print(f"{s:<12}{statistics.median(hv[s]):>10.3f}  {per_seed:<28}{statistics.median(fronts):>6g}  "
              f"{statistics.median(r[2] for r in results[s]):>7g}  {statistics.median(gains):+.4f}")
    return hv


def proposal_cost(space: SearchSpace, sampler_name: str, trials: int, seed: int = 0) -> list[tuple[int, float]]:
    """Seconds the sampler takes to propose trial n (ask + suggest), at every 25th trial up to ``trials``, on the
    additive generator: the cost a study pays between a free worker and its next training."""
    costs = []

    def note(number: int, spent: float) -> None:
        if (number + 1) % 25 == 0:
            costs.append((number + 1, spent))
            print(f"  proposal {number + 1}: {spent:.2f} s", flush=True)

    run_search(space, make_sampler(sampler_name, space, seed, trials), Generator("additive", seed, space), trials,
               timed=note)
    return costs


def family(args: argparse.Namespace) -> int:
    """Every cell of the generator family on every space: the tables, then per sampler the summary the issue's
    targets read (regret ratio to random and trials to reach random's 50-trial hypervolume per cell × space)."""
    cells = [c for c in CELLS if not args.family or c.label in args.family]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    rows = []
    for cell in cells:
        for which in args.bases:
            space, label = load_space(which)
            table = compare(space, f"[{cell.label}] {label}", args.samplers, seeds, args.trials, args.workers, which,
                            args.cache, cell)
            for s in args.samplers:
                if s == "random":
                    continue
                regret = table["regret"][s][args.trials]
                rnd = table["regret"]["random"][args.trials]
                rows.append({"cell": cell.label, "space": which, "sampler": s, "ratio": table["ratio"][s],
                             "reach": table["reach"][s], "seeds_worse": sum(a > b for a, b in zip(regret, rnd)),
                             "seconds_per_run": table["seconds"][s],
                             **{f"hv{k}": statistics.median(v) for k, v in table["hv"][s].items()},
                             **{f"rnd_hv{k}": statistics.median(v) for k, v in table["hv"]["random"].items()},
                             "regret": statistics.median(regret), "rnd_regret": statistics.median(rnd)})
    print(f"\nfamily summary: seeds {seeds[0]}-{seeds[-1]}, {args.trials} trials; regret ratio to random at "
          f"{args.trials} (target <= 0.8 per cell, <= 0.5 overall) and trials to reach random's median "
          f"{args.trials}-trial HV (target <= 25 on 2/3 of cells)")
    for s in sorted({r["sampler"] for r in rows}):
        mine = [r for r in rows if r["sampler"] == s]
        print(f"{s}:")
        for r in mine:
            print(f"  {r['cell']:<18} {r['space']:<12} ratio {r['ratio']:5.2f}  reach {r['reach']:>4}  "
                  f"seeds worse than random {r['seeds_worse']}/{len(seeds)}")
        ratios = [r["ratio"] for r in mine]
        fast = sum(r["reach"] != "-" and not r["reach"].startswith(">") and float(r["reach"]) <= 25 for r in mine)
        print(f"  overall: median ratio {statistics.median(ratios):.2f}; cells <= 0.8: "
              f"{sum(x <= 0.8 for x in ratios)}/{len(mine)}; cells worse than random (ratio > 1): "
              f"{sum(x > 1 for x in ratios)}; reach <= 25: {fast}/{len(mine)}")
    out = args.results or REPO / "bench" / "results" / f"search-family-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(),
                               "cpus": os.cpu_count(), "optuna": optuna.__version__, "seeds": seeds,
                               "trials": args.trials, "rows": rows}, indent=1))
    print(f"written {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objective", choices=["known", "proxy"], default="known",
                   help="known: the known-answer objective; proxy: real search.run studies (see the docstring)")
    p.add_argument("--family", nargs="*", metavar="CELL",
                   help="every generator of bench/known_answers.py, with and without noise (or only the CELLs named, "
                        "e.g. sparse mode+noise) on every --bases space; prints the family summary against the "
                        "issue's targets and writes --results")
    p.add_argument("--proposal-cost", type=int, metavar="N",
                   help="print the seconds one proposal takes at every 25th trial up to N (target: <= 1 s at 200)")
    p.add_argument("--results", type=Path,
                   help="family mode: the JSON to write [bench/results/search-family-DATE.json]")
    p.add_argument("--seeds", type=int, help="seeds per table [known: 20, proxy: 3]")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed ... first-seed+seeds-1 (tune on others)")
    p.add_argument("--cache", type=Path, help="folder that keeps each run (sampler, seed, space) for later tables")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--workers", type=int, default=1, help="trials in flight (proxy: search.run --workers)")
    p.add_argument("--samplers", nargs="+", help="[known: evolution tpe nsga2 random; proxy: evolution random]")
    p.add_argument("--bases", nargs="+", default=["yolov8n", "yolo11n", "two-modules"],
                   help="yolov8n, yolo11n (default spaces), two-modules, or a space YAML over yolov8n")
    proxy = p.add_argument_group("--objective proxy (search.run settings, the same for every sampler)")
    proxy.add_argument("--out", type=Path, default=Path("runs/bench-proxy"), help="one study folder per run below it")
    proxy.add_argument("--budget", type=int, default=50)
    proxy.add_argument("--rungs", default="1,3,9")
    proxy.add_argument("--confirm-seeds", type=int, default=1)
    proxy.add_argument("--imgsz", type=int, default=128)
    proxy.add_argument("--fraction", default="1.0")
    proxy.add_argument("--base-epochs", type=int, default=40)
    proxy.add_argument("--data", default="builtin:shapes-v3")
    proxy.add_argument("--latency-factor", type=float, default=2.0,
                       help="hypervolume reference latency, in base latencies [2]")
    proxy.add_argument("--proxy-rerun", action="store_true", help="run search.run again on finished studies")
    proxy.add_argument("extra", nargs="*", help="further search.run arguments (after --)")
    args = p.parse_args(argv)
    if args.objective == "proxy":
        args.seeds = args.seeds or 3
        args.samplers = args.samplers or ["evolution", "random"]
        compare_proxy(args)
        return 0
    args.seeds = args.seeds or 20
    if args.proposal_cost:
        for which in args.bases:
            print(f"{which}: seconds per proposal of {args.samplers[0] if args.samplers else 'evolution'}")
            proposal_cost(load_space(which)[0], (args.samplers or ["evolution"])[0], args.proposal_cost)
        return 0
    if args.family is not None:
        args.samplers = args.samplers or ["evolution", "random"]
        return family(args)
    args.samplers = args.samplers or ["evolution", "tpe", "nsga2", "random"]
    for which in args.bases:
        space, label = load_space(which)
        seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
        compare(space, label, args.samplers, seed_list, args.trials, args.workers, which, args.cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
