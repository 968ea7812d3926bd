"""What a person sees while a search runs: a progress bar with one line per finished trial, and the study's note
on its optuna-dashboard page (progress, the front, the commands that resume or extend it, the settings)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from . import objectives as obj
from .front import pareto
from .front.report import front_rows
from .settings import Settings
from .storage import study as st


class Progress:
    """tqdm bar of completed trials / budget with the best value of each objective and the Pareto size; one line
    per finished trial."""

    def __init__(self, study: optuna.Study, objectives: tuple[obj.Objective, ...], budget: int,
                 on_update=None) -> None:
        self.on_update = on_update  # called after each finished trial (the study's dashboard note)
        self.study = study
        self.objectives = objectives
        self.budget = budget
        done = len(st.counted_trials(study))
        # disable=None: a bar on a terminal; in logs (no TTY) only the one-line-per-trial records below.
        self.bar = tqdm(total=budget, initial=min(done, budget), desc="trials", unit="trial", file=sys.stderr,
                        dynamic_ncols=True, disable=None,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        self._refresh()

    def _refresh(self) -> None:
        done = st.counted_trials(self.study)
        told = [t for t in done if t.values]  # candidates stopped below the top rung have no values
        if told:
            best = []
            for i, o in enumerate(self.objectives):
                pick = max if o.maximize else min
                best.append(f"{o.name} {o.show(pick(t.values[i] for t in told))}")
            front = pareto.pareto_trials(self.study, self.objectives)
            self.bar.set_postfix_str(f"best {', '.join(best)}; Pareto {len(front)}")
        self.bar.n = min(len(done), self.budget)
        self.bar.refresh()
        if self.on_update is not None:
            self.on_update()

    def note(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def completed(self, number: int, text: str) -> None:
        t = self.study.get_trials(deepcopy=False)[number]
        values = "  ".join(f"{o.name} {o.show(v)}" for o, v in zip(self.objectives, t.values))
        self.note(f"{self._count()} trial {number:>3}  ok    {values}  {text}")
        self._refresh()

    def failed(self, number: int, text: str) -> None:
        self.note(f"{self._count()} trial {number:>3}  FAIL  {text}")
        self._refresh()

    def _count(self) -> str:
        return f"[{len(st.counted_trials(self.study))}/{self.budget}]"

    def close(self) -> None:
        self.bar.close()


class StudyNotes:
    """The study's optuna-dashboard note (markdown on the study page): settings, the commands that resume or
    extend the study, progress and the current front, rewritten after every finished trial."""

    def __init__(self, study: optuna.Study, settings: Settings, study_dir: Path, resources: str) -> None:
        self.study, self.settings, self.study_dir, self.resources = study, settings, study_dir, resources

    def update(self, status: str = "running") -> None:
        try:
            st.save_note(self.study, self.body(status))
        except Exception:  # a note is a convenience: never stop a search for it (e.g. the study was just renamed)
            pass

    def body(self, status: str) -> str:
        study, settings = self.study, self.settings
        run = settings.run
        counted = len(st.counted_trials(study))
        by_state = {state: len(study.get_trials(deepcopy=False, states=(state,)))
                    for state in (TrialState.FAIL, TrialState.RUNNING)}
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = [f"## attnas study `{study.study_name}`", "",
                 f"**{status}** at {stamp}: {counted}/{run.budget} completed trial(s) counted, "
                 f"{by_state[TrialState.FAIL]} failed, {by_state[TrialState.RUNNING]} running "
                 f"(driver pid {os.getpid()}; {self.resources}).", "",
                 "Resume after a stop (settings come from the study):", "",
                 f"```\n{settings.resume_command(study.study_name)}\n```", "",
                 f"Extend to {2 * run.budget} completed trials:", "",
                 f"```\n{settings.resume_command(study.study_name, 2 * run.budget)}\n```", "",
                 f"Files: `{self.study_dir}` (trials, artifacts, pareto/).", "", "### Pareto front", ""]
        rows = front_rows(study, settings.study.objective_table()) if st.completed_trials(study) else []
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
        else:
            lines.append("(no completed trial yet)")
        recorded = settings.study.as_dict()
        lines += ["", "### Settings (the study's identity)", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{_short_json(v)}` |" for k, v in recorded.items() if k != "layout"]
        return "\n".join(lines) + "\n"


def _short_json(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str).replace("|", "\\|")
    return text if len(text) <= 300 else text[:297] + "..."
