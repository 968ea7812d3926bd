"""Benchmark the default search: wall time, trial compute and engine overhead of ``python -m search.run``.

    python bench/default_run.py                      # the default run: --budget 50 on the built-in data
    python bench/default_run.py --budget 4 -- --epochs 5   # anything after -- goes to search.run

Runs the search in a fresh output directory, then reads the study back and prints a table: wall time, the base
training of ``--weights auto``, the worker time of the trials this run trained, the engine overhead
``1 − Σ trial compute / (wall × workers)``, per-trial times and the front.

What counts as compute: a trial occupies a worker for its ``train_s``. The latency meter times the next
candidates while the workers train (the driver works one trial ahead), and parks the trainings during each timed
loop, which uses every core: that parked time (``parked_s``, inside ``train_s``) is the meter's share of the
machine, so the latency seconds are not added a second time. The base training of ``--weights auto`` runs once,
in one process, before the pool starts: the engine overhead is that of the search after it (wall − base), and the
whole-command figure counts the base as one worker's compute (a second thread gains it nothing on small images).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from search import study as st  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="output directory (default: a fresh temporary one)")
    parser.add_argument("extra", nargs="*", help="further search.run arguments (after --)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="attnas-bench-"))
    cmd = [sys.executable, "-m", "search.run", "--budget", str(args.budget), "--workers", str(args.workers),
           "--out", str(out), "--study-name", "bench", *args.extra]
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO)
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"search.run exited with {rc}")
        return rc
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{out / 'bench' / 'study.db'}")
    trained = [t for t in study.trials if "train_s" in t.user_attrs and "reused_from" not in t.user_attrs]
    compute = [t.user_attrs["train_s"] for t in trained]
    parked = sum(t.user_attrs.get("parked_s", 0.0) for t in trained)
    latency = sum(t.user_attrs.get("latency_s", 0.0) for t in trained)
    span = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trained if t.datetime_complete]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    base_s = float(study.user_attrs.get("attnas_base_weights", {}).get("train_s", 0.0))  # --weights auto, once
    workers = args.workers
    objectives = st.objectives_of(study)
    front = st.pareto_trials(study, objectives)
    base_trial = next((t for t in complete if t.params.get("placement") == "none"), None)
    rows = [
        ("wall time (whole command)", f"{wall:.0f} s"),
        ("completed trials / trained / reused / failed",
         f"{len(complete)} / {len(trained)} / {sum('reused_from' in t.user_attrs for t in complete)} / "
         f"{sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials)}"),
        ("base training for --weights auto (once, one process)", f"{base_s:.0f} s"),
        ("Σ trial compute: worker time of the trained trials", f"{sum(compute):.0f} s"),
        ("  of which parked while the meter timed a candidate",
         f"{parked:.0f} s ({parked / max(sum(compute), 1e-9):.1%})"),
        ("Σ latency measurement (meter, overlapped with training)", f"{latency:.0f} s"),
        ("per trained trial: median compute / median ask-to-tell",
         f"{statistics.median(compute):.1f} s / {statistics.median(span):.1f} s" if compute else "-"),
        ("engine overhead 1 − Σ compute / ((wall − base) × workers)",
         f"{1 - sum(compute) / ((wall - base_s) * workers):.1%}"),
        ("idle share of the whole command 1 − (Σ compute + base) / (wall × workers)",
         f"{1 - (sum(compute) + base_s) / (wall * workers):.1%}"),
        ("latency spread within a measurement: median of IQR / median",
         f"{statistics.median(t.user_attrs['latency_iqr_ms'] / t.user_attrs['latency_ms'] for t in trained):.1%}"
         if trained else "-"),
        ("Pareto points", f"{len(front)}"),
    ]
    for i, o in enumerate(objectives):
        rows.append((f"base {o.name} / spread over the completed trials (min..max)",
                     f"{o.show(base_trial.values[i] if base_trial else None)} / "
                     f"{o.show(min(t.values[i] for t in complete))}..{o.show(max(t.values[i] for t in complete))}"
                     if complete else "-"))
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    print("\nPareto front:")
    for t in front:
        values = "  ".join(f"{o.name} {o.show(v)}" for o, v in zip(objectives, t.values))
        print(f"  trial {t.number:>3}  {values}  {t.user_attrs.get('placements', '')}")
    print(f"\nstudy: {out / 'bench'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
