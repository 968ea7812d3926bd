"""The search on a real multi-node Ray cluster on localhost: placement over nodes, the one latency node, a node
without the dataset (its own mount namespace) and --ship-data, logical GPUs, and a worker node killed mid-training.

One cluster for the module (a head without CPUs, where the driver and the latency meter run, and worker raylets);
each search runs as a subprocess joined with --ray-address. Trainings are tiny (imgsz 64, 1 epoch, 8 images).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow
needs_mount_namespace = pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                           reason="the node without the dataset needs root and unshare")
REPO = Path(__file__).resolve().parents[1]
TINY = ["--imgsz", "64", "--epochs", "1", "--confirm-seeds", "0", "--fraction", "8,8", "--batch", "4",
        "--latency-imgsz", "64", "--latency-runs", "3", "--latency-ci", "0", "--latency-min-runs", "3", "--latency-warmup", "1",
        "--no-export"]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node: no trainings
    gpu_node = c.add_node(num_cpus=1, num_gpus=2)  # logical GPUs: CPU-only CI
    cpu_node = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    c.extra = {"gpu": gpu_node, "cpu": cpu_node, "procs": {}}
    yield c
    ray.shutdown()
    for proc in c.extra["procs"].values():
        _kill_group(proc.pid)
    c.shutdown()


def _node_ids(c) -> dict[str, str]:
    return {name: c.extra[name].node_id for name in ("gpu", "cpu")}


def _start_node_without(c, hidden: Path, num_cpus: int = 1) -> subprocess.Popen:
    """A worker raylet in its own mount namespace, where ``hidden`` is an empty directory: a node without the data."""
    empty = Path(f"/tmp/attnas-empty-{os.getpid()}")
    empty.mkdir(exist_ok=True)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    script = (f"mount --bind {empty} {hidden} && exec {ray_cli} start --address={c.address} --num-cpus={num_cpus} "
              "--block --disable-usage-stats")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    known = {n["NodeID"] for n in _alive(c)}
    deadline = time.time() + 60
    while time.time() < deadline:
        new = {n["NodeID"] for n in _alive(c)} - known
        if new:
            c.extra["procs"][new.pop()] = proc
            return proc
        time.sleep(0.5)
    pytest.fail("the worker node in its own mount namespace did not join")


def _alive(c) -> list[dict]:
    import ray

    if not ray.is_initialized():  # this process watches the nodes as a driver of the cluster
        ray.init(address=c.address, log_to_driver=False)
    return [n for n in ray.nodes() if n["Alive"]]


def _kill_node(c, node_id: str) -> None:
    """Kill a worker node at once (no graceful stop): a raylet of the Cluster, or a `ray start` process group."""
    if node_id in c.extra["procs"]:
        _kill_group(c.extra["procs"].pop(node_id).pid)
        return
    node = next(c.extra[name] for name in ("gpu", "cpu") if c.extra[name].node_id == node_id)
    c.remove_node(node, allow_graceful=False)


def _search(c, out: Path, coco128: Path, *extra: str, env: dict | None = None, timeout: float = 240):
    cmd = [sys.executable, "-m", "search.run", "--out", str(out), "--data", str(coco128 / "coco128.yaml"),
           "--ray-address", c.address, "--study-name", "s", *TINY, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    return proc


def _wait(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 's' / 'study.db'}")
    return study.get_trials(deepcopy=False)


def test_half_gpus_run_four_trainings_at_once_each_on_its_device(cluster, tmp_path, monkeypatch):
    """--gpus-per-trial 0.5 on a node with 2 logical GPUs: four trainings that hang once started (a test fault)
    are all running at once, two on each GPU, each told the GPU Ray gave it (trained on CPU by the test switch)."""
    import ray

    from search.engine.executor import Executor
    from search.settings import RunSettings
    from search.latency import LatencySettings
    from search.training.proxy import ProxySchedule, TrainJob

    ray.shutdown()  # the Executor joins the cluster itself
    monkeypatch.setenv("ATTNAS_GPU_AS_CPU", "1")
    pool = RunSettings(workers=4, cpus_per_trial=0.25, gpus_per_trial=0.5, ray_address=cluster.address)
    executor = Executor(pool, LatencySettings())
    try:
        schedule = ProxySchedule(epochs=1, imgsz=64, batch=4)
        for n in range(4):
            executor.submit_train(n, TrainJob(trial=n, candidate_hash="x", yaml_text="", data="unused",
                                              schedule=schedule, run_dir=str(tmp_path / str(n)), device="0",
                                              fault="hang"))
        deadline = time.time() + 120
        while len(markers := sorted(tmp_path.glob("*/node-0-*.json"))) < 4 and time.time() < deadline:
            assert not executor.wait(0.5), "a hanging training ended"
        placed = [json.loads(m.read_text()) for m in markers]
        assert len(placed) == 4
        assert {p["node_id"] for p in placed} == {_node_ids(cluster)["gpu"]}
        for p in placed:
            assert p["device"].startswith("cpu (ATTNAS_GPU_AS_CPU=1; gpu ids"), p["device"]
            assert p["device"].endswith(f"CUDA_VISIBLE_DEVICES={p['gpu_ids'][0]})"), p["device"]
        assert sorted(p["gpu_ids"][0] for p in placed) == ["0", "0", "1", "1"]  # two halves of each GPU, at once
    finally:
        executor.cancel_all()
        executor.shutdown()


@needs_mount_namespace
def test_a_node_without_the_dataset_is_named_ship_data_runs_and_a_killed_node_trial_reruns(cluster, tmp_path, coco128):
    t0 = time.time()
    _start_node_without(cluster, coco128)
    lacking = set(cluster.extra["procs"])
    result = _wait(_search(cluster, tmp_path / "refused", coco128, "--budget", "4"))
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "lacks the dataset" in lines[0] and next(iter(lacking))[:12] in lines[0], result.stderr
    assert "--ship-data" in lines[0]
    assert not (tmp_path / "refused" / "s" / "study.db").exists()
    t1 = time.time()

    # With --ship-data it runs; the worker node of the first training is killed mid-training: that trial runs
    # again on another node and the study completes, its trials spread over the nodes left, timed on the head.
    out = tmp_path / "shipped"
    proc = _search(cluster, out, coco128, "--budget", "4", "--workers", "2", "--cpus-per-trial", "1", "--ship-data",
                   "--weights", "none")
    victim, killed_trial = None, None
    deadline = time.time() + 180
    while victim is None and time.time() < deadline and proc.poll() is None:
        markers = sorted((out / "s").glob("trials/*/node-0-*.json"))
        if markers:  # the first training has started: kill its node
            victim, killed_trial = json.loads(markers[0].read_text())["node_id"], markers[0].parent
            _kill_node(cluster, victim)
        time.sleep(0.2)
    result = _wait(proc)
    assert victim is not None, "no training started"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "received it through Ray (--ship-data)" in result.stderr
    trials = _trials(out)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 4
    retried = [t for t in trials if t.user_attrs.get("retried_after")]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE, result.stderr[-2000:]
    assert retried[0].user_attrs["attempts"] == 2 and retried[0].user_attrs["node_id"] != victim
    assert json.loads((killed_trial / "node-1-0.json").read_text())["node_id"] != victim
    nodes = {t.user_attrs["node_id"] for t in done}
    assert len(nodes) >= 2 and victim not in nodes, nodes  # spread over the worker nodes left
    assert cluster.head_node.node_id not in nodes  # the head has no CPU for trainings
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 's' / 'study.db'}")
    assert study.user_attrs["attnas_latency_node"]["id"] == cluster.head_node.node_id  # every latency: the head
    assert study.user_attrs["attnas_settings"]["facts"]["latency"]["node"]
    assert all(t.user_attrs.get("latency_ms") for t in done)
    per_node = {n[:8]: sum(t.user_attrs["node_id"] == n for t in done) for n in nodes}
    print(f"refused in {t1 - t0:.0f} s; shipped search with a node killed: {per_node} trials per node in "
          f"{time.time() - t1:.0f} s")


def test_the_latency_meter_is_pinned_to_its_node_and_that_node_dying_stops_the_search_naming_it(cluster):
    import ray

    from search.engine.driver import SearchAborted
    from search.engine.executor import Executor
    from search.settings import RunSettings
    from search.latency import LatencySettings

    from search.errors import SearchError

    ray.shutdown()  # the Executor joins the cluster itself
    with pytest.raises(SearchError, match=r"--latency-node nowhere: names no alive node; nodes: .*node "):
        Executor(RunSettings(ray_address=cluster.address, latency_node="nowhere"), LatencySettings())
    node = cluster.add_node(num_cpus=0)  # meters need no CPU slot
    # Not Cluster.wait_for_nodes: it counts every live node, and the nodes of earlier tests (a `ray start` node, a
    # killed raylet) may still be alive or not yet declared dead.
    deadline = time.time() + 60
    while node.node_id not in cluster.global_state._live_node_ids():
        assert time.time() < deadline, "the latency node did not join"
        time.sleep(0.2)
    executor = Executor(RunSettings(workers=1, ray_address=cluster.address, latency_node=node.node_id[:16]),
                        LatencySettings())
    try:
        assert ray.get(executor.meter.identity.remote(), timeout=120)["node_id"] == node.node_id
        cluster.remove_node(node, allow_graceful=False)
        deadline = time.time() + 120
        while any(n["NodeID"] == node.node_id for n in _alive(cluster)) and time.time() < deadline:
            time.sleep(0.5)  # until Ray declares it dead: an orphaned meter process may answer a moment longer
        executor.submit_latency(0, None, 64)  # never runs: its meter's node is gone
        with pytest.raises(SearchAborted, match=f"the latency node .*{node.node_id[:12]}.* died"):
            while time.time() < deadline:
                executor.wait(1.0)
    finally:
        executor.shutdown()
