"""Latency you can trust: repeatability, ordering and cost of today's vs the paired measurement; backends; gate.

    python bench/latency.py [--minutes 10] [--repeats 5] [--imgsz 640]

Six candidates (five sampled from the default yolov8n space, plus a CGA insertion, which starts as an exact
identity) are each measured ``--repeats`` times in separate exclusive windows spread over ``--minutes``, with two
proxy trainings (Ultralytics on coco128 at 64 px, in subprocesses) running between the windows and stopped
(SIGSTOP, as the gate parks them) during each window. Per candidate and window, "today" is the candidate timed
alone (3 warm-up + 15 runs, median) and "paired" is the ratio to the base timed alternately in the same window
times the study reference (median of the first 5 base windows). The CGA candidate gets twice the windows, for the
ordering check (it must time slower than the base). Then: each candidate's torch vs onnxruntime latency in one
window each, and the gate's per-batch cost open and closed on a real local Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

TRAINING = """
import sys; sys.path.insert(0, {repo!r})
import modules; modules.register()
from ultralytics import YOLO
while True:
    YOLO("yolov8n.yaml").train(data={data!r}, imgsz=64, epochs=3, batch=8, workers=0, plots=False, val=False,
                               device="cpu", project={out!r}, name="t", exist_ok=True, verbose=False, amp=False)
"""


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else float("nan")


class Trainings:
    """Two proxy trainings in subprocesses; stopped while a window times, running between windows."""

    def __init__(self, out: Path) -> None:
        data = str(REPO.parent / "shared" / "datasets" / "coco128" / "coco128.yaml")
        code = TRAINING.format(repo=str(REPO), data=data, out=str(out))
        self.procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL) for _ in range(2)]

    def __enter__(self):
        for p in self.procs:
            p.send_signal(signal.SIGSTOP)
        return []

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()


def gate_cost(batches: int = 2000) -> tuple[float, float]:
    """Per-batch seconds of GateClient.checkpoint with the gate open (flag read) and closed-then-open
    (the flag says closed, so every batch makes the actor round trip the project paid before)."""
    import ray

    from search.executor import DeviceGate, GateClient

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
        return open_s, closed_s
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="spread the windows over at least this long")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-trainings", action="store_true")
    args = ap.parse_args()

    import torch

    import modules
    import space
    from search.latency import LatencySettings, prepare_reference, study_reference_ms, time_model
    from space.sample import sample_candidates

    modules.register()
    torch.manual_seed(0)
    base_space = space.build_space(space.load_base("yolov8n.yaml"))
    base = space.make_candidate(base_space.base)
    sampled = [c for c, _ in sample_candidates(base_space, n=5, seed=0, imgsz=64)]
    cga = space.make_candidate(base_space.base, {"N4": space.Placement("N4", "CGA", "insert", ())})
    cands = [("CGA@N4 (identity)", cga)] + [(c.describe()[:40], c) for c in sampled]
    models = {name: space.build_model(c).model.fuse(verbose=False).eval() for name, c in cands}
    base_model = space.build_model(base).model.fuse(verbose=False).eval()
    today = LatencySettings(imgsz=args.imgsz, warmup=3, runs=15, threads=args.threads)
    paired = LatencySettings(imgsz=args.imgsz, threads=args.threads)
    reference = prepare_reference(base_model, paired)

    schedule = [name for _ in range(args.repeats) for name, _ in cands] + [cands[0][0]] * args.repeats
    windows = 2 * len(schedule) + 2 * args.repeats  # today + paired per entry, and base alone (today) per repeat
    gap = max(0.0, args.minutes * 60 / windows - 1.0)
    print(f"{len(cands)} candidates, {windows} windows, {gap:.1f} s of training between windows, "
          f"torch {torch.__version__}, threads {paired.threads or len(os.sched_getaffinity(0))}", flush=True)
    trainings = None if args.no_trainings else Trainings(Path("/tmp") / f"bench-latency-{os.getpid()}")
    window = trainings or contextlib.nullcontext([])
    rec: dict[str, dict[str, list]] = {n: {"today": [], "ratio": [], "ref": [], "cost_today": [], "cost_paired": [],
                                          "base_today": []} for n, _ in cands}
    t_start = time.time()
    try:
        time.sleep(gap + 5)  # trainings start up
        for i, name in enumerate(schedule):
            # today's method: the base's own window, then the candidate's own window (the ordering compares them)
            if name == cands[0][0]:
                time.sleep(gap)
                rec[name]["base_today"].append(time_model(base_model, today, exclusive=lambda: window).median_ms)
            time.sleep(gap)
            r = time_model(models[name], today, exclusive=lambda: window)
            rec[name]["today"].append(r.median_ms)
            rec[name]["cost_today"].append(r.exclusive_s)
            time.sleep(gap)
            r = time_model(models[name], paired, reference, exclusive=lambda: window)
            rec[name]["ratio"].append(r.ratio)
            rec[name]["ref"].append(r.reference_ms)
            rec[name]["cost_paired"].append(r.exclusive_s)
            print(f"  [{time.time() - t_start:5.0f} s] {name:<42} today {rec[name]['today'][-1]:7.2f} ms   "
                  f"ratio {r.ratio:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}] n={r.n}  base {r.reference_ms:.2f} ms",
                  flush=True)
    finally:
        if trainings:
            trainings.stop()
    elapsed = time.time() - t_start
    refs = [v for n, _ in cands for v in rec[n]["ref"]]  # in schedule order per candidate; good enough to fix
    study_ref = study_reference_ms(refs, settle=5)
    print(f"\nRepeatability ({elapsed / 60:.1f} min, study reference {study_ref:.2f} ms = median of 5 base windows)")
    print(f"{'candidate':<42}{'windows':>8}{'today ms':>10}{'CV today':>10}{'paired ms':>11}{'CV paired':>11}"
          f"{'cost today s':>14}{'cost paired s':>15}")
    for name, _ in cands:
        d = rec[name]
        obj = [x * study_ref for x in d["ratio"]]
        print(f"{name:<42}{len(d['today']):>8}{statistics.median(d['today']):>10.2f}{cv(d['today']):>10.1%}"
              f"{statistics.median(obj):>11.2f}{cv(obj):>11.1%}{statistics.mean(d['cost_today']):>14.2f}"
              f"{statistics.mean(d['cost_paired']):>15.2f}")
    d = rec[cands[0][0]]
    slower_today = sum(c > b for c, b in zip(d["today"], d["base_today"]))
    print(f"\nOrdering: CGA@N4 (starts as the identity, so strictly more work) slower than the base in "
          f"{slower_today}/{len(d['base_today'])} repeats today, {sum(r > 1 for r in d['ratio'])}/{len(d['ratio'])} "
          f"paired")

    print("\nBackends (one paired window each, no trainings; ratio to the base on the same backend)")
    ort = LatencySettings(imgsz=args.imgsz, backend="onnxruntime", threads=args.threads)
    ort_ref = prepare_reference(base_model, ort)
    print(f"{'candidate':<42}{'torch ms':>10}{'x base':>8}{'ort ms':>10}{'x base':>8}{'ort/torch':>11}")
    for name, _ in cands:
        a = time_model(models[name], paired, reference)
        b = time_model(models[name], ort, ort_ref)
        print(f"{name:<42}{a.median_ms:>10.2f}{a.ratio:>8.3f}{b.median_ms:>10.2f}{b.ratio:>8.3f}"
              f"{b.median_ms / a.median_ms:>11.2f}")

    open_s, closed_s = gate_cost()
    print(f"\nGate per batch: open {open_s * 1e6:.1f} us (shared-memory flag), closed path {closed_s * 1e6:.0f} us "
          f"(actor round trip, what every batch paid before)")


if __name__ == "__main__":
    main()
