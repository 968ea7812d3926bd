"""Who else uses the CPU: per-process CPU time read from the OS, to audit an exclusive window and a busy machine.

An exclusive window is only as quiet as the machine: the meter snapshots every process's CPU seconds when its timed
runs start and end, and records the processes that ran meanwhile (``Window.foreign``). At start, the search samples
the machine for a second and warns when other work already loads it (:func:`busy_processes`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

Snapshot = dict[int, tuple[str, float]]  # pid -> (name, CPU seconds user + system)


def cpu_snapshot() -> Snapshot:
    """CPU seconds (user + system, all threads) of every process this user may read."""
    out: Snapshot = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        times = p.info.get("cpu_times")
        if times is not None:
            out[p.pid] = (p.info.get("name") or "?", times.user + times.system)
    return out


@dataclass(frozen=True)
class Usage:
    """CPU that processes other than the excluded ones used between two snapshots."""

    seconds: float
    top: list[tuple[str, int, float]]  # (name, pid, CPU seconds), largest first

    def describe(self, limit: int = 3) -> str:
        return ", ".join(f"{name} (pid {pid}) {s:.2f} s" for name, pid, s in self.top[:limit]) or "nothing"


def foreign_usage(before: Snapshot, after: Snapshot, exclude: set[int] | None = None, keep: int = 5) -> Usage:
    """CPU used between ``before`` and ``after`` by every process except ``exclude`` (default: this one).

    A process that started in between counts from 0; one that ended in between is not seen (its time is lost)."""
    exclude = {os.getpid()} if exclude is None else exclude
    used = []
    for pid, (name, cpu) in after.items():
        if pid in exclude:
            continue
        delta = cpu - before.get(pid, (name, 0.0))[1]
        if delta > 0:
            used.append((name, pid, round(delta, 3)))
    used.sort(key=lambda u: -u[2])
    return Usage(round(sum(u[2] for u in used), 3), used[:keep])


def busy_processes(seconds: float = 1.0, exclude: set[int] | None = None,
                   threshold: float = 0.2) -> list[tuple[str, int, float]]:
    """Processes that used more than ``threshold`` of one core over ``seconds`` of sampling (this process, its
    descendants, e.g. a local Ray it started, and ``exclude`` aside): (name, pid, share of a core), busiest first."""
    ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True)), *(exclude or set())}
    before = cpu_snapshot()
    time.sleep(seconds)
    usage = foreign_usage(before, cpu_snapshot(), ours, keep=10)
    return [(name, pid, round(s / seconds, 2)) for name, pid, s in usage.top if s / seconds > threshold]


def busy_warning(cores: int, seconds: float = 1.0) -> str | None:
    """A one-line warning naming what already loads this machine and what it costs, or None when it is quiet."""
    busy = busy_processes(seconds)
    if not busy:
        return None
    taken = sum(share for _, _, share in busy)
    names = ", ".join(f"{name} (pid {pid}, {share:.0%} of a core)" for name, pid, share in busy[:3])
    return (f"warning: this machine is already busy: {names}; {taken:.1f} of its {cores} cores are taken before "
            "the search starts. Trainings will be slower and latency windows noisier: windows that fail the "
            "acceptance rule are timed again, and trials that never pass are recorded latency_contended and timed "
            "again at the end")
