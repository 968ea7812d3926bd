"""A companion study per rung, for optuna-dashboard: ``NAME · rung 3`` holds one COMPLETE trial per candidate result
at that rung (the candidate's parameters, the rung's objective values), written as results arrive.

The main study tells only top-rung results: its front compares like with like and its sampler learns from them.
Until candidates reach the top rung the dashboard would show a front of one point and trials RUNNING without values;
the companions make every rung plottable meanwhile, without changing what the main study holds.
"""

from __future__ import annotations

import contextlib
import warnings

import optuna

MARK = " · rung "


def rung_study_name(study_name: str, epochs: int) -> str:
    return f"{study_name}{MARK}{epochs}"


def is_rung_study(name: str) -> bool:
    """True for a companion study (listed apart from the studies a user runs)."""
    return MARK in name


class RungStudies:
    """The companions of ``study`` in ``storage``, created on their first result; a trial is added once per rung."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
        self.study, self.storage = study, storage
        self._open: dict[int, tuple[optuna.Study, set[int]]] = {}  # epochs -> (companion, trial numbers in it)

    def record(self, trial: optuna.Trial, epochs: int, values: list[float]) -> None:
        """``trial``'s result at the rung of ``epochs`` epochs. A companion is a view: a failure to write it is
        never a reason to stop the search (the main study holds the same result)."""
        with contextlib.suppress(Exception):
            companion, numbers = self._companion(epochs)
            if trial.number in numbers:
                return
            frozen = self.storage.get_trial(trial._trial_id)
            shown = {k: frozen.user_attrs[k] for k in ("candidate_hash", "placements") if k in frozen.user_attrs}
            companion.add_trial(optuna.trial.create_trial(
                params=frozen.params, distributions=frozen.distributions, values=values,
                user_attrs={"trial": trial.number, **shown}))
            numbers.add(trial.number)

    def names(self) -> list[str]:
        """The companions that exist, lowest rung first."""
        all_names = {s.study_name for s in self.storage.get_all_studies()}
        prefix = f"{self.study.study_name}{MARK}"
        return sorted((n for n in all_names if n.startswith(prefix)), key=lambda n: int(n.rsplit(" ", 1)[1]))

    def _companion(self, epochs: int) -> tuple[optuna.Study, set[int]]:
        if epochs not in self._open:
            companion = optuna.create_study(study_name=rung_study_name(self.study.study_name, epochs),
                                            storage=self.storage, directions=self.study.directions,
                                            load_if_exists=True)
            if companion.metric_names is None and self.study.metric_names:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    companion.set_metric_names(self.study.metric_names)
            companion.set_user_attr("attnas_rung_of", {"study": self.study.study_name, "epochs": epochs})
            numbers = {t.user_attrs.get("trial") for t in companion.get_trials(deepcopy=False)}
            self._open[epochs] = (companion, numbers)
        return self._open[epochs]
