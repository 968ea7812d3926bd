"""Does the proxy rank architectures like a longer training does? Kendall tau / Spearman rho, by hand.

    python bench/proxy_fidelity.py [--data builtin:shapes-v3] [--n 12] [--epochs 3] [--factor 5] [--starts inherit]
                                   [--train-arg lr0=0.001 ...] [--base-weights runs/…/base-weights.pt]
    python bench/proxy_fidelity.py --data builtin --rungs 1,3,9 --starts inherit   # the search's own rungs

Samples ``--n`` distinct architectures from the default space, trains each at the proxy schedule (``--epochs``)
and at a ``--factor`` times longer one, both from the base weights trained once (``--weights auto``) and from
scratch, and prints the four mAP50-95 columns with the rank correlations between proxy and long schedules, and
how many pairs the long schedule separates beyond seed noise (does the data tell these architectures apart at all?).
Trainings run ``--workers`` at a time in separate processes, one CPU thread each.

``--rungs 1,3,9``: the proxy is what the search's successive halving sees instead. Each architecture trains once on
the top rung's schedule, stopped at every rung (validated, checkpoint kept) and continued from its checkpoint to
the next, as a promoted candidate is, so the columns are its mAP at each rung of one training; the long schedule
is the top rung. Kendall tau of every lower rung against the top rung; seed noise and separated pairs at the top.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from search.training.data import check_data, safe_batch  # noqa: E402
from search.front.fidelity import kendall_tau_b, spearman_rho, tau_on_separated_pairs  # noqa: E402
from search.training.proxy import ProxySchedule, TrainJob, run_training  # noqa: E402
from search.settings import FINETUNE_TRAIN_ARGS, SCRATCH_TRAIN_ARGS, StudySettings, parse_train_args  # noqa: E402
from search.training.weights import STATE_FILE, WeightsPlan, prepare_base_weights  # noqa: E402
from space import build_space, load_base, to_yaml  # noqa: E402
from space.sample import sample_candidates  # noqa: E402


def _pool(workers: int) -> ProcessPoolExecutor:
    # Spawned, not forked: a forked child inherits the parent's thread pools (torch's, and polars', which
    # Ultralytics uses to read results.csv when it saves a checkpoint) in a locked state and can hang.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _run_all(train, tasks: list, workers: int, out: Path) -> dict[str, tuple]:
    """``train`` over ``tasks`` in ``workers`` processes: {run_dir: (mAP50-95 (a list with rungs), seconds, error)},
    a line printed as each finishes."""
    results = {}
    with _pool(workers) as pool:
        for run_dir, score, seconds, error in pool.map(train, tasks):
            results[run_dir] = (score, seconds, error)
            print(f"done {Path(run_dir).relative_to(out)}: mAP50-95 {score} in {seconds:.0f} s"
                  + (f" ({error})" if error else ""), flush=True)
    return results


def _job(cand, i: int, start: str, sched: ProxySchedule, run_dir: Path, data, weights, device: str) -> TrainJob:
    """The training of sampled architecture ``i`` (``cand``): from the base weights (``start`` inherit) or scratch."""
    return TrainJob(trial=i, candidate_hash=cand.hash, yaml_text=to_yaml(cand), data=str(data.yaml), schedule=sched,
                    run_dir=str(run_dir), device=device, base_layers=cand.base_layers,
                    weights=weights.state_path if start == "inherit" else None)


def _train(job: TrainJob) -> tuple[str, float | None, float, str | None]:
    result = run_training(job)
    return job.run_dir, result.map50_95, result.train_s, result.error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/datasets/coco128/coco128.yaml"),
                        help="Ultralytics dataset YAML, 'builtin' (the default built-in set) or builtin:NAME, "
                             "e.g. builtin:shapes-v2")
    parser.add_argument("--base", default="yolov8n.yaml")
    parser.add_argument("--n", type=int, default=12, help="architectures sampled")
    parser.add_argument("--seed", type=int, default=0)
    defaults = StudySettings()
    parser.add_argument("--epochs", type=int, default=defaults.proxy.epochs, help="proxy epochs")
    parser.add_argument("--factor", type=int, default=5, help="the long schedule is factor x epochs")
    parser.add_argument("--base-epochs", type=int, default=defaults.weights.base_epochs,
                        help="epochs of the base training (inheritance)")
    parser.add_argument("--base-weights", help="reuse this base-weights.pt (from an earlier run of this bench or a "
                                                "study) instead of training the base")
    parser.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides the search's default train arguments, as search.run's --train-arg does")
    parser.add_argument("--starts", default="inherit,scratch", help="which starts to compare [inherit,scratch]")
    parser.add_argument("--noise-seeds", type=int, default=2,
                        help="retrain the first architecture (inherited) with this many other seeds at both schedules "
                             "to measure seed noise [2]")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="Ultralytics device of every training: cpu, 0, … [cpu]")
    parser.add_argument("--rungs", help="epochs of the search's rungs, e.g. 1,3,9: one training per architecture, "
                                        "stopped and continued at each rung (replaces --epochs and --factor)")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-proxy-fidelity"))
    args = parser.parse_args()
    rungs = [int(r) for r in args.rungs.split(",")] if args.rungs else None
    if rungs:
        args.epochs, args.factor = rungs[-1], 1  # every training follows the top rung's schedule

    out = Path(args.out).resolve()  # Ultralytics puts a relative project under its own runs/ directory
    data = check_data(None if args.data == "builtin" else args.data, REPO / "runs" / ".data", 1.0)
    base = load_base(args.base)
    picked = [c for c, _ in sample_candidates(build_space(base), args.n, args.seed, imgsz=args.imgsz)]
    batch = safe_batch(data.train_used, args.batch)
    # The search's own defaults: candidates that inherit fine-tune, candidates from scratch train as the base does.
    schedules = {}
    given = dict(parse_train_args(args.train_arg))
    for start, start_args in (("inherit", FINETUNE_TRAIN_ARGS), ("scratch", SCRATCH_TRAIN_ARGS)):
        proxy = ProxySchedule(epochs=args.epochs, imgsz=args.imgsz, batch=batch, seed=args.seed,
                              train_args=tuple(sorted({**dict(start_args), **given}.items())))
        schedules[start] = {"proxy": proxy, "long": replace(proxy, epochs=args.epochs * args.factor)}
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    if args.base_weights:  # prepare_base_weights reuses a stored state, as --weights auto does on resume
        shutil.copyfile(args.base_weights, out / STATE_FILE)
    plan = WeightsPlan("auto", None, args.base_epochs, SCRATCH_TRAIN_ARGS)
    weights = prepare_base_weights(plan, base, data.nc, str(data.yaml), schedules["inherit"]["proxy"], out,
                                   threads=os.cpu_count() or 1, device=args.device)
    base_s = time.time() - t0
    print(f"base ready in {base_s:.0f} s (mAP50-95 {weights.info.get('base_map50_95')}); "
          f"{len(picked)} architectures sampled", flush=True)
    jobs = []
    starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    if rungs:
        return rung_table(args, rungs, picked, data, weights, {s: schedules[s]["proxy"] for s in starts}, out, t0)

    def job(i: int, start: str, sched: ProxySchedule, run_dir: Path) -> TrainJob:
        return _job(picked[i], i, start, sched, run_dir, data, weights, args.device)

    # One architecture at a time (its proxy, then its long schedule), with the seed-noise retrainings right after
    # architecture 0: a run stopped early (this bench takes hours on a shared CPU) has complete pairs and the noise
    # level in its progress lines instead of only proxy scores.
    for i in range(len(picked)):
        for start in starts:
            jobs += [job(i, start, sched, out / f"{start}-{name}" / f"{i:02d}") for name, sched in schedules[start].items()]
        if i == 0 and "inherit" in starts:  # seed noise: the same network and start, other seeds (order, augmentation)
            for k in range(1, args.noise_seeds + 1):
                for name, sched in schedules["inherit"].items():
                    jobs.append(job(0, "inherit", replace(sched, seed=args.seed + k),
                                    out / f"noise-{name}" / f"seed{args.seed + k}"))
    results = _run_all(_train, jobs, args.workers, out)
    wall = time.time() - t0

    def column(start: str, sched: str) -> list[float]:
        return [results[str(out / f"{start}-{sched}" / f"{i:02d}")][0] or 0.0 for i in range(len(picked))]

    cols = {f"{s}/{p}": column(s, p) for s in starts for p in ("proxy", "long")}
    print(f"data {data.describe()}; proxy {args.epochs} epochs vs {args.epochs * args.factor} at {args.imgsz} px; "
          + (f"base reused from {args.base_weights}" if args.base_weights else
             f"base trained {args.base_epochs} epochs in {base_s:.0f} s (mAP50-95 {weights.info['base_map50_95']})"))
    for start in starts:
        print(f"  {start}: {dict(schedules[start]['proxy'].train_args)}")
    print(f"{'#':>2}  {'hash':<16}  " + "  ".join(f"{k:>14}" for k in cols) + "  placements")
    for i, cand in enumerate(picked):
        print(f"{i:>2}  {cand.hash:<16}  " + "  ".join(f"{cols[k][i]:>14.4f}" for k in cols) + f"  {cand.describe()}")
    failed = [k for k, v in results.items() if v[2]]
    for start in starts:
        x, y = cols[f"{start}/proxy"], cols[f"{start}/long"]
        print(f"{start:>8}: Kendall tau {kendall_tau_b(x, y):+.3f}   Spearman rho {spearman_rho(x, y):+.3f}   "
              f"(proxy mAP spread {max(x) - min(x):.4f})")
    if "inherit" in starts and args.noise_seeds:
        noise = {}
        for sched in ("proxy", "long"):
            seeds = [cols[f"inherit/{sched}"][0]] + [
                results[str(out / f"noise-{sched}" / f"seed{args.seed + k}")][0] or 0.0
                for k in range(1, args.noise_seeds + 1)]
            noise[sched] = statistics.stdev(seeds)
            print(f"seed noise, architecture 0 inherited at the {sched} schedule: "
                  f"{', '.join(f'{v:.4f}' for v in seeds)} (sd {noise[sched]:.4f})")
        n_pairs = len(picked) * (len(picked) - 1) // 2
        long_scores = cols["inherit/long"]
        # The criterion: pairs whose long-schedule mAPs differ by more than 2 x the seed sd measured above
        # (sd over architecture 0's 1 + --noise-seeds long trainings; one architecture stands in for all).
        apart = sum(abs(long_scores[i] - long_scores[j]) > 2 * noise["long"]
                    for i in range(len(picked)) for j in range(i + 1, len(picked)))
        print(f"pairs (of {n_pairs}) whose long-schedule mAPs differ by more than 2 x seed sd "
              f"({2 * noise['long']:.4f}): {apart}")
        gap = 2 * 2 ** 0.5 * noise["long"]  # two noisy long scores differ by more than 2 sd of their difference
        tau, pairs = tau_on_separated_pairs(cols["inherit/proxy"], cols["inherit/long"], gap)
        print(f" inherit: Kendall tau {tau:+.3f} over the {pairs} of {n_pairs} pairs "
              f"whose long-schedule mAPs differ by more than {gap:.4f} (2 sd of seed noise)")
    compute = sum(v[1] for v in results.values())
    print(f"{len(jobs)} trainings, {len(failed)} failed; wall {wall:.0f} s, training compute {compute:.0f} s")


def train_through_rungs(jobs: list[TrainJob]) -> tuple[str, list[float | None], float, str | None]:
    """One training stopped at every rung and continued from its checkpoint (``jobs``: one per rung)."""
    scores, seconds, checkpoint = [], 0.0, None
    for job in jobs:
        result = run_training(replace(job, resume=checkpoint))
        seconds += result.train_s
        if result.error:
            return jobs[0].run_dir, scores + [None] * (len(jobs) - len(scores)), seconds, result.error
        scores.append(result.map50_95)
        checkpoint = result.extra.get("checkpoint")
    for ckpt in Path(jobs[0].run_dir).rglob("*.pt"):  # the finished training's rung checkpoints
        ckpt.unlink()
    return jobs[0].run_dir, scores, seconds, None


def rung_table(args, rungs: list[int], picked, data, weights, schedules: dict[str, ProxySchedule], out: Path,
               t0: float) -> None:
    """The --rungs variant: each architecture's mAP at every rung of one stopped-and-continued training."""
    def chain(i: int, start: str, sched: ProxySchedule, run_dir: Path) -> list[TrainJob]:
        one = _job(picked[i], i, start, sched, run_dir, data, weights, args.device)
        return [replace(one, stop_at=r) for r in rungs]

    chains = []
    for i in range(len(picked)):  # architecture 0's seed-noise trainings right after it, as above
        chains += [chain(i, start, sched, out / f"rungs-{start}" / f"{i:02d}") for start, sched in schedules.items()]
        if i == 0 and "inherit" in schedules:
            chains += [chain(0, "inherit", replace(schedules["inherit"], seed=args.seed + k),
                             out / "rungs-noise" / f"seed{args.seed + k}") for k in range(1, args.noise_seeds + 1)]
    results = _run_all(train_through_rungs, chains, args.workers, out)
    wall = time.time() - t0
    n_pairs = len(picked) * (len(picked) - 1) // 2
    print(f"data {data.describe()}; rungs {rungs} epochs at {args.imgsz} px, one training per architecture stopped "
          f"and continued at each rung")
    for start in schedules:
        cols = [[(results[str(out / f"rungs-{start}" / f"{i:02d}")][0][r] or 0.0) for i in range(len(picked))]
                for r in range(len(rungs))]
        print(f"{start}: {dict(schedules[start].train_args)}")
        print(f"{'#':>2}  {'hash':<16}  " + "  ".join(f"{f'rung {e} ep':>10}" for e in rungs) + "  placements")
        for i, cand in enumerate(picked):
            print(f"{i:>2}  {cand.hash:<16}  " + "  ".join(f"{col[i]:>10.4f}" for col in cols) + f"  {cand.describe()}")
        for r, e in enumerate(rungs[:-1]):
            print(f"{start:>8}: rung {e} vs top rung {rungs[-1]} epochs: Kendall tau {kendall_tau_b(cols[r], cols[-1]):+.3f}"
                  f"   Spearman rho {spearman_rho(cols[r], cols[-1]):+.3f}   (rung {e} mAP spread "
                  f"{max(cols[r]) - min(cols[r]):.4f})")
        if start == "inherit" and args.noise_seeds:
            seeds = [cols[-1][0]] + [results[str(out / "rungs-noise" / f"seed{args.seed + k}")][0][-1] or 0.0
                                     for k in range(1, args.noise_seeds + 1)]
            sd = statistics.stdev(seeds)
            top = cols[-1]
            apart = sum(abs(top[i] - top[j]) > 2 * sd for i in range(len(picked)) for j in range(i + 1, len(picked)))
            print(f"seed noise, architecture 0 at the top rung: {', '.join(f'{v:.4f}' for v in seeds)} (sd {sd:.4f})")
            print(f"pairs (of {n_pairs}) whose top-rung mAPs differ by more than 2 x seed sd ({2 * sd:.4f}): {apart}")
            gap = 2 * 2 ** 0.5 * sd
            tau, pairs = tau_on_separated_pairs(cols[0], top, gap)
            print(f" inherit: rung {rungs[0]} vs top Kendall tau {tau:+.3f} over the {pairs} of {n_pairs} pairs whose "
                  f"top-rung mAPs differ by more than {gap:.4f} (2 sd of seed noise)")
    failed = [k for k, v in results.items() if v[2]]
    compute = sum(v[1] for v in results.values())
    print(f"{len(chains)} trainings ({len(rungs)} rungs each), {len(failed)} failed; wall {wall:.0f} s, "
          f"training compute {compute:.0f} s")


if __name__ == "__main__":
    main()
