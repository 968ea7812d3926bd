"""Ray side of the search: a pool of proxy trainings, one latency meter per device, and the gate between them.

Workers return plain data and never touch the study. The ``LatencyMeter`` is pinned to the study's one latency
node and times while the gate (:mod:`search.engine.gate`) holds the trainings on its device parked.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import ray
import ray.exceptions as rex

import modules
import search
import space

from ..errors import SearchError
from ..latency import LatencyResult, LatencySettings, Reference, measure_latency, prepare_reference
from ..latency.table import BlockTable, predicted, table_path
from ..settings import RunSettings
from ..training.proxy import TrainJob, TrainResult, run_training
from . import cluster
from .gate import DRIVER_TAG, GATE_MAX_WAIT_S, DeviceGate, GateClient, flag_dir
from .inflight import SearchAborted
from .work import Event

NODE_DEATH_WAIT_S = 60.0  # Ray's health check marks an unreachable node dead within ~30 s by default
_WORKER_DEATHS = (rex.WorkerCrashedError, rex.NodeDiedError, rex.LocalRayletDiedError, rex.ObjectLostError,
                  rex.OwnerDiedError)



@ray.remote(num_cpus=0)
class LatencyMeter:
    """The one process per latency device that times candidates, one at a time (Ray runs its calls serially),
    each paired with the reference network (the base), prepared once here."""

    def __init__(self, settings: LatencySettings, gate: GateClient, reference=None, base=None,
                 table_dir: str | None = None) -> None:
        modules.register()
        self._settings = settings
        self._gate = gate
        self._base = base  # the space Base, for --latency-estimator table (single-placement candidates)
        self._table_dir = table_dir
        self._table: BlockTable | None = None
        self._node = ray.get_runtime_context().get_node_id()
        # A CUDA meter sees all of its node's GPUs and times on the first: Ray's id of that GPU, for the gate.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        self._gpu = (visible or "0") if settings.device == "cuda" else None
        self._reference_candidate = reference
        self._reference: Reference | None = None

    def identity(self) -> dict:
        """The latency settings, the runtime's version and this node's processor and hostname (a study's
        identity), and the node's id (not identity: it changes when the cluster restarts)."""
        import socket

        return {**self._settings.identity(), "node": socket.gethostname(), "node_id": self._node}

    def measure(self, candidate, proxy_imgsz: int) -> LatencyResult:
        try:
            if self._reference is None and self._reference_candidate is not None:
                self._reference = prepare_reference(self._reference_candidate, self._settings)
            timed = functools.partial(measure_latency, settings=self._settings, proxy_imgsz=proxy_imgsz,
                                      exclusive=self._exclusive, reference=self._reference)
            if self._settings.estimator == "table":
                return timed(candidate, table=functools.partial(predicted, base=self._base, table=self._block_table(),
                                                                time_single=timed))
            return timed(candidate)
        except Exception as err:  # recorded as the trial's failure reason
            return LatencyResult(error=f"latency measurement failed: {type(err).__name__}: {err}")

    def _block_table(self) -> BlockTable:
        if self._table is None:
            if self._base is None or self._table_dir is None or self._reference_candidate is None:
                raise SearchError("--latency-estimator table needs the base and a table directory")
            identity = self._settings.identity()
            self._table = BlockTable(table_path(self._table_dir, identity, self._reference_candidate.hash),
                                     about={k: identity[k] for k in ("backend", "backend_version", "device_model")})
        return self._table

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[list[str]]:
        try:
            yield self._gate.close(self._node, GATE_MAX_WAIT_S, self._gpu)
        finally:
            self._gate.open()


@ray.remote(max_retries=0)  # worker deaths are retried by the Executor, which records the attempt in the study
def _train_task(job: TrainJob, gate: GateClient) -> TrainResult:
    tag = job.tag
    placed = _placement(job)
    if placed["device"].startswith("cpu (") and job.device != "cpu":  # the ATTNAS_GPU_AS_CPU test switch
        job = TrainJob(**{**job.__dict__, "device": "cpu"})
    # Written before training: a node that dies mid-training leaves the record of where this attempt ran.
    with contextlib.suppress(OSError):
        os.makedirs(job.run_dir, exist_ok=True)
        with open(os.path.join(job.run_dir, f"node-{job.attempt}-{job.schedule.seed}.json"), "w") as f:
            json.dump(placed, f)
    gate.enter(tag, tuple(placed["gpu_ids"]))
    parked = 0.0

    def checkpoint() -> None:
        nonlocal parked
        t0 = time.perf_counter()
        gate.checkpoint(tag)
        parked += time.perf_counter() - t0

    started = time.time()
    try:
        result = run_training(job, checkpoint=checkpoint)
        # Time spent parked while the meter had the device (and the calls to the gate): part of train_s.
        result.extra["parked_s"] = round(parked, 2)
        result.extra.update({**placed, "train_started": round(started, 2), "train_ended": round(time.time(), 2)})
        return result
    finally:
        gate.leave(tag)


GPU_AS_CPU_ENV = "ATTNAS_GPU_AS_CPU"  # test switch: trainings Ray gave (logical) GPUs train on the CPU


def _placement(job: TrainJob) -> dict[str, Any]:
    """Where this training runs: node id, hostname and device (with the GPU ids Ray assigned it)."""
    import socket

    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    device = "cpu"
    if job.device != "cpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        device = f"cuda:{job.device} (gpu ids {gpu_ids}, CUDA_VISIBLE_DEVICES={visible})"
        if os.environ.get(GPU_AS_CPU_ENV) == "1":
            device = f"cpu ({GPU_AS_CPU_ENV}=1; gpu ids {gpu_ids}, CUDA_VISIBLE_DEVICES={visible})"
    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(), "device": device,
            "gpu_ids": gpu_ids, "pid": os.getpid()}


@dataclass
class _Pending:
    key: Any
    kind: str  # "latency", "train" or "base"
    submitted: float
    job: TrainJob | None = None
    tag: str = ""


class Executor:
    """Runs latency measurements and proxy trainings on Ray (a :class:`search.engine.work.WorkPool`); the driver polls
    ``wait`` for finished work."""

    def __init__(self, run: RunSettings, latency: LatencySettings, env: dict[str, str] | None = None, *,
                 reference=None, base=None, table_dir: str | None = None) -> None:
        """``reference``: the base as a space Candidate; when given, every candidate is timed paired with it
        (``LatencyResult.ratio``), else alone as before. ``base`` (the space Base) and ``table_dir``: where
        ``--latency-estimator table`` keeps its per-placement costs."""
        self.run = run
        self.workers = run.workers
        env_vars = {"YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False", **(env or {})}
        if os.environ.get(GPU_AS_CPU_ENV):
            env_vars[GPU_AS_CPU_ENV] = os.environ[GPU_AS_CPU_ENV]
        runtime_env: dict[str, Any] = {"env_vars": env_vars}
        if run.ray_address:
            # A remote cluster may not have this code: ship the three packages with every task.
            runtime_env["py_modules"] = [os.path.dirname(m.__file__) for m in (modules, space, search)]
        _quiet_token_notice()
        try:
            # "local": always a new Ray of our own when no address is given, even when this machine already runs a
            # cluster (ray.init() would join it, and refuse the num_cpus given here).
            ray.init(address=run.ray_address or "local", runtime_env=runtime_env, include_dashboard=False,
                     log_to_driver=False, configure_logging=True, logging_level="warning",
                     **({} if run.ray_address else {"num_cpus": os.cpu_count(), "num_gpus": _local_gpus()}))
        except Exception as err:
            raise SearchError(f"cannot start or join Ray at {run.ray_address or 'local'}: {err}") from None
        resources = ray.cluster_resources()
        self.cpus = float(resources.get("CPU", 0))
        self.gpus = float(resources.get("GPU", 0))
        if run.gpus_per_trial > 0 and self.gpus == 0:
            self.shutdown()
            raise SearchError(f"--gpus-per-trial {run.gpus_per_trial} but Ray found no GPU "
                              f"({int(self.cpus)} CPUs only); leave it at 0 for CPU trials")
        if latency.device == "cuda" and self.gpus == 0:
            self.shutdown()
            raise SearchError("--latency-device cuda but Ray found no GPU; use --latency-device cpu")
        self.cpus_per_trial = run.cpus_per_trial or max(1.0, float(int(self.cpus // max(1, run.workers))))
        try:
            self.latency_node = cluster.resolve_node(run.latency_node)
            if latency.device == "cuda" and self.latency_node.gpus == 0:
                raise SearchError(f"--latency-device cuda but the latency node {self.latency_node.describe()} has no "
                                  "GPU; pick a GPU node with --latency-node")
        except SearchError:
            self.shutdown()
            raise
        # The gate lives on the driver's node: on any other it would die with that node and fail every latency.
        here = ray.get_runtime_context().get_node_id()
        self.gate = GateClient(DeviceGate.options(scheduling_strategy=cluster.pinned(here)).remote())
        meter_options: dict[str, Any] = {"scheduling_strategy": cluster.pinned(self.latency_node.id)}
        if latency.device == "cuda":
            # The meter reserves no GPU (it would starve trainings that ask for a whole one) yet must see it.
            meter_options["runtime_env"] = {
                "env_vars": {**env_vars, "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
        self._meter_options = meter_options
        self._latency = latency
        self._reference = reference
        self._base, self._table_dir = base, table_dir
        self.meter = self._new_meter()
        self._pending: dict[ray.ObjectRef, _Pending] = {}
        self.abandoned: list[ray.ObjectRef] = []  # measurements of stopped trials, left to finish (see cancel)
        self.gate.enter(DRIVER_TAG)  # the driver's own work must not share a window's device (module docstring)

    def _new_meter(self):
        return LatencyMeter.options(**self._meter_options).remote(self._latency, self.gate, self._reference,
                                                                  self._base, self._table_dir)

    def _meter_node(self) -> str:
        return self.latency_node.id

    def latency_identity(self) -> dict:
        """LatencySettings.identity() as seen by the meter: its runtime version, its node's processor and hostname,
        and the node's id."""
        return ray.get(self.meter.identity.remote())

    def describe(self) -> str:
        where = self.run.ray_address or "local Ray"
        nodes = len(cluster.alive_nodes())
        where += f" ({nodes} nodes; latency on {self.latency_node.describe()})" if nodes > 1 else ""
        gpus = self.run.gpus_per_trial
        per = f"{self.cpus_per_trial:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
        fits = int(min(self.cpus // self.cpus_per_trial,
                       self.gpus // self.run.gpus_per_trial if self.run.gpus_per_trial else 1e9))
        note = f" (only {fits} fit at once)" if fits < self.run.workers else ""
        return (f"{where}: {self.cpus:g} CPUs, {self.gpus:g} GPUs; up to {self.run.workers} trials training at once, "
                f"{per} each{note}")

    def submit_latency(self, key: Any, candidate, proxy_imgsz: int) -> None:
        ref = self.meter.measure.remote(candidate, proxy_imgsz)
        self._pending[ref] = _Pending(key, "latency", time.monotonic())

    def submit_train(self, key: Any, job: TrainJob, kind: str = "train") -> None:
        """Train ``job`` on one worker slot; ``kind`` "base" is the base training of --weights auto, which
        --trial-timeout does not limit."""
        # Waited for: Ray does not order an async actor's calls, so a fire-and-forget expect() could reach the gate
        # after a close() it must precede, and the meter would time while this worker starts up.
        ray.get(self.gate.actor.expect.remote(job.tag))
        options: dict[str, Any] = {"num_cpus": self.cpus_per_trial, "num_gpus": self.run.gpus_per_trial}
        if self.run.ray_address:  # on a cluster: over every node with room, not packed onto the first one
            options["scheduling_strategy"] = "SPREAD"
        ref = _train_task.options(**options).remote(job, self.gate)
        self._pending[ref] = _Pending(key, kind, time.monotonic(), job, job.tag)

    def wait(self, timeout_s: float) -> list[Event]:
        """Finished work within ``timeout_s`` (maybe none); also times out trainings over ``--trial-timeout``."""
        events: list[Event] = []
        self.gate.idle(DRIVER_TAG)
        try:
            if self._pending:
                ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=timeout_s)
                if ready:
                    ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
            else:
                ready = []
                time.sleep(min(timeout_s, 0.1))
        finally:
            self.gate.busy(DRIVER_TAG)  # parks here while a latency window on this node is open
        for ref in ready:
            events += self._collect(ref, self._pending.pop(ref))
        events += self._expire()
        return events

    def checkpoint(self) -> None:
        """The driver between two pieces of work: parks while a latency window on its node is open."""
        self.gate.checkpoint(DRIVER_TAG)

    def _collect(self, ref: ray.ObjectRef, p: _Pending) -> list[Event]:
        try:
            return [Event(p.key, p.kind, ray.get(ref))]
        except _WORKER_DEATHS as err:
            if p.job is not None and p.job.attempt == 0:
                self.gate.leave(p.tag)
                retry = TrainJob(**{**p.job.__dict__, "attempt": 1})
                self.submit_train(p.key, retry, p.kind)
                return [Event(p.key, "retry", None, {"reason": _short(err)})]
            return [self._failed(p, "worker-died", f"worker died twice: {_short(err)}")]
        except rex.OutOfMemoryError as err:
            return [self._failed(p, "oom", f"out of memory (killed by Ray's memory monitor): {_short(err)}")]
        except rex.RayActorError as err:
            if not self._latency_node_alive():  # latencies from another node would not compare
                raise SearchAborted(f"the latency node {self.latency_node.describe()} died; restart it (or pick "
                                    "another with --latency-node on a new study) and continue with --resume") from None
            # The meter died (maybe with the gate closed): reopen the gate and start a new meter for later trials.
            self.gate.flag(self._meter_node()).set(False)
            self.gate.actor.open.remote()
            self.meter = self._new_meter()
            return [self._failed(p, "worker-died", f"latency meter died: {_short(err)}")]
        except rex.RayError as err:
            return [self._failed(p, "exception", _short(err))]

    def _latency_node_alive(self) -> bool:
        """After a meter error: is its node still alive? The meter's process often dies (or turns unreachable)
        before Ray's health check marks its node dead, so the node is given NODE_DEATH_WAIT_S to be declared dead:
        a dying node must not be taken for a crashed meter (a new meter there would never start)."""
        deadline = time.monotonic() + NODE_DEATH_WAIT_S
        while cluster.is_alive(self.latency_node.id):
            if time.monotonic() >= deadline:
                return True
            time.sleep(1.0)
        return False

    def _failed(self, p: _Pending, kind: str, message: str) -> Event:
        if p.job is not None:
            self.gate.leave(p.tag)
            spent = time.monotonic() - p.submitted
            return Event(p.key, p.kind, TrainResult(error=message, error_kind=kind, train_s=spent))
        return Event(p.key, "latency", LatencyResult(error=message))

    def _expire(self) -> list[Event]:
        limit = self.run.trial_timeout
        if not limit:
            return []
        now = time.monotonic()
        events = []
        for ref, p in list(self._pending.items()):
            if p.kind == "train" and now - p.submitted > limit:
                ray.cancel(ref, force=True)
                del self._pending[ref]
                events.append(self._failed(p, "timeout", f"exceeded --trial-timeout {limit:g} s"))
        return events

    def cancel(self, key: Any) -> None:
        """Stop the work of one key: its training is killed, freeing the worker; its latency measurement is left to
        finish and its result dropped (``abandoned``). Cancelling the meter's call would interrupt it inside a
        window, and the meter is what every later candidate is timed by: one trial stopped from the dashboard must
        not cost another."""
        for ref, p in list(self._pending.items()):
            if p.key == key:
                del self._pending[ref]
                if p.job is None:
                    if self.abandoned:  # keep only those still running
                        self.abandoned = ray.wait(self.abandoned, num_returns=len(self.abandoned), timeout=0)[1]
                    self.abandoned.append(ref)
                    continue
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
                self.gate.leave(p.tag)

    def cancel_all(self) -> list[Any]:
        """Stop everything in flight; returns the keys that were running."""
        keys = []
        for ref, p in list(self._pending.items()):
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=p.job is not None)  # trainings, the base's included
            keys.append(p.key)
        self._pending.clear()
        return keys

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if hasattr(self, "gate"):
            for path in glob.glob(os.path.join(flag_dir(), f"attnas-gate-{self.gate.token}-*")):
                with contextlib.suppress(OSError):
                    os.remove(path)


class _TokenNotice(logging.Filter):
    """Ray's notice, at every start of a local Ray, that it uses token authentication (its default, which we
    keep): nothing a user of the search can act on (issue 21)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


def _quiet_token_notice() -> None:
    """Drop Ray's token notice, and only it (a logger filter; Ray's behaviour is unchanged)."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenNotice) for f in logger.filters):
        logger.addFilter(_TokenNotice())


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _short(err: BaseException) -> str:
    """One line for ``err``: for a task that raised, the task's own exception (Ray's text starts with the task's
    name and pid)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_short(cause)}"[:300]
    return next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)[:300]
