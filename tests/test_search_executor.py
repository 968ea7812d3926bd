"""Latency measurement and its isolation from training: the real DeviceGate actor on a real local Ray."""

import glob
import os
import time

import pytest
import ray

import space
import torch

from search.engine.executor import LatencyMeter
from search.engine.gate import DeviceGate, GateClient
from search.latency import LatencySettings, measure_latency


def test_latency_of_the_base_is_a_sane_distribution():
    base = space.make_candidate(space.load_base("yolov8n.yaml"))
    res = measure_latency(base, LatencySettings(imgsz=64, warmup=1, runs=5, threads=1), proxy_imgsz=64)
    assert res.error is None and res.n == 5 and res.threads == 1
    assert 0 < res.min_ms <= res.median_ms <= res.p90_ms and res.iqr_ms >= 0
    assert res.params == 3_157_200 and res.gflops == pytest.approx(8.7 * (64 / 640) ** 2, rel=0.05)


def test_an_invalid_candidate_is_an_error_not_an_exception():
    base = space.load_base("yolov8n.yaml")
    broken = space.make_candidate(base)
    broken = type(broken)(broken.base, broken.scale, {**broken.yaml, "head": broken.yaml["head"][:-1] + [
        [[15, 18, 21], 1, "Detect", ["nc", "oops"]]]}, broken.placements, "deadbeef")
    res = measure_latency(broken, LatencySettings(imgsz=64, runs=2), proxy_imgsz=64)
    assert res.error and res.error.startswith("invalid candidate") and res.median_ms is None


@pytest.fixture(scope="module")
def local_ray():
    before = set(glob.glob("/dev/shm/attnas-gate-*"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    yield
    ray.shutdown()
    for path in set(glob.glob("/dev/shm/attnas-gate-*")) - before:  # the gates' one-byte flags made here
        os.remove(path)


@pytest.mark.slow
def test_trainings_are_parked_while_the_gate_is_closed(local_ray):
    """Busy 'trainings' pass the gate at every step; while a measurement holds it, none takes a step."""
    gate = GateClient(DeviceGate.remote())
    node = ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0.5)
    def training(gate: GateClient, tag: str, seconds: float, start_after: float = 0.0) -> list[float]:
        time.sleep(start_after)  # a worker still starting up (importing torch) when the gate closes
        gate.enter(tag)
        steps, end = [], time.time() + seconds
        while time.time() < end:
            gate.checkpoint(tag)
            steps.append(time.time())
            time.sleep(0.01)  # one "batch"
        gate.leave(tag)
        return steps

    runs = [training.remote(gate, f"t{i}", 6.0) for i in range(2)]
    time.sleep(2.0)
    submitted = time.time()  # the late training cannot park before submitted + 1.5 s, however loaded the machine
    ray.get(gate.actor.expect.remote("late"))  # submitted by the driver (which waits for this), not started yet
    runs.append(training.remote(gate, "late", 3.0, start_after=1.5))
    not_parked = gate.close(node, 10.0)
    closed_at = time.time()
    assert closed_at - submitted >= 1.45, "the gate waits for a submitted training to start and park"
    time.sleep(1.0)  # the measurement
    opened_at = time.time()
    gate.open()
    steps = ray.get(runs)
    assert not_parked == []
    for s in steps:
        assert not [t for t in s if closed_at < t < opened_at], "a training stepped during the measurement"
        assert any(t > opened_at for t in s), "trainings resume when the gate opens"
    assert gate.close(node, 1.0) == [], "finished trainings are not waited for"
    gate.open()


def test_the_open_gate_is_passed_without_calling_the_actor(local_ray):
    """1000 batches through an open gate: no call reaches the actor (the per-batch cost is bench/latency.py's)."""
    gate = GateClient(DeviceGate.remote())

    @ray.remote(num_cpus=0)
    def training(gate: GateClient, batches: int) -> None:
        gate.enter("t")
        for _ in range(batches):
            gate.checkpoint("t")
        gate.leave("t")

    ray.get(training.remote(gate, 1000))
    assert ray.get(gate.actor.checkpoint_calls.remote()) == 0
    # Closed, the same client asks the actor (which parks it): the fast path is only the open one.
    node = ray.get_runtime_context().get_node_id()
    gate.flag(node).set(True)
    ray.get(training.remote(gate, 3))
    gate.flag(node).set(False)
    assert ray.get(gate.actor.checkpoint_calls.remote()) == 3


def test_a_gpu_meter_parks_only_the_trainings_on_its_gpu_a_cpu_meter_all_on_its_node(local_ray):
    """The gate is keyed by (node, device): timing on GPU 1 parks the training Ray gave GPU 1, not the one on GPU 0
    or a CPU training on the same node; timing on the CPU waits for every training on the node."""
    actor = DeviceGate.remote()
    node = ray.get_runtime_context().get_node_id()
    for tag, gpus in (("gpu0", ("0",)), ("gpu1", ("1",)), ("cpu", ())):
        ray.get(actor.enter.remote(tag, node, gpus))
    assert ray.get(actor.close.remote(node, 0.3, "1")) == ["gpu1"]  # the only one to wait for (never parks here)
    ray.get([actor.checkpoint.remote("gpu0"), actor.checkpoint.remote("cpu")], timeout=10)  # pass at once
    parked = actor.checkpoint.remote("gpu1")
    assert ray.wait([parked], timeout=0.5)[1] == [parked], "the training on the timed GPU waits"
    ray.get(actor.open.remote())
    ray.get(parked, timeout=10)
    assert ray.get(actor.close.remote(node, 0.3)) == ["cpu", "gpu0", "gpu1"]  # CPU timing: all on the node
    ray.get(actor.open.remote())


@pytest.mark.slow
def test_the_meter_times_candidates_paired_with_the_base(local_ray):
    base = space.load_base("yolov8n.yaml")
    gate = GateClient(DeviceGate.remote())
    settings = LatencySettings(imgsz=64, runs=6, min_runs=6, threads=1, tries=1)
    meter = LatencyMeter.remote(settings, gate, space.make_candidate(base))
    with_cga = space.make_candidate(base, {"N4": space.Placement("N4", "CGA", "insert", ())})
    res = ray.get(meter.measure.remote(with_cga, 64))
    assert res.error is None and res.n == 6 and res.reference_ms > 0 and len(res.windows) == 1
    assert len(res.windows[0]["reference_ms"]) == 7 and res.aa is not None, "raw runs and the A/A control recorded"
    assert res.ci_low <= res.ratio <= res.ci_high and res.params > 3_157_200
    assert ray.get(gate.actor.checkpoint_calls.remote()) == 0
    assert not gate.flag().closed, "the meter reopens the flag after timing"
    identity = ray.get(meter.identity.remote())
    assert identity["backend"] == "torch" and identity["backend_version"] == torch.__version__
    assert identity["device_model"]


@pytest.mark.slow
def test_the_meter_predicts_from_a_block_table_it_fills_once(local_ray, tmp_path):
    import json

    base = space.load_base("yolov8n.yaml")
    gate = GateClient(DeviceGate.remote())
    settings = LatencySettings(imgsz=64, runs=6, min_runs=6, threads=1, ci=0, tries=1, estimator="table")
    meter = LatencyMeter.remote(settings, gate, space.make_candidate(base), base, str(tmp_path))
    cga = space.Placement("N4", "CGA", "insert", ())
    cot = space.Placement("N3", "CoT", "insert", ())
    both = ray.get(meter.measure.remote(space.make_candidate(base, {"N4": cga, "N3": cot}), 64))
    assert both.error is None and both.accepted and both.params > 3_157_200
    (table_file,) = tmp_path.glob("*.json")
    costs = json.loads(table_file.read_text())["costs"]
    assert len(costs) == 2 and both.ratio == pytest.approx(1 + sum(c["cost"] for c in costs.values()))
    assert len(both.windows) == 3, "the base once (the time scale) and each block once"
    one = ray.get(meter.measure.remote(space.make_candidate(base, {"N4": cga}), 64))
    assert one.windows == [], "a block in the table is not timed again"
    assert one.ratio == pytest.approx(1 + next(c["cost"] for k, c in costs.items() if k.startswith("N4|")))
    assert one.median_ms == pytest.approx(one.ratio * one.reference_ms)
