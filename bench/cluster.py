"""The same search on a multi-node Ray cluster and on local Ray: wall time and trials per node, by hand.

    python bench/cluster.py                          # 2 worker nodes of 1 CPU vs local Ray with 2 CPUs, budget 6
    python bench/cluster.py --nodes 3 --repeats 2 -- --epochs 3   # anything after -- goes to search.run

Starts a localhost cluster with ``ray.cluster_utils.Cluster`` (a head without CPUs, where the driver and the latency
meter run, and ``--nodes`` worker raylets of ``--cpus`` CPUs each), runs ``search.run --ray-address`` on it, and
the same search on local Ray with as many trainings at once; the two alternate ``--repeats`` times so that machine
load drifts hit both. Prints wall time and where each trial trained. All nodes share this machine's cores: the
figures show the work spreading over nodes and the cluster path's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "coco128" / "coco128.yaml"
TINY = ["--imgsz", "64", "--epochs", "1", "--confirm-seeds", "0", "--fraction", "16,16", "--batch", "4",
        "--latency-imgsz", "64", "--latency-runs", "5", "--weights", "none", "--no-export"]


def run_search(out: Path, budget: int, workers: int, extra: list[str], address: str | None) -> float:
    cmd = [sys.executable, "-m", "search.run", "--out", str(out), "--study-name", "bench", "--data", str(DATA),
           "--budget", str(budget), "--workers", str(workers), "--cpus-per-trial", "1", *TINY, *extra]
    if address:
        cmd += ["--ray-address", address]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"search failed ({'cluster' if address else 'local'}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - t0


def trials_per_node(out: Path) -> dict[str, int]:
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{out / 'bench' / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "train_s" in t.user_attrs]
    return dict(collections.Counter(t.user_attrs.get("node_id", "local")[:8] for t in done))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs of each worker node")
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="further search.run arguments (after --)")
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus)
    cluster.wait_for_nodes()
    workers = args.nodes * args.cpus
    walls: dict[str, list[float]] = {"cluster": [], "local": []}
    placed: dict[str, list[dict[str, int]]] = {"cluster": [], "local": []}
    try:
        with tempfile.TemporaryDirectory(prefix="attnas-bench-cluster-") as tmp:
            for r in range(args.repeats):
                order = ("cluster", "local") if r % 2 == 0 else ("local", "cluster")
                for setup in order:
                    out = Path(tmp) / f"{setup}-{r}"
                    address = cluster.address if setup == "cluster" else None
                    walls[setup].append(run_search(out, args.budget, workers, args.extra, address))
                    placed[setup].append(trials_per_node(out))
                    print(f"[{setup} {r}] {walls[setup][-1]:.1f} s, trials per node {placed[setup][-1]}", flush=True)
    finally:
        cluster.shutdown()
    print(f"\nbudget {args.budget}, {workers} trainings at once; cluster: {args.nodes} worker nodes x {args.cpus} CPU "
          "+ a head without CPUs (driver, latency meter); one machine")
    print(f"{'setup':8}  {'wall s (median)':>15}  {'runs':>4}  trials per node (each run)")
    for setup in ("local", "cluster"):
        print(f"{setup:8}  {statistics.median(walls[setup]):15.1f}  {len(walls[setup]):4d}  {placed[setup]}")
    ratio = statistics.median(walls["cluster"]) / statistics.median(walls["local"])
    print(f"cluster / local wall time: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
