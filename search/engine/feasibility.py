"""What a latency measurement means for a trial: the attributes it records, the study's reference latency that
turns a paired ratio into milliseconds, the constraints checked before training (``--max-latency-ms``,
``--max-params``), and the end-of-run re-timing of trials whose latency was contended."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import optuna

from space import SearchSpace

from .. import objectives as obj
from ..latency import LatencyResult, study_reference_ms
from ..settings import Constraints
from ..storage import study as st
from .inflight import InFlight
from .work import WorkPool

SETTLE = 5  # reference windows after which the study's reference latency is fixed


class LatencyBook:
    """Records each measurement in its trial and the study; decides feasibility before any training."""

    def __init__(self, study: optuna.Study, objectives: tuple[obj.Objective, ...], constraints: Constraints,
                 latency_imgsz: int, progress) -> None:
        self.study = study
        self.objectives = objectives
        self.constraints = constraints
        self.latency_imgsz = latency_imgsz
        self.progress = progress

    def record(self, run: InFlight, lat: LatencyResult) -> None:
        """The measurement's attributes on the trial; a contended one is marked to be timed again at the end."""
        run.latency = lat
        self._add_reference_window(lat)
        attrs = {"n_params": lat.params, "gflops": round(lat.gflops, 4), "gflops_imgsz": self.latency_imgsz,
                 "latency_ms": self.scaled(lat).latency_ms, "latency_own_ms": lat.median_ms,
                 "latency_p90_ms": round(lat.p90_ms, 4), "latency_iqr_ms": round(lat.iqr_ms, 4),
                 "latency_min_ms": round(lat.min_ms, 4), "latency_n": lat.n, "latency_threads": lat.threads,
                 "latency_s": round(lat.measure_s, 2), "latency_exclusive_s": round(lat.exclusive_s, 2),
                 "latency_backend": lat.backend, "peak_mem_mb": lat.peak_mem_mb}
        if lat.ratio is not None:
            attrs.update({"latency_ratio": lat.ratio, "latency_ci_low": lat.ci_low, "latency_ci_high": lat.ci_high,
                          "latency_ci_level": lat.ci_level, "latency_reference_ms": lat.reference_ms,
                          "latency_aa": lat.aa, "latency_foreign_cpu_s": lat.foreign_cpu_s,
                          "latency_windows": len(lat.windows),
                          "latency_windows_rejected": [w["rejected"] for w in lat.windows if w["rejected"]]})
            write_windows(run.trial.user_attrs.get("run_dir"), lat)
        if not lat.accepted:  # kept off the exported front until remeasure_contended() passes (front/pareto.py)
            attrs["latency_contended"] = True
            self.progress.note(f"trial {run.number}: latency contended ({'; '.join(lat.rejected)}) after "
                               f"{len(lat.windows)} window(s); timed again at the end of the run")
        if lat.contended:
            attrs["latency_contended_by"] = lat.contended
        for key, value in attrs.items():
            run.trial.set_user_attr(key, value)

    def _add_reference_window(self, lat: LatencyResult) -> None:
        """A paired measurement's reference median joins the study's windows until the study's reference latency
        has settled (search.latency.study_reference_ms); from then on it is fixed for the study's life."""
        info = dict(self.study.user_attrs.get(st.LATENCY_REF_ATTR) or {"windows": [], "fixed": False})
        if lat.reference_ms is None or info["fixed"]:
            return
        windows = [*info["windows"], lat.reference_ms]
        self.study.set_user_attr(st.LATENCY_REF_ATTR, {"windows": windows, "ms": study_reference_ms(windows, SETTLE),
                                                       "fixed": len(windows) >= SETTLE})

    def scaled(self, lat: LatencyResult) -> LatencyResult:
        """``lat`` with its latency objective set: the paired ratio times the study's reference latency as it is
        now (settled after the first few measurements), or the candidate's own median when it was timed alone."""
        info = self.study.user_attrs.get(st.LATENCY_REF_ATTR)
        lat.latency_ms = lat.ratio * info["ms"] if lat.ratio is not None and info else lat.median_ms
        return lat

    def infeasible(self, run: InFlight, lat: LatencyResult) -> str | None:
        """Apply --max-latency-ms / --max-params through Optuna's constraints (value <= 0 is feasible); the broken
        limits, or None.

        A candidate that breaks one is never trained: it is told COMPLETE with mAP 0 and its measured latency,
        so samplers learn where the infeasible region is while ``study.best_trials`` ignores it."""
        c = self.constraints
        limits = {"latency_ms": (lat.latency_ms, c.max_latency_ms), "params": (lat.params, c.max_params)}
        for trial in run.trials():
            for name, (value, limit) in limits.items():
                if limit is not None:
                    trial.set_constraint(name, float(value - limit))
        broken = [f"{name} {value:g} > {limit:g}" for name, (value, limit) in limits.items()
                  if limit is not None and value > limit]
        if not broken:
            return None
        reason = "; ".join(broken)
        values = obj.values(self.objectives, lat, None)
        for trial in run.trials():
            trial.set_user_attr("infeasible", reason)
            self.study.tell(trial, values)
        self.progress.note(f"trial {run.number}: infeasible ({reason}), not trained")
        return reason

    def remeasure_contended(self, pool: WorkPool, space: SearchSpace, imgsz: int) -> None:
        """Time again, now that no training runs, every completed trial whose latency was recorded contended; the
        results go to the study's ``REMEASURED_ATTR`` (a finished trial's values cannot change), from which the
        front reads them (search/front/pareto.py ``front_trials``). Trials that fail again stay off the front."""
        done = self.study.user_attrs.get(st.REMEASURED_ATTR) or {}
        todo = [t for t in st.completed_trials(self.study) if t.user_attrs.get("latency_contended")
                and "reused_from" not in t.user_attrs and str(t.number) not in done]
        if not todo:
            return
        self.progress.say(f"timing {len(todo)} contended latenc{'y' if len(todo) == 1 else 'ies'} again")
        pending = {}
        for t in todo:
            key = ("remeasure", t.number)
            pool.submit_latency(key, space.suggest(optuna.trial.FixedTrial(t.params)), imgsz)
            pending[key] = t
        while pending:
            for event in pool.wait(timeout_s=1.0):
                t = pending.pop(event.key, None)
                if t is not None:
                    self._record_again(t, event.result)

    def _record_again(self, t: optuna.trial.FrozenTrial, lat: LatencyResult) -> None:
        info = self.study.user_attrs.get(st.LATENCY_REF_ATTR) or {}
        ok = not lat.error and lat.accepted and lat.ratio is not None and "ms" in info
        entry = {"accepted": bool(ok), "error": lat.error, "rejected": lat.rejected, "ratio": lat.ratio,
                 "ci_low": lat.ci_low, "ci_high": lat.ci_high, "latency_ms": lat.ratio * info["ms"] if ok else None}
        write_windows(t.user_attrs.get("run_dir"), lat, "latency-windows-remeasured.json")
        done = {**(self.study.user_attrs.get(st.REMEASURED_ATTR) or {}), str(t.number): entry}
        self.study.set_user_attr(st.REMEASURED_ATTR, done)
        verdict = (f"ratio {lat.ratio:.4f} [{lat.ci_low:.4f}, {lat.ci_high:.4f}]" if ok
                   else f"still not trusted ({lat.error or '; '.join(lat.rejected)}): left off the front")
        self.progress.note(f"trial {t.number:>3}  latency timed again: {verdict}")


def write_windows(run_dir: str | None, lat: LatencyResult, name: str = "latency-windows.json") -> None:
    """Every window's raw runs beside the trial (the estimator can be re-read from them later); best effort."""
    if not run_dir or not lat.windows:
        return
    with contextlib.suppress(OSError):
        (Path(run_dir) / name).write_text(json.dumps({"ratio": lat.ratio, "accepted": lat.accepted,
                                                      "windows": lat.windows}))


def measured(trial: optuna.trial.FrozenTrial) -> LatencyResult:
    """The meter's measurement of a trial, as its attributes recorded it (for objectives known before training)."""
    a = trial.user_attrs
    return LatencyResult(median_ms=a.get("latency_own_ms"), latency_ms=a.get("latency_ms"), params=a.get("n_params"),
                         gflops=a.get("gflops"), peak_mem_mb=a.get("peak_mem_mb"))
