"""An exclusive window is exclusive: the driver and a parked real training use no CPU while the meter times.

Real local Ray, the real Executor (gate, meter, worker) and a real Ultralytics training on coco128; the window's
own audit (the CPU every process used between its first and last timed run) is what is checked, and a driver that
ignores the gate shows up in it (the audit can fail).
"""

import json
import os
import threading
import time

import psutil
import pytest
import ray

import space
from search.engine.executor import Executor
from search.settings import RunSettings
from search.latency import LatencySettings
from search.training.proxy import ProxySchedule, TrainJob

pytestmark = pytest.mark.slow
TICK_S = 0.02  # two clock ticks: what a process blocked on a lock may still be charged


def burn(seconds: float) -> None:
    """The driver's own work, e.g. a proposal: pure CPU."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        sum(range(1000))


def measure(executor: Executor, candidate, driver_work) -> object:
    """Submit one latency and run a driver loop (``driver_work`` between waits) until it comes back."""
    executor.submit_latency("lat", candidate, 64)
    while True:
        driver_work()
        for event in executor.wait(timeout_s=0.01):
            if event.key == "lat":
                return event.result


def test_the_driver_and_a_parked_training_use_no_cpu_during_a_window(tmp_path, coco128):
    base = space.load_base("yolov8n.yaml")
    settings = LatencySettings(imgsz=320, runs=12, min_runs=12, threads=1, ci=0, tries=1)
    executor = Executor(RunSettings(workers=1, cpus_per_trial=1), settings, reference=space.make_candidate(base))
    try:
        job = TrainJob(trial=0, candidate_hash=space.make_candidate(base).hash,
                       yaml_text=space.to_yaml(space.make_candidate(base)), data=str(coco128 / "coco128.yaml"),
                       schedule=ProxySchedule(epochs=50, imgsz=64, batch=4), run_dir=str(tmp_path / "t0"))
        executor.submit_train("train", job)
        placed = tmp_path / "t0" / "node-0-0.json"
        deadline = time.time() + 120
        while not placed.is_file() and time.time() < deadline:
            time.sleep(0.2)
        training = psutil.Process(json.loads(placed.read_text())["pid"])
        time.sleep(5.0)  # past model building and the data cache: the training is in its batch loop
        cpu_before = training.cpu_times().user
        time.sleep(1.0)
        assert training.cpu_times().user - cpu_before > 0.3, "the training runs before the window"
        candidate = space.make_candidate(base, {"N4": space.Placement("N4", "CGA", "insert", ())})

        def polite() -> None:  # the driver's loop: a checkpoint before each piece of its own work
            executor.checkpoint()
            burn(0.05)

        result = measure(executor, candidate, polite)
        assert result.error is None and result.contended == []
        window = result.windows[0]
        assert window["seconds"] > 0.5
        used = {pid: cpu for _, pid, cpu in window["foreign"]}
        assert used.get(os.getpid(), 0.0) <= TICK_S, f"the driver ran during the window: {window['foreign']}"
        assert used.get(training.pid, 0.0) <= TICK_S, f"the training ran during the window: {window['foreign']}"
        cpu_after_window = training.cpu_times().user
        time.sleep(1.0)
        assert training.cpu_times().user - cpu_after_window > 0.3, "the training resumes after the window"

        # The control: work that ignores the gate (a thread of the driver burning CPU throughout) is seen.
        stop = threading.Event()
        rogue = threading.Thread(target=lambda: [burn(0.01) for _ in iter(stop.is_set, True)], daemon=True)
        rogue.start()
        try:
            result = measure(executor, candidate, lambda: None)
        finally:
            stop.set()
            rogue.join()
        used = {pid: cpu for _, pid, cpu in result.windows[0]["foreign"]}
        assert used.get(os.getpid(), 0.0) > 0.1, f"the audit missed a busy driver: {result.windows[0]['foreign']}"

        # A trial stopped (from the dashboard) while the meter times it: its result is dropped, the meter is not
        # interrupted (issue 22: cancelling its call killed it and failed the next candidate too).
        executor.submit_latency("stopped", candidate, 64)
        node = executor.latency_node.id
        deadline = time.time() + 60
        while not executor.gate.flag(node).closed and time.time() < deadline:  # inside its window
            time.sleep(0.02)
        assert executor.gate.flag(node).closed, "the meter never opened a window"
        meter = executor.meter
        executor.cancel("stopped")
        result = measure(executor, candidate, lambda: None)  # only "lat" comes back; "stopped" is dropped
        assert result.error is None and executor.meter is meter, "the next candidate is timed by the same meter"
        stopped = ray.get(executor.abandoned[0], timeout=60)
        assert stopped.error is None and stopped.ratio > 0, "the stopped trial's window ran to its end"
    finally:
        executor.cancel_all()
        executor.shutdown()
