"""Latency windows: the statistics on recorded runs, the A/A control, the acceptance rule and its retry bound."""

import numpy as np
import pytest

from search.latency import LatencySettings, paired_windows
from search.latency.window import Acceptance, Window, aa_control, best_window, estimate


def window_runs(ratio: float, pairs: int, base_ms: float = 50.0, jitter: float = 0.004, seed: int = 0):
    """R C R C ... R runs of a quiet machine: a candidate ``ratio`` times the base, with small multiplicative noise."""
    rng = np.random.default_rng(seed)
    ref = base_ms * (1 + jitter * rng.standard_normal(pairs + 1))
    cand = ratio * base_ms * (1 + jitter * rng.standard_normal(pairs))
    return list(ref), list(cand)


def test_slow_base_runs_injected_into_a_recorded_window_leave_the_ratio_alone():
    ref, cand = window_runs(1.2, 12)
    for i in (2, 9):  # two reference runs hit by another tenant: each touches the two pairs around it
        ref[i] *= 2.0
    cand[5] *= 1.7  # and one candidate run
    for statistic in ("pair_median", "median_ratio", "q25_ratio", "pair_hl"):
        assert estimate(ref, cand, statistic).ratio == pytest.approx(1.2, rel=0.01), statistic
    # The injection matters: the ratio of mean times is 8% off.
    assert abs(sum(cand) / len(cand) / (sum(ref) / len(ref)) / 1.2 - 1) > 0.05


def test_slow_candidate_runs_leave_the_ratio_alone():
    ref, cand = window_runs(1.1, 8, seed=1)
    cand[2] *= 3.0
    cand[5] *= 1.8
    est = estimate(ref, cand)
    assert est.ratio == pytest.approx(1.1, rel=0.01)
    assert est.ci_low <= est.ratio <= est.ci_high
    assert aa_control(ref) == pytest.approx(1.0, abs=0.01), "slow candidate runs do not touch the A/A control"


def test_the_interval_is_deterministic_and_narrow_on_a_quiet_window():
    ref, cand = window_runs(1.3, 8, seed=2)
    a, b = estimate(ref, cand), estimate(ref, cand)
    assert a == b, "a recorded window always gives the same numbers"
    assert a.rel_half_width < 0.01


def test_the_aa_control_reads_the_reference_runs_alone():
    ref, cand = window_runs(1.5, 8, seed=3)
    assert aa_control(ref) == pytest.approx(1.0, abs=0.01)
    noisy = [r * (1.4 if i % 2 else 1.0) for i, r in enumerate(ref)]  # every odd reference run slowed
    assert aa_control(noisy) == pytest.approx(1.4, rel=0.02)
    assert aa_control(ref[:4]) is None


def test_acceptance_names_each_reason():
    rule = Acceptance(max_half_width=0.02, aa_tolerance=0.02)
    assert rule.reasons(Window([], [], ratio=1.2, ci_low=1.19, ci_high=1.21, aa=1.019)) == []
    quiet = Window([], [], ratio=1.2, ci_low=1.19, ci_high=1.21, aa=1.0)
    assert rule.reasons(quiet) == []
    wide = Window([], [], ratio=1.2, ci_low=1.0, ci_high=1.4, aa=1.0)
    assert rule.reasons(wide)[0].startswith("interval")
    off = Window([], [], ratio=1.2, ci_low=1.19, ci_high=1.21, aa=0.95)
    assert rule.reasons(off)[0].startswith("A/A")
    below = Window([], [], ratio=0.97, ci_low=0.965, ci_high=0.975, aa=1.0)
    assert rule.reasons(below) == []
    assert rule.reasons(below, insert_only=True)[0].startswith("insert-only")
    with pytest.raises(ValueError, match="tries"):
        Acceptance(tries=0)


class Machine:
    """A synthetic clock: runs advance it by their work; the machine is noisy (every other run slowed by a
    varying amount) until ``quiet_after`` seconds; ``sleep`` advances it too."""

    def __init__(self, quiet_after: float) -> None:
        self.now = 0.0
        self.quiet_after = quiet_after
        self.runs = 0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def runner(self, work_s: float):
        def run() -> None:
            self.runs += 1
            noisy = self.now < self.quiet_after and self.runs % 2
            self.now += work_s * (1 + (0.5 + 0.37 * (self.runs % 5)) * noisy)
        return run


def test_a_rejected_window_is_timed_again_after_the_backoff_until_one_passes():
    machine = Machine(quiet_after=5.0)
    settings = LatencySettings(warmup=1, runs=8, min_runs=6, ci=0.02, tries=3)
    windows = paired_windows(machine.runner(0.05), machine.runner(0.04), settings, clock=machine.clock,
                             sleep=machine.sleep)
    assert [w.accepted for w in windows] == [False, False, True]
    assert machine.slept == [2.0, 8.0], "backoff between windows, from the acceptance rule"
    assert best_window(windows) is windows[-1]
    assert windows[-1].ratio == pytest.approx(1.25, rel=1e-6)


def test_the_retries_are_bounded_and_the_narrowest_window_is_recorded():
    machine = Machine(quiet_after=float("inf"))
    settings = LatencySettings(warmup=0, runs=8, min_runs=6, ci=0.02, tries=4)
    windows = paired_windows(machine.runner(0.05), machine.runner(0.04), settings, clock=machine.clock,
                             sleep=machine.sleep)
    assert len(windows) == 4 and not any(w.accepted for w in windows)
    assert machine.slept == [2.0, 8.0, 8.0]
    chosen = best_window(windows)
    assert chosen.rel_half_width == min(w.rel_half_width for w in windows)
    assert all(w.rejected for w in windows) and all(len(w.candidate_ms) == 8 for w in windows)


def test_an_insert_only_candidate_timed_below_the_base_is_timed_again():
    machine = Machine(quiet_after=0.0)
    settings = LatencySettings(warmup=0, runs=8, min_runs=6, tries=2)
    # The "candidate" here is faster than the reference: impossible for one that only adds layers.
    windows = paired_windows(machine.runner(0.03), machine.runner(0.04), settings, clock=machine.clock,
                             sleep=machine.sleep, insert_only=True)
    assert len(windows) == 2 and all("insert-only" in w.rejected[0] for w in windows)
    plain = paired_windows(machine.runner(0.03), machine.runner(0.04), settings, clock=machine.clock,
                           sleep=machine.sleep)
    assert len(plain) == 1 and plain[0].accepted


def test_a_busy_machine_is_named_at_start_and_our_own_processes_are_not():
    import os
    import signal
    import subprocess
    import sys
    import time

    from search.latency.audit import busy_warning

    # Someone else's work: a spinner that is not our descendant (its shell parent exits at once).
    out = subprocess.run(["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True)
    foreign = int(out.stdout.strip())
    ours = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # like a local Ray the search started
    try:
        time.sleep(0.3)
        warning = busy_warning(cores=2, seconds=1.0)
    finally:
        os.kill(foreign, signal.SIGKILL)
        ours.kill()
        ours.wait()
    assert warning is not None and f"(pid {foreign}," in warning and "of its 2 cores are taken" in warning
    assert f"(pid {ours.pid}," not in warning
