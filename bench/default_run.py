"""Benchmark the default search against the defaults it replaced, in one bench run.

    python bench/default_run.py                       # asha (the defaults until 2026-12-07), then today's default
    python bench/default_run.py --only default        # just the default run
    python bench/default_run.py --budget 4 -- --imgsz 64   # anything after -- goes to every search.run
    python bench/default_run.py --variants default single  # today's default against the single-rung search
    python bench/default_run.py --variants default capped --out DIR --report --wall default=2353 --wall capped=1824
                                                      # describe a bench run's studies again (its printed walls)

Variants (``VARIANTS``), run one after the other under one fresh ``--out``; the first is the first study on the
data, so it trains the base of ``--weights auto`` and puts it in the base cache, and the later ones take it from
there:

- ``default``: today's defaults (``--rungs 1,3,9 --eta 3 --promotion capped --confirm-seeds 1``);
- ``asha``: the defaults until 2026-12-07, asynchronous promotion (``--promotion asha``); the 2026-12-07 bench run
  named it ``default`` and today's default ``capped``;
- ``single``: the behaviour before rungs, ``--epochs 3 --confirm-seeds 0`` (every candidate 3 epochs, no
  confirmation).

For each it prints wall time, the base training (or the cache hit), the time from the command's start to the first
candidate's training, Σ trial compute and the engine overhead, the epochs spent, the rung-to-rung Kendall τ and seed
sd the study reports of itself, the front (confirmed points on seed means) and the peak disk held by training
checkpoints (polled every second); compute counts the confirmation trainings too. Then, for each later study
against the first: the ratio of the search walls (base excluded), the whole-command walls (also as a first run:
plus the base the first study trained) and the hypervolume of each front against one reference: above the lower of
the bases' mAP, latency as a ratio to each study's own base (the bases are timed separately). ``--results FILE``
writes all of it with the machine and the library versions after each study.

What counts as compute: a trial occupies a worker for its ``train_s``. The latency meter times the next
candidates while the workers train and parks the trainings during each timed loop (``parked_s``, inside
``train_s``), so the latency seconds are not added a second time. The base training runs once, in one process,
before the pool starts: the engine overhead is that of the search after it (wall − base).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.facts import machine_facts  # noqa: E402
from search import objectives as obj  # noqa: E402
from search.front import confirm, pareto  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": [],  # the defaults of search.run: rungs 1,3,9, eta 3, capped promotion, one confirmation seed
    "asha": ["--promotion", "asha"],  # the defaults until 2026-12-07 (issue 21's "today")
    "capped": ["--promotion", "capped"],  # the lever that became the default (named in the 2026-12-07 bench run)
    "single": ["--epochs", "3", "--confirm-seeds", "0"],  # before rungs: one 3-epoch rung, no confirmation
}
DEFAULT_VARIANTS = ("asha", "default")


@dataclass
class Run:
    name: str
    wall: float
    started: float
    peak_checkpoint_bytes: int | None  # None: not watched (--report)
    search_wall: float = 0.0
    wall_from: str = "timed by this bench"


class CheckpointWatch(threading.Thread):
    """Polls the total size of the training checkpoints (``*.pt`` but the base weights) under a study directory."""

    def __init__(self, study_dir: Path) -> None:
        super().__init__(daemon=True)
        self.study_dir, self.peak, self.done = study_dir, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            total = 0
            for p in self.study_dir.rglob("*.pt"):
                if p.name != "base-weights.pt":
                    try:
                        total += p.stat().st_size
                    except FileNotFoundError:  # deleted between listing and stat
                        pass
            self.peak = max(self.peak, total)


def run_study(out: Path, name: str, workers: int, budget: int, extra: list[str]) -> tuple[Run, dict] | None:
    cmd = [sys.executable, "-m", "search.run", "--budget", str(budget), "--workers", str(workers), "--out", str(out),
           "--study-name", name, *VARIANTS[name], *extra]
    print("running:", " ".join(cmd), flush=True)
    watch = CheckpointWatch(out / name)
    watch.start()
    started = time.time()
    rc = subprocess.call(cmd, cwd=REPO)
    wall = time.time() - started
    watch.done.set()
    watch.join()
    if rc != 0:
        print(f"search.run exited with {rc}")
        return None
    run = Run(name, wall, started, watch.peak)
    return run, describe(run, out, workers)


def reported_study(out: Path, name: str, workers: int, wall: float | None = None) -> tuple[Run, dict]:
    """A study this bench ran before (--report): its wall as the bench printed it then (``wall``), else from its
    first trial's start to its summary's writing, which leaves out the seconds before the first trial (settings,
    Ray start); the peak disk was not watched."""
    study = load(out, name)
    started = min(t.datetime_start.timestamp() for t in study.trials if t.datetime_start is not None)
    if wall is not None:
        run = Run(name, wall, started, None, wall_from="the bench run's printed wall (--wall)")
    else:
        ended = (out / name / "summary.json").stat().st_mtime
        run = Run(name, ended - started, started, None, wall_from="first trial's start to summary.json")
    return run, describe(run, out, workers)


def load(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'study.db'}")


def describe(run: Run, out: Path, workers: int) -> dict:
    """Print one study's table; returns its numbers for the raw file."""
    study = load(out, run.name)
    summary = json.loads((out / run.name / "summary.json").read_text())
    trained = [t for t in study.trials if "train_s" in t.user_attrs and "reused_from" not in t.user_attrs]
    compute = [t.user_attrs["train_s"] for t in trained]  # each candidate's total over the rungs it trained
    confirming = sum(sum(e.get("train_s", [])) for e in confirm.recorded(study).values())
    parked = sum(t.user_attrs.get("parked_s", 0.0) for t in trained)
    base_info = study.user_attrs.get("attnas_base_weights", {})
    cached = base_info.get("source") == "cache"
    base_s = 0.0 if cached else float(base_info.get("train_s", 0.0))
    run.search_wall = run.wall - base_s
    # train_started is a candidate's last rung's start; the earliest over all candidates is the first training's.
    candidates = [t.user_attrs["train_started"] for t in study.trials
                  if t.params.get("placement") != "none" and "train_started" in t.user_attrs]
    timed_here = run.wall_from == Run.wall_from  # --report does not know when the command started
    first = min(candidates) - run.started if candidates and timed_here else float("nan")
    fidelity = summary.get("fidelity") or {}
    epochs = fidelity.get("epochs", {})
    taus = ", ".join(f"{r['from_epochs']}→{r['to_epochs']}: {r['kendall_tau']:+.2f} (n {r['candidates']})"
                     for r in fidelity.get("rung_kendall_tau", [])) or "-"
    states = summary["trials"]
    confirmed = summary["pareto_on"].startswith("seed means")
    rows = [
        ("wall time (whole command)", f"{run.wall:.0f} s"),
        ("trials by state", ", ".join(f"{k} {v}" for k, v in states.items())),
        ("base for --weights auto", "cache hit" if cached else f"trained, {base_s:.0f} s"),
        ("command start → first candidate training", f"{first:.0f} s"),
        ("Σ trial compute (worker time), of which parked",
         f"{sum(compute):.0f} s, {parked:.0f} s ({parked / max(sum(compute), 1e-9):.1%})"),
        ("Σ confirmation compute", f"{confirming:.0f} s"),
        ("median trial compute", f"{statistics.median(compute):.1f} s" if compute else "-"),
        ("engine overhead 1 − Σ compute / ((wall − base) × workers)",
         f"{1 - (sum(compute) + confirming) / (run.search_wall * workers):.1%}"),
        ("epochs: candidates + confirmation (all at top rung)",
         f"{epochs.get('spent_on_candidates')} + {epochs.get('confirmation')} "
         f"({epochs.get('all_at_top_rung')})"),
        ("Kendall τ between rungs", taus),
        ("seed sd of mAP (confirmed trials)",
         f"{fidelity['seed_sd']:.4f} (n {fidelity['seed_sd_from']})" if fidelity.get("seed_sd") is not None else "-"),
        ("front points" + (" (confirmed, on seed means)" if confirmed else " (single runs)"),
         str(len(summary["pareto"]))),
        ("  of which above the base by > 2 se",
         str(sum(bool(p.get("above_base_2se")) for p in summary["pareto"])) if confirmed else "-"),
        ("peak disk of training checkpoints",
         "not watched" if run.peak_checkpoint_bytes is None else f"{run.peak_checkpoint_bytes / 2**20:.1f} MiB"),
        ("final hypervolume (own reference point)", f"{summary['hypervolume']['final']:.4g}"),
    ]
    print(f"\n== {run.name} ({out / run.name})")
    record = {"variant": run.name, "flags": VARIANTS.get(run.name), "wall_s": round(run.wall, 1),
              "wall_from": run.wall_from, "search_wall_s": round(run.search_wall, 1), "base_train_s": round(base_s, 1),
              "first_candidate_s": None if first != first else round(first, 1),
              "compute_s": round(sum(compute), 1), "parked_s": round(parked, 1),
              "confirmation_s": round(confirming, 1), "trainings": len(compute), "epochs": epochs,
              "trials": states, "rung_kendall_tau": fidelity.get("rung_kendall_tau"),
              "seed_sd": fidelity.get("seed_sd"), "peak_checkpoint_mib":
                  None if run.peak_checkpoint_bytes is None else round(run.peak_checkpoint_bytes / 2**20, 1),
              "front": front_points(study), "pareto_on": summary["pareto_on"]}
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    print("front:")
    for p in summary["pareto"]:
        print("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items()
                              if k in ("trial", "mAP50-95", "mAP50-95_mean", "mAP50-95_sd", "latency_ms",
                                       "above_base_2se", "placements")))
    return record


def front_points(study: optuna.Study) -> dict:
    """The exported front and the base, on confirmed seed means where there are any, each objective measured
    against the base (latency as a ratio), so two studies' fronts compare: their bases are timed separately."""
    objectives = pareto.objectives_of(study)
    base = pareto.base_trial(study)
    rows = {c.trial.number: c for c in confirm.confirmed(study, objectives)}
    front = [c.trial for c in confirm.confirmed_front(objectives, list(rows.values()))] or \
        pareto.pareto_trials(study, objectives)

    def raw(t) -> tuple[float, ...]:  # a confirmed trial's means carry its re-measured latency, if any
        return rows[t.number].mean if t.number in rows else tuple(t.values)

    def values(t) -> list[float]:
        return [v if o.needs_training else v / raw(base)[i] for i, (o, v) in enumerate(zip(objectives, raw(t)))]

    return {"objectives": [o.name if o.needs_training else f"{o.name} / base" for o in objectives],
            "maximize": [o.maximize for o in objectives], "base": values(base) if base else None,
            "points": [{"trial": t.number, "values": values(t), "placements": t.user_attrs.get("placements")}
                       for t in front]}


def compare_fronts(records: list[dict]) -> dict:
    """Hypervolume of every study's front against one reference: the lowest base mAP of the studies (only what is
    above the base counts) and, for the measured objectives, 10 % beyond the worst ratio on any of the fronts."""
    fronts = [r["front"] for r in records]
    first = fronts[0]
    objectives = obj.parse([name.split(" / ")[0] for name in first["objectives"]])
    everything = [p["values"] for f in fronts for p in f["points"]] + [f["base"] for f in fronts if f["base"]]
    reference = []
    for i, o in enumerate(objectives):
        if o.needs_training:  # mAP: the lowest of the bases (each study confirms its own base)
            reference.append(min(f["base"][i] for f in fronts if f["base"]))
        else:
            reference.append(max(v[i] for v in everything) * 1.1)
    return {"reference": reference, "hypervolume": {
        r["variant"]: pareto.hypervolume([p["values"] for p in r["front"]["points"]], reference, objectives)
        for r in records}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=sorted(VARIANTS), help="run one of the studies")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(DEFAULT_VARIANTS),
                        help=f"the studies to run, in this order [{' '.join(DEFAULT_VARIANTS)}]")
    parser.add_argument("--out", help="output directory (default: a fresh temporary one)")
    parser.add_argument("--results", help="raw JSON file written after each study (machine, versions, numbers)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: describe and compare the --variants studies already under --out")
    parser.add_argument("--note", help="a sentence kept in the --results file (what the variants meant then)")
    parser.add_argument("--wall", action="append", default=[], metavar="NAME=SECONDS",
                        help="with --report: a study's whole-command wall as that bench run printed it")
    parser.add_argument("extra", nargs="*", help="further search.run arguments (after --)")
    args = parser.parse_args()
    walls = {name: float(seconds) for name, _, seconds in (w.partition("=") for w in args.wall)}
    if args.report and not args.out:
        parser.error("--report needs the --out of the bench run to describe")
    out = Path(args.out or tempfile.mkdtemp(prefix="attnas-bench-"))
    runs, records = {}, []
    raw = {"machine": machine_facts(), "budget": args.budget, "workers": args.workers, "extra": args.extra,
           "note": args.note, "studies": records}
    for name in ([args.only] if args.only else args.variants):
        done = reported_study(out, name, args.workers, walls.get(name)) if args.report else \
            run_study(out, name, args.workers, args.budget, args.extra)
        if done is None:
            return 1
        runs[name], record = done
        records.append(record)
        if len(records) > 1:
            raw["comparison"] = compare_fronts(records)
        if args.results:
            Path(args.results).write_text(json.dumps(raw, indent=1, default=str))
    first = next(iter(runs.values()), None)
    for name, run in list(runs.items())[1:]:  # each later study against the first, all from this bench run
        print(f"\n== {name} vs {first.name} (same bench run)")
        print(f"search wall, base excluded: {run.search_wall:.0f} s vs {first.search_wall:.0f} s, "
              f"ratio {run.search_wall / first.search_wall:.2f}")
        base_s = first.wall - first.search_wall  # the base the first study trained: a first run of this one pays it too
        print(f"whole command: {first.name} (the first study trains the base) {first.wall:.0f} s, {name} (base "
              f"from the cache) {run.wall:.0f} s; as a first run (+ the same base) {run.wall + base_s:.0f} s, "
              f"ratio {(run.wall + base_s) / first.wall:.2f}")
    if len(records) > 1:
        comparison = raw["comparison"]
        print(f"hypervolume of each front above the lowest base, one reference {comparison['reference']}: "
              + ", ".join(f"{k} {v:.4g}" for k, v in comparison["hypervolume"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
