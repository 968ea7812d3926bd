"""Does the proxy rank architectures like a longer training does? Kendall tau / Spearman rho, by hand.

    python bench/proxy_fidelity.py [--data builtin] [--n 12] [--epochs 3] [--factor 5] [--starts inherit]
                                   [--train-arg lr0=0.001 ...] [--base-weights runs/…/base-weights.pt]

Samples ``--n`` distinct architectures from the default space, trains each at the proxy schedule (``--epochs``)
and at a ``--factor`` times longer one, both from the base weights trained once (``--weights auto``) and from
scratch, and prints the four mAP50-95 columns with the rank correlations between proxy and long schedules.
Trainings run ``--workers`` at a time in separate processes, one CPU thread each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from search.data import check_data, safe_batch  # noqa: E402
from search.proxy import ProxySchedule, TrainJob, run_training  # noqa: E402
from search.run import IDENTITY_DEFAULTS, parse_train_args  # noqa: E402
from search.weights import STATE_FILE, WeightsPlan, prepare_base_weights  # noqa: E402
from space import build_space, load_base, make_candidate, to_yaml  # noqa: E402
from space.sample import sample_candidates  # noqa: E402


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean rank), as Spearman's rho needs."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (tie-corrected). Written out because scipy is not a dependency of this project."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx * dy > 0:
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom else float("nan")


def spearman_rho(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def _train(job: TrainJob) -> tuple[str, float | None, float, str | None]:
    result = run_training(job)
    return job.run_dir, result.map50_95, result.train_s, result.error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/datasets/coco128/coco128.yaml"),
                        help="Ultralytics dataset YAML, or 'builtin' for the shapes-v1 set")
    parser.add_argument("--base", default="yolov8n.yaml")
    parser.add_argument("--n", type=int, default=12, help="architectures sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=IDENTITY_DEFAULTS["epochs"], help="proxy epochs")
    parser.add_argument("--factor", type=int, default=5, help="the long schedule is factor x epochs")
    parser.add_argument("--base-epochs", type=int, default=IDENTITY_DEFAULTS["base_epochs"],
                        help="epochs of the base training (inheritance)")
    parser.add_argument("--base-weights", help="reuse this base-weights.pt (from an earlier run of this bench or a "
                                                "study) instead of training the base")
    parser.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides the search's default train arguments, as search.run's --train-arg does")
    parser.add_argument("--starts", default="inherit,scratch", help="which starts to compare [inherit,scratch]")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="Ultralytics device of every training: cpu, 0, … [cpu]")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-proxy-fidelity"))
    args = parser.parse_args()

    out = Path(args.out)
    data = check_data(None if args.data == "builtin" else args.data, REPO / "runs" / ".data", 1.0)
    base = load_base(args.base)
    picked = [c for c, _ in sample_candidates(build_space(base), args.n, args.seed, imgsz=args.imgsz)]
    train_args = parse_train_args(IDENTITY_DEFAULTS["train_arg"] + args.train_arg)  # the search's own defaults
    proxy = ProxySchedule(epochs=args.epochs, imgsz=args.imgsz, batch=safe_batch(data.train_used, args.batch), seed=args.seed, train_args=train_args)
    long = replace(proxy, epochs=args.epochs * args.factor)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    if args.base_weights:  # prepare_base_weights reuses a stored state, as --weights auto does on resume
        shutil.copyfile(args.base_weights, out / STATE_FILE)
    weights = prepare_base_weights(WeightsPlan("auto", None, args.base_epochs), base, data.nc, str(data.yaml), proxy,
                                   out, threads=os.cpu_count() or 1, device=args.device)
    base_s = time.time() - t0
    jobs = []
    starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    for start in starts:
        for sched_name, sched in (("proxy", proxy), ("long", long)):
            for i, cand in enumerate(picked):
                jobs.append(TrainJob(trial=i, candidate_hash=cand.hash, yaml_text=to_yaml(cand), data=str(data.yaml),
                                     schedule=sched, run_dir=str(out / f"{start}-{sched_name}" / f"{i:02d}"),
                                     weights=weights.state_path if start == "inherit" else None, device=args.device,
                                     base_layers=cand.base_layers))
    results: dict[str, tuple[float | None, float, str | None]] = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for run_dir, score, seconds, error in pool.map(_train, jobs):
            results[run_dir] = (score, seconds, error)
    wall = time.time() - t0

    def column(start: str, sched: str) -> list[float]:
        return [results[str(out / f"{start}-{sched}" / f"{i:02d}")][0] or 0.0 for i in range(len(picked))]

    cols = {f"{s}/{p}": column(s, p) for s in starts for p in ("proxy", "long")}
    print(f"data {data.describe()}; proxy {args.epochs} epochs vs {args.epochs * args.factor} at {args.imgsz} px, "
          f"{dict(train_args)}; "
          f"base trained {args.base_epochs} epochs in {base_s:.0f} s (mAP50-95 {weights.info.get('base_map50_95')})")
    print(f"{'#':>2}  {'hash':<16}  " + "  ".join(f"{k:>14}" for k in cols) + "  placements")
    for i, cand in enumerate(picked):
        print(f"{i:>2}  {cand.hash:<16}  " + "  ".join(f"{cols[k][i]:>14.4f}" for k in cols) + f"  {cand.describe()}")
    failed = [k for k, v in results.items() if v[2]]
    for start in starts:
        x, y = cols[f"{start}/proxy"], cols[f"{start}/long"]
        print(f"{start:>8}: Kendall tau {kendall_tau_b(x, y):+.3f}   Spearman rho {spearman_rho(x, y):+.3f}   "
              f"(proxy mAP spread {max(x) - min(x):.4f})")
    compute = sum(v[1] for v in results.values())
    print(f"{len(jobs)} trainings, {len(failed)} failed; wall {wall:.0f} s, training compute {compute:.0f} s")


if __name__ == "__main__":
    main()
