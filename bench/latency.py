"""Latency you can trust: today's meter against the new one, both in the same run, on a machine with a busy core.

    python bench/latency.py [--windows 8] [--busy-cores 1] [--out bench/results/latency-DATE.json]
    python bench/latency.py --table [--candidates 30]      # the table estimator against quiet paired timing
    python bench/latency.py --gate                         # the gate's per-batch cost on a real local Ray
    python bench/latency.py --statistics bench/results/latency-dev-windows-1thread-2026-12-07.json
                                                           # the statistics replayed on recorded windows

Six candidates (a CGA insertion, which starts as an exact identity, so it can only be slower than the base, and
five sampled from the default yolov8n space) at 640 px. First each is timed quietly (``--truth-pairs`` pairs of
the new settings, three windows; the median is the truth), then ``--busy-cores`` foreign processes spin for the
rest of the run and every candidate gets ``--windows`` windows of each meter, interleaved (today, new, today,
new, ...), so both see the same machine:

- today: the meter as it was (every core, 8 pairs, median of per-pair ratios, every window recorded);
- new: the defaults of ``search.latency.LatencySettings`` (one thread, lower-quartile ratio, windows accepted
  within ±2% with an A/A control, up to 3 windows).

Printed: per candidate and meter the median ratio over windows, its CV across windows, the error of the median
against the quiet truth, exclusive seconds per trial, and how often the identity insertion timed slower than the
base. Raw windows go to ``--out`` as they finish (JSON with machine, versions and date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402

import modules  # noqa: E402
import space  # noqa: E402
from search.latency import LatencySettings, paired_windows, prepare_reference  # noqa: E402
from bench.facts import machine_facts  # noqa: E402
from search.latency.backends import make_runner  # noqa: E402
from search.latency.window import best_window, cv  # noqa: E402

TODAY = LatencySettings(threads=0, warmup=1, runs=8, min_runs=6, statistic="pair_median", ci=0, tries=1)
NEW = LatencySettings()


def candidates(n_sampled: int = 5, seed: int = 0) -> list[tuple[str, object]]:
    from space.sample import sample_candidates

    base_space = space.build_space(space.load_base("yolov8n.yaml"))
    cga = space.make_candidate(base_space.base, {"N4": space.Placement("N4", "CGA", "insert", ())})
    sampled = [c for c, _ in sample_candidates(base_space, n=n_sampled, seed=seed, imgsz=64)]
    return [("N4:CGA (identity)", cga)] + [(c.describe()[:44], c) for c in sampled]


class Meter:
    """One meter's prepared runners: the base and every candidate, fused, at ``settings``' threads."""

    def __init__(self, settings: LatencySettings, cands: list[tuple[str, object]]) -> None:
        self.settings = settings
        self.threads = settings.threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(self.threads)
        base = space.make_candidate(space.load_base("yolov8n.yaml"))
        self.reference = prepare_reference(base, settings)
        self.runs = {}
        for name, c in cands:
            model = space.build_model(c).model.fuse(verbose=False).eval()
            self.runs[name] = make_runner(model, settings.backend, settings.device, settings.shape, False, self.threads)
            self.runs[name]()

    def trial(self, name: str, insert_only: bool) -> dict:
        """What the meter records for one trial: its windows (retries included) and the chosen one."""
        torch.set_num_threads(self.threads)
        windows = paired_windows(self.runs[name], self.reference.run, self.settings, insert_only=insert_only)
        chosen = best_window(windows)
        return {"ratio": chosen.ratio, "ci": [chosen.ci_low, chosen.ci_high], "accepted": chosen.accepted,
                "windows": [w.as_dict() for w in windows], "exclusive_s": sum(w.seconds for w in windows)}


def spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def windows_bench(args: argparse.Namespace) -> None:
    modules.register()
    cands = candidates(seed=args.seed)
    insert_only = {name: all(p.mode == "insert" for p in c.placements) for name, c in cands}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_facts(), "busy_cores": args.busy_cores, "today": TODAY.as_dict(),
              "new": NEW.as_dict(), "truth": {}, "trials": []}
    new = Meter(NEW, cands)
    truth_settings = LatencySettings(runs=args.truth_pairs, min_runs=args.truth_pairs, ci=0, tries=1)
    truth_meter = Meter(truth_settings, cands)
    print(f"{len(cands)} candidates; quiet truth: {args.truth_pairs} pairs x 3 windows, one thread", flush=True)
    for name, _ in cands:
        ratios = [truth_meter.trial(name, False)["ratio"] for _ in range(3)]
        record["truth"][name] = {"ratio": statistics.median(ratios), "windows": ratios}
        print(f"  {name:<46} truth {statistics.median(ratios):.4f}  (windows {', '.join(f'{r:.4f}' for r in ratios)})",
              flush=True)
    del truth_meter
    today = Meter(TODAY, cands)
    procs = spinners(args.busy_cores)
    t0 = time.time()
    try:
        time.sleep(2)
        for i in range(args.windows):
            for name, _ in cands:
                order = (("today", today), ("new", new))
                for label, meter in order if i % 2 == 0 else order[::-1]:
                    got = meter.trial(name, insert_only[name])
                    record["trials"].append({"meter": label, "candidate": name, "round": i, **got})
                    print(f"  [{time.time() - t0:5.0f} s] {label:<5} {name:<46} ratio {got['ratio']:.4f} "
                          f"[{got['ci'][0]:.4f}, {got['ci'][1]:.4f}] windows {len(got['windows'])} "
                          f"{'accepted' if got['accepted'] else 'CONTENDED'}", flush=True)
                    out.write_text(json.dumps(record))
                    time.sleep(args.gap)
    finally:
        for p in procs:
            p.kill()
    report(record)


def report(record: dict) -> None:
    """The table of a recorded run (also: ``--report FILE``)."""
    names = list(record["truth"])
    print(f"\n{record['machine']['cpu']}, {record['machine']['cores']} cores, torch {record['machine']['torch']}, "
          f"{record['busy_cores']} foreign busy core(s); {record['machine']['date']}")
    head = (f"{'candidate':<46}{'truth':>8} | {'today':>7}{'CV':>7}{'err':>7}{'excl s':>8} | "
            f"{'new':>7}{'CV':>7}{'err':>7}{'excl s':>8}{'acc':>6}")
    print(head + "\n" + "-" * len(head))
    summary = {"today": {"cv": [], "err": [], "excl": []}, "new": {"cv": [], "err": [], "excl": []}}
    for name in names:
        truth = record["truth"][name]["ratio"]
        cells = []
        for label in ("today", "new"):
            rows = [t for t in record["trials"] if t["meter"] == label and t["candidate"] == name]
            ratios = [t["ratio"] for t in rows]
            if not ratios:
                cells.append(" " * 29)
                continue
            med, spread = statistics.median(ratios), cv(ratios)
            err = med / truth - 1
            excl = statistics.fmean(t["exclusive_s"] for t in rows)
            summary[label]["cv"].append(spread)
            summary[label]["err"].append(abs(err))
            summary[label]["excl"].append(excl)
            acc = f"{sum(t['accepted'] for t in rows)}/{len(rows)}" if label == "new" else ""
            cells.append(f"{med:>7.4f}{spread:>7.1%}{err:>+7.1%}{excl:>8.2f}{acc:>6}")
        print(f"{name:<46}{truth:>8.4f} | {cells[0]} | {cells[1]}")
    identity = names[0]
    for label in ("today", "new"):
        rows = [t for t in record["trials"] if t["meter"] == label and t["candidate"] == identity]
        slower = sum(t["ratio"] > 1 for t in rows)
        s = summary[label]
        if s["cv"]:
            print(f"{label:<6} identity insertion slower than the base in {slower}/{len(rows)} trials; worst CV "
                  f"{max(s['cv']):.1%}, worst |err| {max(s['err']):.1%}, mean exclusive s per trial "
                  f"{statistics.fmean(s['excl']):.2f}")
    if summary["today"]["excl"] and summary["new"]["excl"]:
        ratio = statistics.fmean(summary["new"]["excl"]) / statistics.fmean(summary["today"]["excl"])
        print(f"exclusive time new / today: {ratio:.2f}x")


def table_bench(args: argparse.Namespace) -> None:
    """The table estimator's prediction against quiet paired timing of the same candidates."""
    import tempfile

    from search.latency import measure_latency
    from search.latency.table import BlockTable, predicted
    from space.sample import sample_candidates

    modules.register()
    base_space = space.build_space(space.load_base("yolov8n.yaml"))
    base = base_space.base
    cands = [c for c, _ in sample_candidates(base_space, n=args.candidates, seed=args.seed, imgsz=64)]
    settings = NEW
    torch.set_num_threads(settings.threads or len(os.sched_getaffinity(0)))
    reference = prepare_reference(space.make_candidate(base), settings)
    timed = lambda c: measure_latency(c, settings, 64, reference=reference)  # noqa: E731
    table = BlockTable(Path(tempfile.mkdtemp()) / "table.json")
    out = Path(args.out)
    rows = []
    t0 = time.time()
    for i, c in enumerate(cands):
        pred = predicted(c, base, table, timed)
        truth = timed(c)
        err = pred["ratio"] / truth.ratio - 1
        rows.append({"candidate": c.describe(), "placements": len(c.placements), "predicted": pred["ratio"],
                     "paired": truth.ratio, "paired_accepted": truth.accepted, "error": err,
                     "timed_for_table": pred["timed"]})
        print(f"  [{time.time() - t0:5.0f} s] {i:>2} {c.describe()[:60]:<60} table {pred['ratio']:.4f}  paired "
              f"{truth.ratio:.4f}  error {err:+.1%}", flush=True)
        out.write_text(json.dumps({"machine": machine_facts(), "settings": settings.as_dict(), "rows": rows}))
    errs = sorted(abs(r["error"]) for r in rows)
    multi = [abs(r["error"]) for r in rows if r["placements"] > 1]
    print(f"\ntable vs paired over {len(rows)} candidates: median |error| {statistics.median(errs):.1%}, worst "
          f"{errs[-1]:.1%} (targets 3% and 8%); over the {len(multi)} with several placements: median "
          f"{statistics.median(multi) if multi else float('nan'):.1%}; {len(table.costs)} blocks timed")


def compare_statistics(path: str, pairs: tuple[int, ...] = (6, 8, 12)) -> None:
    """Every statistic on recorded windows (the development data the default was chosen on): per condition and
    number of pairs, the error against the quiet truth (median of each candidate's quiet windows, 30 pairs, ratio
    of medians), the worst CV across a candidate's windows and how many windows pass the ±2% interval."""
    import numpy as np

    from search.latency.window import STATISTICS, estimate

    d = json.loads(Path(path).read_text())
    windows, names = d["windows"], d["cands"]
    truth = {n: statistics.median(estimate(w["ref"], w["cand_ms"], "median_ratio").ratio for w in windows
                                  if w["cand"] == n and w["cond"] == "quiet") for n in names}
    print(f"{path}: {len(windows)} windows; truth " + ", ".join(f"{n[:16]} {r:.4f}" for n, r in truth.items()))
    for cond in sorted({w["cond"] for w in windows}):
        chosen = [w for w in windows if w["cond"] == cond]
        print(f"\n{cond} ({len(chosen)} windows)\n{'statistic':<14}{'pairs':>6}{'|err| med':>11}{'p90':>8}{'max':>8}"
              f"{'worst CV':>10}{'±2% ok':>8}")
        for name in STATISTICS:
            for k in pairs:
                ests = [(w["cand"], estimate(w["ref"][:k + 1], w["cand_ms"][:k], name)) for w in chosen]
                errs = np.array([abs(e.ratio / truth[n] - 1) for n, e in ests])
                per = {n: [e.ratio for m, e in ests if m == n] for n in names}
                worst = max((cv(v) for v in per.values() if len(v) > 1), default=float("nan"))
                ok = np.mean([e.rel_half_width <= 0.02 for _, e in ests])
                print(f"{name:<14}{k:>6}{np.median(errs):>11.2%}{np.quantile(errs, 0.9):>8.2%}{errs.max():>8.2%}"
                      f"{worst:>10.2%}{ok:>8.0%}")


def gate_cost(batches: int = 2000) -> None:
    """Per-batch seconds of GateClient.checkpoint with the gate open (flag read) and closed-then-open (the actor
    round trip a training pays only while a window is open)."""
    import ray

    from search.engine.gate import DeviceGate, GateClient

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    try:
        gate = GateClient(DeviceGate.remote())

        @ray.remote(num_cpus=0)
        def training(gate: GateClient, batches: int) -> float:
            gate.enter("b")
            t0 = time.perf_counter()
            for _ in range(batches):
                gate.checkpoint("b")
            gate.leave("b")
            return (time.perf_counter() - t0) / batches

        open_s = ray.get(training.remote(gate, batches))
        gate.flag(ray.get_runtime_context().get_node_id()).set(True)  # actor open: each call returns at once
        closed_s = ray.get(training.remote(gate, batches // 4))
        gate.flag().set(False)
        print(f"gate per batch: open {open_s * 1e6:.1f} us (shared-memory flag), closed path {closed_s * 1e6:.0f} us")
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stamp = datetime.date.today().isoformat()
    ap.add_argument("--windows", type=int, default=8, help="trials of each meter per candidate under load")
    ap.add_argument("--busy-cores", type=int, default=1, help="foreign processes spinning throughout")
    ap.add_argument("--truth-pairs", type=int, default=30)
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between trials")
    ap.add_argument("--out", help="raw results (JSON) [bench/results/latency-windows-DATE.json]")
    ap.add_argument("--report", help="print the table of a recorded run and exit")
    ap.add_argument("--table", action="store_true", help="the table estimator against quiet paired timing")
    ap.add_argument("--candidates", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1, help="candidates' sampling seed (0 was used to choose the "
                    "statistic and the thread count: 1 and later are held out)")
    ap.add_argument("--gate", action="store_true", help="the gate's per-batch cost")
    ap.add_argument("--statistics", nargs="+", metavar="FILE", help="replay recorded development windows through "
                    "every statistic (bench/results/latency-dev-windows-*.json)")
    args = ap.parse_args()
    if args.statistics:
        for path in args.statistics:
            compare_statistics(path)
    elif args.report:
        report(json.loads(Path(args.report).read_text()))
    elif args.table:
        args.out = args.out or str(REPO / "bench" / "results" / f"latency-table-{stamp}.json")
        table_bench(args)
    elif args.gate:
        gate_cost()
    else:
        args.out = args.out or str(REPO / "bench" / "results" / f"latency-windows-{stamp}.json")
        windows_bench(args)


if __name__ == "__main__":
    main()
