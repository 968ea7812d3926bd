"""The latency axis of a real search, before and after: what each meter recorded against a quiet re-timing.

    python bench/latency_search.py [--before de32920] [--budget 30] [--sample 10] [--out FILE]

Runs the same small search twice on this machine, one after the other, with nothing else running: first the code
at ``--before`` (a git worktree of this repository, the meter as it was), then this checkout. Both use the default
data, space and latency settings of their code; the proxy training is made cheap (``--search-arg`` defaults: no
inherited weights, one epoch at 64 px on a quarter of the images) so windows come often while trainings run, which
is the harder case for the meter. Then ``--sample`` completed trials of each study are timed again, quietly and
alone: one window of 30 pairs with that study's own thread count and statistic in each of ``--processes`` fresh
processes, their median being the truth (a ratio moves by up to ±3% between processes on this machine).

Printed per study: trials, recorded intervals within ±2%, |recorded / re-timed - 1| over the sample (target: all
within 3%), insert-only candidates recorded faster than the base, trials recorded contended, exclusive seconds per
trial, and (new meter) the A/A controls and foreign CPU seen in its windows. Raw results go to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

SEARCH_ARGS = ["--weights", "none", "--epochs", "1", "--imgsz", "64", "--fraction", "0.25", "--confirm-seeds", "0",
               "--no-export"]


def run_search(code: Path, out: Path, budget: int, extra: list[str]) -> float:
    """``python -m search.run`` from ``code`` (its own packages first on the path); returns the wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "search.run", "--budget", str(budget), "--out", str(out), "--study-name", "bench",
           *SEARCH_ARGS, *extra]
    t0 = time.time()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def recorded_trials(out: Path) -> tuple[list[dict], dict]:
    """The completed trials' latency attributes and the study's latency settings."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{out / 'bench' / 'study.db'}")
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("latency_ratio") is None:
            continue
        rows.append({"trial": t.number, "state": t.state.name, "params": t.params, "ratio": a["latency_ratio"],
                     "ci": [a.get("latency_ci_low"), a.get("latency_ci_high")], "placements": a.get("placements"),
                     "exclusive_s": a.get("latency_exclusive_s"), "contended": bool(a.get("latency_contended")),
                     "aa": a.get("latency_aa"), "windows": a.get("latency_windows", 1),
                     "foreign_cpu_s": a.get("latency_foreign_cpu_s"),
                     "insert_only": _insert_only(a.get("placements", ""))})
    return rows, study.user_attrs["attnas_settings"]["latency"]


def _insert_only(placements: str) -> bool:
    return placements not in ("", "base") and "(replace)" not in placements


def retime(rows: list[dict], latency: dict, sample: int, seed: int, processes: int) -> None:
    """Quiet re-timing of ``sample`` trials (in place: ``truth``), with the study's own timing settings: one window of
    30 pairs per trial in each of ``processes`` fresh processes, the median over them. Fresh processes, because on
    this machine a ratio measured in one process sits up to ±3% from the same ratio in another (memory layout),
    while windows in one process agree within about 1%."""
    pool = [r for r in rows if r["placements"] not in ("base", None)]
    chosen = random.Random(seed).sample(pool, min(sample, len(pool)))
    spec = json.dumps({"latency": latency, "trials": [r["params"] for r in chosen]})
    per_process = []
    for _ in range(processes):
        done = subprocess.run([sys.executable, __file__, "--retime-worker"], input=spec, capture_output=True,
                              text=True, check=True)
        per_process.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for i, row in enumerate(chosen):
        row["truth_windows"] = [ratios[i] for ratios in per_process]
        row["truth"] = statistics.median(row["truth_windows"])


def retime_worker() -> None:
    """One process of :func:`retime`: the trials on stdin, their ratios as one JSON line on stdout."""
    import optuna
    import torch

    import modules
    import space
    from search.latency import LatencySettings, measure_latency, prepare_reference

    spec = json.loads(sys.stdin.read())
    modules.register()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    known = {k: v for k, v in spec["latency"].items() if k in LatencySettings.__dataclass_fields__}
    settings = LatencySettings(**{**known, "runs": 30, "min_runs": 30, "ci": 0, "tries": 1,
                                  "statistic": known.get("statistic", "pair_median")})
    torch.set_num_threads(settings.threads or len(os.sched_getaffinity(0)))
    base_space = space.build_space(space.load_base("yolov8n.yaml"))
    reference = prepare_reference(space.make_candidate(base_space.base), settings)
    ratios = [measure_latency(base_space.suggest(optuna.trial.FixedTrial(params)), settings, 64,
                              reference=reference).ratio for params in spec["trials"]]
    print(json.dumps(ratios))


def report(record: dict) -> None:
    print(f"\n{record['machine']}; {record['date']}; budget {record['budget']}, search args {' '.join(SEARCH_ARGS)}")
    head = (f"{'meter':<8}{'trials':>7}{'wall s':>8}{'CI<=2%':>8}{'sample':>7}{'<=3%':>6}{'worst':>8}{'median':>8}"
            f"{'ins<base':>9}{'contended':>10}{'excl s':>8}")
    print(head + "\n" + "-" * len(head))
    for label in ("before", "after"):
        s = record.get(label)
        if not s:
            continue
        rows = s["trials"]
        narrow = sum(1 for r in rows if r["ci"][0] and (r["ci"][1] - r["ci"][0]) / (2 * r["ratio"]) <= 0.02)
        sampled = [r for r in rows if "truth" in r]
        errs = [abs(r["ratio"] / r["truth"] - 1) for r in sampled]
        below = sum(1 for r in rows if r["insert_only"] and r["ratio"] < 1)
        excl = statistics.fmean(r["exclusive_s"] for r in rows if r["exclusive_s"] is not None)
        print(f"{label:<8}{len(rows):>7}{s['wall_s']:>8.0f}{narrow:>5}/{len(rows):<2}{len(sampled):>7}"
              f"{sum(e <= 0.03 for e in errs):>6}{max(errs, default=float('nan')):>8.1%}"
              f"{statistics.median(errs) if errs else float('nan'):>8.1%}{below:>9}"
              f"{sum(r['contended'] for r in rows):>10}{excl:>8.2f}")
    after = record.get("after", {}).get("trials", [])
    aas = [r["aa"] for r in after if r.get("aa") is not None]
    if aas:
        within = sum(abs(a - 1) <= 0.02 for a in aas)
        foreign = statistics.median(r["foreign_cpu_s"] for r in after if r["foreign_cpu_s"] is not None)
        print(f"after: A/A controls median {statistics.median(aas):.4f}, within ±2% in {within}/{len(aas)}; "
              f"foreign CPU per window median {foreign:.3f} s; "
              f"windows per trial {statistics.fmean(r['windows'] for r in after):.2f}")
    if record.get("before") and record.get("after"):
        b = statistics.fmean(r["exclusive_s"] for r in record["before"]["trials"])
        a = statistics.fmean(r["exclusive_s"] for r in after)
        print(f"exclusive seconds per trial after / before: {a / b:.2f}x (target <= 1.5x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="de32920", help="commit of today's meter")
    ap.add_argument("--budget", type=int, default=30)
    ap.add_argument("--sample", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="where the studies go [a temporary directory]")
    ap.add_argument("--out", help=f"raw results [bench/results/latency-search-DATE.json]")
    ap.add_argument("--report", help="print the table of a recorded run and exit")
    ap.add_argument("--only", choices=("before", "after"), help="run one side (the other is kept from --out)")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes of the quiet re-timing")
    ap.add_argument("--retime", action="store_true", help="only re-time the sampled trials of --out again")
    ap.add_argument("--retime-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.retime_worker:
        retime_worker()
        return
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    out = Path(args.out or REPO / "bench" / "results" / f"latency-search-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from search.latency import device_model

    record = json.loads(out.read_text()) if out.is_file() else {}
    if args.retime:
        for label in ("before", "after"):
            if label in record:
                for row in record[label]["trials"]:
                    row.pop("truth", None)
                    row.pop("truth_windows", None)
                retime(record[label]["trials"], record[label]["latency_settings"], args.sample, args.seed,
                       args.processes)
                out.write_text(json.dumps(record, indent=1))
        report(record)
        return
    record.update({"machine": f"{device_model('cpu')}, {len(os.sched_getaffinity(0))} cores",
                   "date": datetime.datetime.now().isoformat(timespec="seconds"), "budget": args.budget,
                   "before_commit": args.before})
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-latency-search-"))
    work.mkdir(parents=True, exist_ok=True)
    worktree = work / "before-code"
    if args.only != "after" and not worktree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before], check=True,
                       stdout=subprocess.DEVNULL)
    try:
        for label, code in (("before", worktree), ("after", REPO)):
            if args.only and args.only != label:
                continue
            runs = work / f"{label}-runs"
            shutil.rmtree(runs, ignore_errors=True)
            print(f"{label}: search from {code} ...", flush=True)
            wall = run_search(code, runs, args.budget, [])
            rows, latency = recorded_trials(runs)
            print(f"{label}: {len(rows)} trials timed in {wall:.0f} s; re-timing {args.sample} quietly", flush=True)
            retime(rows, latency, args.sample, args.seed, args.processes)
            record[label] = {"wall_s": wall, "latency_settings": latency, "trials": rows}
            out.write_text(json.dumps(record, indent=1))
    finally:
        if worktree.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report(record)


if __name__ == "__main__":
    main()
