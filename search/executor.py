"""Ray side of the search: a pool of proxy trainings, one latency meter per device, and the gate between them.

Workers return plain data and never touch the study. Latency isolation is cooperative: every training calls the
``DeviceGate`` before each batch; the ``LatencyMeter`` (pinned to the study's one latency node) closes the gate for
its device, waits until every training there is parked (on its GPU for a CUDA meter, on its node for a CPU one),
times the model, and reopens it. So a latency is never measured while a training loads the
device, and no training slot sits idle waiting for others to drain.

The driver is a party of the gate too (``DRIVER_TAG``): between its steps it proposes candidates (multi-threaded
numpy) and writes the study, which on a CPU meter's node would share the cores being timed. It tells the gate
when it blocks waiting for results (idle: nothing to wait for) and passes a checkpoint before any other work, so a
window opens only while the driver is idle or parked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import json
import mmap
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray
import ray.exceptions as rex

from . import cluster
from .driver import SearchAborted
from .errors import SearchError
from .latency import LatencyResult, LatencySettings, Reference, measure_latency, prepare_reference
from .latency.table import BlockTable, predicted, table_path
from .proxy import TrainJob, TrainResult, run_training
from .work import Event

GATE_MAX_WAIT_S = 60.0  # longest wait for trainings to park before measuring anyway (recorded as contended)
GATE_MAX_CLOSED_S = 600.0  # the gate reopens by itself after this, so a dead meter cannot park trainings forever
NODE_DEATH_WAIT_S = 60.0  # Ray's health check marks an unreachable node dead within ~30 s by default
START_GRACE_S = 10.0  # a submitted training not started after this is queued by Ray (no load), not waited for
DRIVER_TAG = "driver"  # the driver's entry at the gate
_WORKER_DEATHS = (rex.WorkerCrashedError, rex.NodeDiedError, rex.LocalRayletDiedError, rex.ObjectLostError,
                  rex.OwnerDiedError)


@ray.remote(num_cpus=0)
class DeviceGate:
    """Parks trainings at batch boundaries while a latency measurement on their node needs the device.

    Trainings reach it through a :class:`GateClient`, which asks this actor only while its node's shared-memory
    flag says closed; ``checkpoint_calls`` counts the calls that did reach it.
    """

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._node: str | None = None
        self._gpu: str | None = None  # the closed GPU (Ray's id on the meter's node); None: the whole node (CPU)
        self._active: dict[str, tuple[str, tuple[str, ...]]] = {}  # training tag -> (node id, its Ray GPU ids)
        self._expected: dict[str, float] = {}  # submitted, not started yet: tag -> submit time
        self._parked: set[str] = set()
        self._idle: set[str] = set()  # parties blocked on something else (the driver waiting for results)
        self._timer: asyncio.TimerHandle | None = None
        self._checkpoint_calls = 0

    def expect(self, tag: str) -> None:
        """The driver submitted this training: its worker may be starting (importing torch: load) right now."""
        if tag not in self._active:
            self._expected[tag] = time.monotonic()

    async def enter(self, tag: str, node: str, gpus: tuple[str, ...] = ()) -> None:
        self._expected.pop(tag, None)
        self._active[tag] = (node, tuple(gpus))
        await self._wait_if_closed(tag)

    def _shares_device(self, tag: str) -> bool:
        """Whether this training loads the device being timed: its GPU, or (timing on CPU) any training on the node."""
        node, gpus = self._active.get(tag, (None, ()))
        return node == self._node and (self._gpu is None or self._gpu in gpus)

    def leave(self, tag: str) -> None:
        self._active.pop(tag, None)
        self._expected.pop(tag, None)
        self._parked.discard(tag)
        self._idle.discard(tag)

    async def checkpoint(self, tag: str) -> None:
        self._checkpoint_calls += 1
        self._idle.discard(tag)
        await self._wait_if_closed(tag)

    def idle(self, tag: str) -> None:
        """``tag`` blocks on something that uses no CPU until its next checkpoint (the driver in ``ray.wait``)."""
        if tag in self._active:
            self._idle.add(tag)

    def checkpoint_calls(self) -> int:
        return self._checkpoint_calls

    async def _wait_if_closed(self, tag: str) -> None:
        if self._open.is_set() or not self._shares_device(tag):
            return
        self._parked.add(tag)
        try:
            await self._open.wait()
        finally:
            self._parked.discard(tag)

    async def close(self, node: str, max_wait_s: float, gpu: str | None = None) -> list[str]:
        """Stop trainings on ``node`` (only those on GPU ``gpu`` when given); returns once all are parked, or after
        ``max_wait_s`` with those that are not."""
        self._node, self._gpu = node, gpu
        self._open.clear()
        self._timer = asyncio.get_running_loop().call_later(GATE_MAX_CLOSED_S, self._open.set)
        deadline = time.monotonic() + max_wait_s
        while True:
            now = time.monotonic()
            running = sorted(t for t in self._active
                             if self._shares_device(t) and t not in self._parked and t not in self._idle)
            starting = sorted(t for t, since in self._expected.items() if now - since < START_GRACE_S)
            if not (running or starting) or now > deadline:
                return running + starting
            await asyncio.sleep(0.02)

    def open(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._open.set()


class NodeFlag:
    """One byte in shared memory per (gate, node), 1 while a measurement on that node holds the device.

    A training reads it before every batch (an mmap read, no system call) and asks the gate actor only when it
    is set, so the open path costs no Ray round trip. A file in /dev/shm rather than
    ``multiprocessing.shared_memory``: the latter's resource tracker unlinks the segment when the process that
    created it exits, and here any process on the node may be first.
    """

    def __init__(self, token: str, node: str) -> None:
        self.path = os.path.join(_flag_dir(), f"attnas-gate-{token}-{node[:24]}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 1:
                os.ftruncate(fd, 1)  # a new file reads as 0: open
            self._map = mmap.mmap(fd, 1)
        finally:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._map[0] != 0

    def set(self, closed: bool) -> None:
        self._map[0] = 1 if closed else 0


def _flag_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass
class GateClient:
    """What trainings and the meter hold: the gate actor plus the token that names its per-node flags."""

    actor: Any
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    _flag: NodeFlag | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {"actor": self.actor, "token": self.token, "_flag": None}  # an mmap does not travel

    def flag(self, node: str | None = None) -> NodeFlag:
        if self._flag is None:
            self._flag = NodeFlag(self.token, node or ray.get_runtime_context().get_node_id())
        return self._flag

    def enter(self, tag: str, gpus: tuple[str, ...] = ()) -> None:
        node = ray.get_runtime_context().get_node_id()
        self.flag(node)
        ray.get(self.actor.enter.remote(tag, node, gpus))

    def checkpoint(self, tag: str) -> None:
        """Called before every batch: local when the flag is clear; parks at the actor while it is set."""
        if self.flag().closed:
            ray.get(self.actor.checkpoint.remote(tag))

    def idle(self, tag: str) -> None:
        """``tag`` is about to block without using the CPU; its next :meth:`busy` (or checkpoint) ends that."""
        ray.get(self.actor.idle.remote(tag))  # waited for: Ray does not order an async actor's calls

    def busy(self, tag: str) -> None:
        """``tag`` is about to use the CPU: parks first while a window on its device is open."""
        ray.get(self.actor.checkpoint.remote(tag))

    def leave(self, tag: str) -> None:
        self.actor.leave.remote(tag)

    def close(self, node: str, max_wait_s: float, gpu: str | None = None) -> list[str]:
        """Set this node's flag, then wait at the actor until every training here on the timed device is parked
        (trainings on the node's other GPUs see the flag, ask the actor and go on)."""
        self.flag(node).set(True)
        return ray.get(self.actor.close.remote(node, max_wait_s, gpu))

    def open(self) -> None:
        self.flag().set(False)
        ray.get(self.actor.open.remote())


@ray.remote(num_cpus=0)
class LatencyMeter:
    """The one process per latency device that times candidates, one at a time (Ray runs its calls serially),
    each paired with the reference network (the base), prepared once here."""

    def __init__(self, settings: LatencySettings, gate: GateClient, reference=None, base=None,
                 table_dir: str | None = None) -> None:
        import modules

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


@dataclass(frozen=True)
class PoolSettings:
    """Where and how trials run."""

    workers: int = 2
    cpus_per_trial: float | None = None  # None: the cluster's CPUs shared evenly by the workers
    gpus_per_trial: float = 0.0
    trial_timeout_s: float | None = None
    ray_address: str | None = None  # None: a local Ray with this machine's CPUs/GPUs
    latency_node: str = "driver"  # where every latency is timed: "driver", a node id, IP or hostname


@dataclass
class _Pending:
    key: Any
    kind: str  # "latency", "train" or "base"
    submitted: float
    job: TrainJob | None = None
    tag: str = ""


class Executor:
    """Runs latency measurements and proxy trainings on Ray (a :class:`search.work.WorkPool`); the driver polls
    ``wait`` for finished work."""

    def __init__(self, pool: PoolSettings, latency: LatencySettings, env: dict[str, str] | None = None, *,
                 reference=None, base=None, table_dir: str | None = None) -> None:
        """``reference``: the base as a space Candidate; when given, every candidate is timed paired with it
        (``LatencyResult.ratio``), else alone as before. ``base`` (the space Base) and ``table_dir``: where
        ``--latency-estimator table`` keeps its per-placement costs."""
        self.pool = pool
        self.workers = pool.workers
        env_vars = {"YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False", **(env or {})}
        if os.environ.get(GPU_AS_CPU_ENV):
            env_vars[GPU_AS_CPU_ENV] = os.environ[GPU_AS_CPU_ENV]
        runtime_env: dict[str, Any] = {"env_vars": env_vars}
        if pool.ray_address:
            import modules
            import search
            import space

            # A remote cluster may not have this code: ship the three packages with every task.
            runtime_env["py_modules"] = [os.path.dirname(m.__file__) for m in (modules, space, search)]
        try:
            # "local": always a new Ray of our own when no address is given, even when this machine already runs a
            # cluster (ray.init() would join it, and refuse the num_cpus given here).
            ray.init(address=pool.ray_address or "local", runtime_env=runtime_env, include_dashboard=False,
                     log_to_driver=False, configure_logging=True, logging_level="warning",
                     **({} if pool.ray_address else {"num_cpus": os.cpu_count(), "num_gpus": _local_gpus()}))
        except Exception as err:
            raise SearchError(f"cannot start or join Ray at {pool.ray_address or 'local'}: {err}") from None
        resources = ray.cluster_resources()
        self.cpus = float(resources.get("CPU", 0))
        self.gpus = float(resources.get("GPU", 0))
        if pool.gpus_per_trial > 0 and self.gpus == 0:
            self.shutdown()
            raise SearchError(f"--gpus-per-trial {pool.gpus_per_trial} but Ray found no GPU "
                              f"({int(self.cpus)} CPUs only); leave it at 0 for CPU trials")
        if latency.device == "cuda" and self.gpus == 0:
            self.shutdown()
            raise SearchError("--latency-device cuda but Ray found no GPU; use --latency-device cpu")
        self.cpus_per_trial = pool.cpus_per_trial or max(1.0, float(int(self.cpus // max(1, pool.workers))))
        try:
            self.latency_node = cluster.resolve_node(pool.latency_node)
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
        where = self.pool.ray_address or "local Ray"
        nodes = len(cluster.alive_nodes())
        where += f" ({nodes} nodes; latency on {self.latency_node.describe()})" if nodes > 1 else ""
        gpus = self.pool.gpus_per_trial
        per = f"{self.cpus_per_trial:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
        fits = int(min(self.cpus // self.cpus_per_trial,
                       self.gpus // self.pool.gpus_per_trial if self.pool.gpus_per_trial else 1e9))
        note = f" (only {fits} fit at once)" if fits < self.pool.workers else ""
        return (f"{where}: {self.cpus:g} CPUs, {self.gpus:g} GPUs; up to {self.pool.workers} trials training at once, "
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
        options: dict[str, Any] = {"num_cpus": self.cpus_per_trial, "num_gpus": self.pool.gpus_per_trial}
        if self.pool.ray_address:  # on a cluster: over every node with room, not packed onto the first one
            options["scheduling_strategy"] = "SPREAD"
        ref = _train_task.options(**options).remote(job, self.gate)
        self._pending[ref] = _Pending(key, kind, time.monotonic(), job, job.tag)

    def wait(self, timeout_s: float) -> list[Event]:
        """Finished work within ``timeout_s`` (maybe none); also times out trainings over ``trial_timeout_s``."""
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
        limit = self.pool.trial_timeout_s
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
        """Stop the work of one key (its training is killed, freeing the worker; a latency result is dropped)."""
        for ref, p in list(self._pending.items()):
            if p.key == key:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=p.job is not None)
                if p.job is not None:
                    self.gate.leave(p.tag)
                del self._pending[ref]

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
            for path in glob.glob(os.path.join(_flag_dir(), f"attnas-gate-{self.gate.token}-*")):
                with contextlib.suppress(OSError):
                    os.remove(path)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _short(err: BaseException) -> str:
    return next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)[:300]
