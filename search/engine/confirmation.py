"""Confirmation: after the budget, the top-rung front and the base train again with other seeds, up to ``workers``
at a time; each result is recorded in the study as it arrives (the bookkeeping is :mod:`search.front.confirm`)."""

from __future__ import annotations

import contextlib

import optuna

from space import SearchSpace

from .. import objectives as obj
from ..front import confirm
from ..storage import study as st
from ..training.proxy import DISK_FULL
from .feasibility import measured
from .inflight import DiskFull
from .jobs import TrainJobs
from .work import WorkPool


def confirm_front(study: optuna.Study, space: SearchSpace, pool: WorkPool, jobs: TrainJobs,
                  objectives: tuple[obj.Objective, ...], seeds: int, progress, started: float) -> None:
    """Train every front trial and the base with ``seeds`` more seeds (seed + 1, ...)."""
    todo = confirm.todo(study, objectives, seeds)
    if not todo:
        return
    progress.say(f"confirming the front: {len(todo)} training(s) of {len({t.number for t, _ in todo})} "
                  f"trial(s) with other seeds")
    pending: dict[tuple, optuna.trial.FrozenTrial] = {}
    last_beat = 0.0
    try:
        while todo or pending:
            last_beat = st.beat(study, started, last_beat)
            while todo and len(pending) < pool.workers:
                trial, k = todo.pop(0)
                key = ("confirm", trial.number, k)
                candidate = space.suggest(optuna.trial.FixedTrial(trial.params))
                pool.submit_train(key, jobs.confirmation(study.study_name, trial.number, candidate, k))
                pending[key] = trial
            progress.tick(len(pending))
            for event in pool.wait(timeout_s=1.0):
                if event.kind != "train" or event.key not in pending:
                    continue
                trial, res = pending.pop(event.key), event.result
                if res.error_kind == DISK_FULL:  # not recorded: a resume trains this seed again
                    raise DiskFull(f"confirming trial {trial.number}: {res.error}")
                values = None if res.error else obj.values(objectives, measured(trial), res)
                if not res.error:
                    progress.trained(jobs.settings.study.proxy.epochs, res.train_s)
                confirm.record(study, trial.number, event.key[2], values, res.error, res.train_s)
                shown = res.error or "  ".join(f"{o.name} {o.show(v)}" for o, v in zip(objectives, values)
                                               if o.needs_training)
                progress.note(f"trial {trial.number:>3}  seed +{event.key[2]}  {shown}")
    finally:
        if pending:
            with contextlib.suppress(Exception):
                pool.cancel_all()
