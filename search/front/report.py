"""The front as a person reads it: table rows (printed, and on the study's optuna-dashboard note) and the report
printed at the end of a run."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from space.cli import table

from .. import objectives as obj
from ..storage import study as st
from . import confirm, pareto


def front_rows(study: optuna.Study, objectives: tuple[obj.Objective, ...]) -> list[dict[str, Any]]:
    """The Pareto-optimal trials as table rows: each objective, then size and candidate."""
    rows = []
    for t in pareto.pareto_trials(study, objectives):
        a = t.user_attrs
        row: dict[str, Any] = {"trial": t.number}
        row.update({o.name: o.show(v) for o, v in zip(objectives, t.values)})
        row.update({"mAP50": f"{a.get('map50', float('nan')):.4f}",
                    "p90 ms": f"{a.get('latency_p90_ms', float('nan')):.2f}",
                    "params": f"{a.get('n_params', 0) / 1e6:.3f}M", "GFLOPs": f"{a.get('gflops', 0):.2f}",
                    "candidate": a.get("placements", "?")})
        rows.append(row)
    return rows


def report(study: optuna.Study, objectives: tuple[obj.Objective, ...], rungs: tuple[int, ...], storage_url: str,
           artifact_dir: Path, wall: float) -> None:
    """Print the Pareto front as a table, the confirmed front, the study's fidelity and the dashboard command."""
    done = st.completed_trials(study)
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    cut_short = [t for t in failed if t.user_attrs.get("fail_kind") == "driver-stopped"]  # queued again: not lost
    stopped = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
               if st.RUNG_RESULTS in t.user_attrs]
    took = f"; this run took {wall:.0f} s" if wall else ""
    below = f", {len(stopped)} stopped below the top rung" if stopped else ""
    again = f", {len(cut_short)} cut short by a stop and queued again" if cut_short else ""
    print(f"\n{len(done)} completed{below}, {len(failed) - len(cut_short)} failed{again} trial(s) in the study{took}")
    rows = front_rows(study, objectives) if done else []
    directions = ", ".join(f"{o.name} {'up' if o.maximize else 'down'}" for o in objectives)
    if rows:
        print(f"Pareto front ({len(rows)} trial(s) at the top rung; {directions}):")
        print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    confirmed = confirm.confirmed_front(objectives, confirm.confirmed(study, objectives))
    if confirmed:
        print(f"\nConfirmed front on seed means ({len(confirmed)} trial(s)):")
        crow = [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in c.row(objectives).items()}
                for c in confirmed]
        print(table(crow, list(crow[0])))
    fidelity = confirm.fidelity_report(study, objectives, rungs)
    with contextlib.suppress(Exception):
        study.set_user_attr("attnas_fidelity", fidelity)
    print("\n" + "\n".join(confirm.describe(fidelity)))
    print(f"\nDashboard: {st.dashboard_command(storage_url, artifact_dir)}")
