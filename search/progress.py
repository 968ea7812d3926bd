"""What a person sees while a search runs: a progress bar with one line per finished trial, and the study's note
on its optuna-dashboard page (progress, the front, the commands that resume or extend it, the settings)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from . import objectives as obj
from .front import confirm, pareto
from .front.report import front_rows
from .settings import Settings
from .storage import study as st
from .storage.companions import RungStudies


@dataclass(frozen=True)
class EpochPlan:
    """How many training epochs a search spends, for the estimate of the time left: every candidate trains to the
    first rung, a share of those goes on to each next rung (successive halving: ``1 / eta`` until the study shows
    its own share), and after the budget the front and the base train again at the top rung with ``confirm_seeds``
    more seeds."""

    rungs: tuple[int, ...]
    eta: int
    budget: int
    confirm_seeds: int
    workers: int

    def expected(self, to_confirm: int, promotions: Sequence[tuple[int, int]] = ()) -> float:
        """Epochs of the whole run (an upper bound: a reused or infeasible candidate trains none), ``to_confirm``
        trials trained again by the confirmation (the front and the base, once when the base is on the front).

        ``promotions``: per rung below the top, (candidates with a result there, how many of them went on) so far.
        The share going on is estimated from them with ``eta`` prior results of which one goes on: asynchronous
        halving promotes more than ``1 / eta`` (20 and 10 of 50 candidates, not 16 and 5), which 1 / eta alone
        underestimated by a fifth of the run."""
        return self.work(to_confirm, promotions)[0]

    def work(self, to_confirm: int, promotions: Sequence[tuple[int, int]] = ()) -> tuple[float, float]:
        """(epochs, trainings) of the whole run: a candidate trains each rung it reaches in a training of its own
        (a promotion continues from the rung's checkpoint), the confirmation one per trial and seed."""
        epochs, trainings, before, reaching = 0.0, 0.0, 0, float(self.budget)
        for i, rung in enumerate(self.rungs):
            epochs += reaching * (rung - before)
            trainings += reaching
            results, went_on = promotions[i] if i < len(promotions) else (0, 0)
            before, reaching = rung, max(reaching * (went_on + 1) / (results + self.eta), float(went_on))
        confirming = self.confirm_seeds * to_confirm
        return epochs + confirming * self.rungs[-1], trainings + confirming

    def seconds_left(self, spent: tuple[float, float], to_confirm: int, cost: "TrainingCost | None",
                     promotions: Sequence[tuple[int, int]] = ()) -> float | None:
        """Wall seconds to the end, ``workers`` trainings at a time, from the (epochs, trainings) ``spent`` so far;
        None before any training was timed."""
        if cost is None:
            return None
        epochs, trainings = self.work(to_confirm, promotions)
        epochs_left = max(0.0, epochs - spent[0])
        seconds = epochs_left * cost.per_epoch + max(0.0, trainings - spent[1]) * cost.per_training
        # The workers share what is left, but no faster than its longest training, which runs on one of them: the
        # confirmation of a one-trial front ends a run with one worker training and the others idle.
        longest = cost.per_training + cost.per_epoch * min(epochs_left, self.rungs[-1]) if epochs_left else 0.0
        return max(seconds / max(1, self.workers), longest)


@dataclass(frozen=True)
class TrainingCost:
    """Seconds of one training: ``per_training`` (its setup, the first epoch's warm-up, the validation, the rung
    checkpoint) plus ``per_epoch`` for each epoch. A default run's one-epoch rung-1 trainings cost about 8 s more
    than a steady epoch: charged per epoch, that made a run's last, longer trainings look 1.5 times as dear."""

    per_training: float
    per_epoch: float

    @classmethod
    def fit(cls, timings: Sequence[tuple[float, float]]) -> "TrainingCost | None":
        """Least squares over finished trainings' (epochs, seconds); with trainings of one length only, or a fit
        that is not positive, every second is charged per epoch. None before any training finished."""
        if not timings:
            return None
        epochs, seconds = (np.array(column, dtype=float) for column in zip(*timings))
        if len(set(epochs.tolist())) > 1:
            per_epoch, per_training = np.polyfit(epochs, seconds, 1)
            if per_training >= 0 and per_epoch > 0:
                return cls(float(per_training), float(per_epoch))
        return cls(0.0, float(seconds.sum() / epochs.sum()))


def promotions(study: optuna.Study, rungs: Sequence[int]) -> list[tuple[int, int]]:
    """Per rung below the top: (candidates with a result at that rung, how many of them went on to a later rung,
    finished or under way) so far, for :meth:`EpochPlan.expected`."""
    counts = [[0, 0] for _ in rungs[:-1]]
    for t in study.get_trials(deepcopy=False):
        if "reused_from" in t.user_attrs:
            continue
        results = st.rung_results(t)
        furthest = max([*results, t.user_attrs.get("promoted_to") or 0], default=0)
        for count, epochs in zip(counts, rungs):
            if epochs in results:
                count[0] += 1
                count[1] += furthest > epochs
    return [(results, went_on) for results, went_on in counts]


def spent(study: optuna.Study, top_epochs: int) -> tuple[int, int]:
    """(epochs, trainings) the study's candidates and confirmations finished so far: each candidate up to the last
    rung it finished, one training per rung (one epoch count and one training when it has no rungs; a reused or
    infeasible one none), and one top-rung training per confirmation seed."""
    epochs = trainings = 0
    for t in st.counted_trials(study):
        if "reused_from" in t.user_attrs or "infeasible" in t.user_attrs:
            continue
        results = st.rung_results(t)
        epochs += max(results) if results else top_epochs
        trainings += len(results) or 1
    confirmed = study.user_attrs.get(st.CONFIRM_ATTR) or {}
    seeds = sum(len(entry.get("offsets", [])) for entry in confirmed.values())
    return epochs + top_epochs * seeds, trainings + seeds


class Progress:
    """What the console shows while a search runs: one live status line (candidates, trainings, epochs, the front,
    the time left), a tqdm bar on a terminal and a plain line every ``every_s`` seconds elsewhere (a pipe, a log
    file). Events (a trial finished, a rung result, a retry) go to the study's ``log``, and to the console too
    with ``verbose``; what a person must see (a stage begins, a stop) is ``say``."""

    def __init__(self, study: optuna.Study, objectives: tuple[obj.Objective, ...], plan: EpochPlan,
                 log: logging.Logger | None = None, verbose: bool = True, on_update=None, every_s: float = 60.0,
                 clock=time.monotonic) -> None:
        self.on_update = on_update  # called after each finished trial (the study's dashboard note)
        self.study, self.objectives, self.plan = study, objectives, plan
        self.log, self.verbose, self.every_s, self.clock = log, verbose, every_s, clock
        epochs, trainings = spent(study, plan.rungs[-1])
        self.spent, self.trainings = float(epochs), trainings
        self.timings: list[tuple[float, float]] = []  # (epochs, seconds) of each training this run saw finish
        self.running, self.base, self._last_line = 0, None, float("-inf")
        self._estimated_at = clock()  # when the last training finished: the time left counts down from there
        done = len(st.counted_trials(study))
        # disable=None: a bar on a terminal only; elsewhere the periodic status lines of tick().
        self.bar = tqdm(total=plan.budget, initial=min(done, plan.budget), desc="candidates", unit="cand",
                        file=sys.stderr, dynamic_ncols=True, disable=None,
                        bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {postfix}")
        self._refresh()

    # -- what happened -----------------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        """An event: to the study's log; on the console with ``verbose``."""
        if self.log is not None:
            self.log.info(text)
        if self.verbose:
            self.bar.write(text, file=sys.stderr)

    def say(self, text: str) -> None:
        """A line for the console whatever ``verbose`` says (a stage begins, a stop), and the log."""
        if self.log is not None:
            self.log.info(text)
        self.bar.write(text, file=sys.stderr)

    def completed(self, number: int, text: str) -> None:
        t = self.study.get_trials(deepcopy=False)[number]
        values = "  ".join(f"{o.name} {o.show(v)}" for o, v in zip(self.objectives, t.values))
        self.note(f"{self._count()} trial {number:>3}  ok    {values}  {text}")
        self._refresh()

    def failed(self, number: int, text: str) -> None:
        self.note(f"{self._count()} trial {number:>3}  FAIL  {text}")
        self._refresh()

    def trained(self, epochs: float, seconds: float) -> None:
        """A training of ``epochs`` epochs finished in ``seconds``: the estimate learns what a training and an epoch
        cost."""
        self.spent += epochs
        self.trainings += 1
        self.timings.append((epochs, seconds))
        self._estimated_at = self.clock()
        self._promotions = promotions(self.study, self.plan.rungs)

    # -- the status line ---------------------------------------------------------------------------------------
    def tick(self, running: int, base: tuple[int, int, float, tuple[int, float] | None] | None = None) -> None:
        """The driver's loop, with ``running`` trainings under way (and ``base``: epochs done, epochs, seconds so far
        and the latest validation's (epoch, mAP50-95) of the base training, while it runs): refresh the bar, or print
        the status line when ``every_s`` seconds
        have passed since the last one (not a terminal)."""
        self.running, self.base = running, base
        if not self.bar.disable:
            self.bar.set_postfix_str(self.status(), refresh=True)
        elif self.clock() - self._last_line >= self.every_s:
            self._last_line = self.clock()
            print(f"{self._count()} {self.status()}", file=sys.stderr, flush=True)

    def status(self) -> str:
        """``2 training, 37/126 epochs, front: mAP50-95 0.412, latency_ms 3.21 (4 trials), ~21 min left``."""
        front = self._front
        expected = self.plan.expected(self._to_confirm, self._promotions)
        if self.base is not None:  # candidates wait for it: its own epochs and time left, then what comes after
            done, total, seconds, latest = self.base
            shown = f" (mAP50-95 {latest[1]:.4f} at epoch {latest[0]})" if latest else ""
            left = f", ~{_duration(seconds / done * (total - done))} left" if done else ""
            return f"base training: epoch {done}/{total}{shown}{left}; then {self.plan.budget} candidates, " \
                   f"about {expected:.0f} epochs"
        parts = [f"{self.running} training", f"{self.spent:.0f}/{expected:.0f} epochs"]
        if front:
            best = ", ".join(f"{o.name} {o.show((max if o.maximize else min)(t.values[i] for t in front))}"
                             for i, o in enumerate(self.objectives))
            parts.append(f"front: {best} ({len(front)} trial{'s' if len(front) != 1 else ''})")
        cost = TrainingCost.fit(self.timings)
        left = self.plan.seconds_left((self.spent, self.trainings), self._to_confirm, cost, self._promotions)
        if left is not None:  # the trainings under way spend the epochs left as the clock runs (never below 30 s)
            left = max(left - (self.clock() - self._estimated_at), min(left, 30.0))
        parts.append("time left: estimated after the first training" if left is None else f"~{_duration(left)} left")
        return ", ".join(parts)

    def _refresh(self) -> None:
        """After a trial finished: the count and the front (which only a finished trial changes) read again."""
        self._front = pareto.pareto_trials(self.study, self.objectives)
        self._promotions = promotions(self.study, self.plan.rungs)
        # what the confirmation will train; before the base's trial exists, the base it will add
        self._to_confirm = len(confirm.targets(self.study, self.objectives, self._front)) + \
            (pareto.base_trial(self.study) is None)
        self.bar.n = min(len(st.counted_trials(self.study)), self.plan.budget)
        self.bar.set_postfix_str(self.status(), refresh=True)
        if self.on_update is not None:
            self.on_update()

    def _count(self) -> str:
        return f"[{len(st.counted_trials(self.study))}/{self.plan.budget}]"

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``1 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class StudyNotes:
    """The study's optuna-dashboard note (markdown on the study page): settings, the commands that resume or
    extend the study, progress and the current front, rewritten after every finished trial."""

    def __init__(self, study: optuna.Study, settings: Settings, study_dir: Path, resources: str,
                 storage: optuna.storages.BaseStorage | None = None) -> None:
        """``storage``: where the rung companions are looked up (none linked without it)."""
        self.study, self.settings, self.study_dir, self.resources = study, settings, study_dir, resources
        self.storage = storage

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
                 f"Files: `{self.study_dir}` (trials, artifacts, pareto/).", ""]
        rung_studies = RungStudies(study, self.storage).names() if self.storage is not None else []
        if rung_studies:  # ids in the dashboard's own URLs: its studies are /dashboard/studies/<id>
            links = ", ".join(f"[{name}](/dashboard/studies/{self.storage.get_study_id_from_name(name)})"
                              for name in rung_studies)
            lines += [f"Results below the top rung, one trial per candidate: {links}.", ""]
        lines += ["### Pareto front", ""]
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
