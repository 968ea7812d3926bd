"""The gate between trainings and the latency meter: trainings park at batch boundaries while a latency on their
device is timed.

Isolation is cooperative: every training calls the :class:`DeviceGate` (through a :class:`GateClient`) before each
batch; the meter closes the gate for its device, waits until every training there is parked (on its GPU for a CUDA
meter, on its node for a CPU one), times the model, and reopens it. So a latency is never measured while a training
loads the device, and no training slot sits idle waiting for others to drain.

The driver is a party of the gate too (``DRIVER_TAG``): between its steps it proposes candidates (multi-threaded
numpy) and writes the study, which on a CPU meter's node would share the cores being timed. It tells the gate
when it blocks waiting for results (idle: nothing to wait for) and passes a checkpoint before any other work, so a
window opens only while the driver is idle or parked.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray


GATE_MAX_WAIT_S = 60.0  # longest wait for trainings to park before measuring anyway (recorded as contended)


GATE_MAX_CLOSED_S = 600.0  # the gate reopens by itself after this, so a dead meter cannot park trainings forever


START_GRACE_S = 10.0  # a submitted training not started after this is queued by Ray (no load), not waited for


DRIVER_TAG = "driver"  # the driver's entry at the gate


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
        self.path = os.path.join(flag_dir(), f"attnas-gate-{token}-{node[:24]}")
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


def flag_dir() -> str:
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
