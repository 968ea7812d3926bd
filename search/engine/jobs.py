"""The files and trainings of a trial: its run directory and candidate YAML, and the trainings a run submits (a
candidate's, up to its rung; a front trial's again, with another seed). Everything a job needs besides the candidate
comes from the run's :class:`~search.settings.Settings` and what the session resolved (the dataset YAML, the study's
directory, the threads Ray gives a trial, the base weights)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import optuna

from space import Candidate, to_yaml

from ..errors import writing
from ..settings import Settings
from ..storage import study as st
from ..training.proxy import TrainJob
from ..training.weights import BaseWeights
from .inflight import InFlight


@dataclass
class TrainJobs:
    """Makes the :class:`TrainJob` of each training; ``weights`` is set once the base is stored (``--weights auto``)."""

    settings: Settings
    data_yaml: str
    study_dir: Path
    threads: int
    weights: BaseWeights | None = None  # what candidates inherit; None: from scratch (or the base is pending)

    def trial_dir(self, number: int) -> Path:
        return self.study_dir / "trials" / str(number)

    def write_candidate(self, study: optuna.Study, trial: optuna.Trial, candidate: Candidate, store=None) -> str:
        """The candidate's YAML in the trial's run directory (returned), uploaded to ``store`` as the trial's
        artifact with a dashboard note."""
        run_dir = self.trial_dir(trial.number)
        yaml_path = run_dir / f"candidate-{candidate.hash}.yaml"
        run_dir.mkdir(parents=True, exist_ok=True)
        yaml_text = to_yaml(candidate, {"study": study.study_name, "trial": trial.number})
        with writing(yaml_path):
            yaml_path.write_text(yaml_text)
        trial.set_user_attr("run_dir", str(run_dir))
        if store is not None:
            artifact_id = optuna.artifacts.upload_artifact(
                artifact_store=store, file_path=str(yaml_path), study_or_trial=trial,
                mimetype="application/x-yaml", encoding="utf-8")
            with contextlib.suppress(Exception):  # a note is a convenience, never a reason to fail a trial
                st.save_note(trial, st.trial_note(trial, candidate.describe(), yaml_path, artifact_id))
        return yaml_text

    def candidate(self, run: InFlight, stop_at: int | None) -> TrainJob:
        """``run`` trained until ``stop_at`` epochs (its rung's; None: the schedule's), from the checkpoint of the
        rung before."""
        return self._job(run.number, run.candidate, run.yaml_text, run.trial.user_attrs["run_dir"],
                         save_weights=self.settings.run.save_weights,
                         fault=dict(self.settings.run.faults).get(run.number),
                         stop_at=stop_at,
                         resume=run.checkpoint if run.rung > 0 else None)

    def confirmation(self, study_name: str, number: int, candidate: Candidate, offset: int) -> TrainJob:
        """Trial ``number`` trained again in full with seed + ``offset``."""
        schedule = self.settings.study.proxy
        return self._job(number, candidate, to_yaml(candidate, {"study": study_name, "trial": number}),
                         str(self.trial_dir(number) / f"confirm-seed+{offset}"),
                         schedule=replace(schedule, seed=schedule.seed + offset))

    def _job(self, number: int, candidate: Candidate, yaml_text: str, run_dir: str, **kw) -> TrainJob:
        kw.setdefault("schedule", self.settings.study.proxy)
        return TrainJob(trial=number, candidate_hash=candidate.hash, yaml_text=yaml_text, data=self.data_yaml,
                        run_dir=run_dir, device=self.settings.run.train_device, threads=self.threads,
                        weights=self.weights.state_path if self.weights else None,
                        base_layers=candidate.base_layers, skip_keys=self.weights.skip_keys if self.weights else (),
                        **kw)
