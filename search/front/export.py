"""The Pareto front of a study as files (at the end of a run, and by ``python -m search.export`` at any time).

Writes into ``<out>/<study>/``: ``pareto/*.yaml`` (one Ultralytics YAML per Pareto trial, provenance header),
``pareto/*.pt`` (the same candidates as ready-to-train checkpoints holding the base's weights; ``*-tuned.pt``: their
top-rung weights where ``--save-weights`` kept them, see :mod:`search.front.checkpoints`),
``pareto.csv`` (a column per objective), ``pareto.png`` (front highlighted, base marked; with more than two
objectives one ``pareto-A-vs-B.png`` per pair), ``hypervolume.csv`` and ``hypervolume.png`` (hypervolume after each
completed trial) and ``summary.json``.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from space import Candidate, build_space, load_base, to_yaml

from .. import objectives as obj
from ..errors import SearchError
from ..latency.window import REJECTIONS, rejection_kind
from ..settings import StudySettings
from ..storage import study as st
from ..training.data import data_names, resolve_data_yaml
from ..training.weights import STATE_FILE
from . import confirm, pareto
from .checkpoints import write_mapped, write_tuned


def export_study(study: optuna.Study, study_dir: Path, storage: optuna.storages.BaseStorage) -> Path:
    """Write the front files for ``study`` (held in ``storage``) into ``study_dir``; returns the directory."""
    objectives = pareto.objectives_of(study)
    study_dir.mkdir(parents=True, exist_ok=True)
    done = st.completed_trials(study)
    # With confirmation runs, the exported front is the one on the seed means (search/confirm.py).
    confirmed = confirm.confirmed_front(objectives, confirm.confirmed(study, objectives))
    front = [c.trial for c in confirmed] or pareto.pareto_trials(study, objectives)
    stats = {c.trial.number: c.row(objectives) for c in confirmed}
    pareto_dir = study_dir / "pareto"
    pareto_dir.mkdir(exist_ok=True)
    for old in [*pareto_dir.glob("*.yaml"), *pareto_dir.glob("*.pt")]:  # the front moves between exports
        old.unlink()
    yamls = {t.number: _write_pareto_yaml(study, storage, objectives, t, pareto_dir) for t in front}
    checkpoints = _write_checkpoints(study, study_dir, front, yamls)
    _write_csv(objectives, front, yamls, stats, study_dir / "pareto.csv")
    ref = obj.reference_point(objectives, [t.values for t in done])
    history = hypervolume_history(study, objectives, ref)
    with open(study_dir / "hypervolume.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "hypervolume"])
        w.writerows(history)
    base = pareto.base_trial(study)
    plots = _plot_fronts(study, objectives, done, front, base, study_dir)
    _plot_hypervolume(study, ref, study_dir / "hypervolume.png")
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    summary = {
        "study": study.study_name,
        "objectives": [{"name": o.name, "direction": o.direction, "unit": o.unit} for o in objectives],
        "trials": {k: v for k, v in states.items() if v},
        "settings": study.user_attrs.get(st.SETTINGS_ATTR, {}),
        "versions": study.user_attrs.get(st.VERSIONS_ATTR, {}),
        "base_trial": _row(objectives, base) if base else None,
        "pareto": [{**_row(objectives, t), **stats.get(t.number, {}),
                    "yaml": str(yamls[t.number].relative_to(study_dir)), **checkpoints.get(t.number, {})}
                   for t in front],
        "pareto_on": "seed means of the confirmed trials" if confirmed else "single proxy runs at the top rung",
        "confirmation": confirmation_state(study, objectives),
        "fidelity": study.user_attrs.get("attnas_fidelity"),
        "plots": plots + ["hypervolume.png"],
        "hypervolume": {"reference_point": dict(zip(obj.names(objectives), ref)),
                        "final": history[-1][1] if history else 0.0, "history": "hypervolume.csv"},
        "latency": latency_summary(study),
    }
    (study_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return study_dir


def confirmation_state(study: optuna.Study, objectives) -> dict[str, Any]:
    """Whether the exported front is confirmed: the seeds asked for and the trainings still missing (a run
    stopped before its confirmation ended exports the front of single top-rung runs, flagged so)."""
    seeds = (study.user_attrs.get(st.SETTINGS_ATTR) or {}).get("fidelity", {}).get("confirm_seeds", 0)
    pending = len(confirm.todo(study, objectives, seeds)) if seeds else 0
    return {"seeds": seeds, "trainings_pending": pending, "confirmed": bool(seeds) and not pending}


def latency_summary(study: optuna.Study) -> dict[str, Any]:
    """How the meter's windows went: windows timed and rejected (by reason), trials that needed a second window,
    trials recorded contended and how their end-of-run re-measure went."""
    timed = [t for t in study.get_trials(deepcopy=False)  # a reused result copies its source's attributes
             if "latency_windows" in t.user_attrs and "reused_from" not in t.user_attrs]
    rejected: dict[str, int] = {label: 0 for label in REJECTIONS.values()}
    for t in timed:
        for reasons in t.user_attrs.get("latency_windows_rejected", []):
            for reason in reasons:
                label = rejection_kind(reason)
                rejected[label] = rejected.get(label, 0) + 1
    contended = [t.number for t in timed if t.user_attrs.get("latency_contended")]
    again = study.user_attrs.get(st.REMEASURED_ATTR) or {}
    return {
        "trials_timed": len(timed),
        "windows": sum(t.user_attrs["latency_windows"] for t in timed),
        "windows_rejected": rejected,
        "trials_timed_again": sum(1 for t in timed if t.user_attrs.get("latency_windows_rejected")),
        "contended_trials": contended,
        "remeasured_at_end": {n: {"accepted": e.get("accepted"), "ratio": e.get("ratio")} for n, e in again.items()},
        "contended_off_the_front": [n for n in contended if not (again.get(str(n)) or {}).get("accepted")],
    }


_ATTR_COLUMNS = ("map50", "latency_p90_ms", "n_params", "gflops", "candidate_hash", "placements", "reused_from")


def _row(objectives: tuple[obj.Objective, ...], t: FrozenTrial) -> dict[str, Any]:
    """One trial as a CSV/summary row: its objective values, then what else it recorded."""
    return {"trial": t.number, **dict(zip(obj.names(objectives), t.values)),
            **{k: t.user_attrs.get(k) for k in _ATTR_COLUMNS}}


def _write_pareto_yaml(study: optuna.Study, storage: optuna.storages.BaseStorage, objectives: tuple[obj.Objective, ...],
                       t: FrozenTrial, pareto_dir: Path) -> Path:
    """The trial's candidate YAML (its uploaded artifact, else rebuilt from its parameters) with the result."""
    body = _artifact_yaml(study, storage, t) or _rebuilt_yaml(study, t)
    a = t.user_attrs
    settings = study.user_attrs.get(st.SETTINGS_ATTR, {})
    lat = settings.get("latency", {})
    header = {
        "attnas pareto trial": f"{t.number} of study {study.study_name}",
        **{o.name: f"{o.show(v)} {o.unit}" for o, v in zip(objectives, t.values)},
        "data": settings.get("facts", {}).get("data", {}).get("identity"),
        "latency": _latency_provenance(a, lat, settings.get("facts", {}).get("latency", {})),
        "n_params": a.get("n_params"), f"GFLOPs@{a.get('gflops_imgsz')}": a.get("gflops"),
        "proxy": json.dumps(settings.get("proxy", a.get("proxy")), sort_keys=True),
    }
    lines = [f"# {k}: {v}" for k, v in header.items()]
    path = pareto_dir / f"trial-{t.number:04d}-{a.get('candidate_hash', 'unknown')}.yaml"
    path.write_text("\n".join(lines) + "\n" + body)
    return path


def _latency_provenance(attrs: dict[str, Any], lat: dict[str, Any], facts: dict[str, Any]) -> str:
    where = (f"{lat.get('backend', 'torch')} {facts.get('backend_version', '')} on {lat.get('device')} "
             f"({facts.get('device_model', '?')}) at {lat.get('imgsz')} px, batch {lat.get('batch', 1)}")
    if attrs.get("latency_ratio") is None:
        return f"{attrs.get('latency_ms')} ms median of {attrs.get('latency_n')} runs, {where}"
    return (f"{attrs.get('latency_ms'):.3f} ms = ratio {attrs['latency_ratio']:.4f} (95% CI "
            f"{attrs.get('latency_ci_low'):.4f}-{attrs.get('latency_ci_high'):.4f}, {attrs.get('latency_n')} pairs) x "
            f"the study's reference latency of the base; {where}")


def _artifact_yaml(study: optuna.Study, storage: optuna.storages.BaseStorage, t: FrozenTrial) -> str | None:
    paths = study.user_attrs.get(st.PATHS_ATTR, {})
    artifact_dir = paths.get("artifact_dir")
    source = t
    if "reused_from" in t.user_attrs:  # a reused result has no upload of its own
        source = study.get_trials(deepcopy=False)[t.user_attrs["reused_from"]]
    if not artifact_dir or not Path(artifact_dir).is_dir():
        return None
    store = optuna.artifacts.FileSystemArtifactStore(artifact_dir)
    metas = optuna.artifacts.get_all_artifact_meta(source, storage=storage)
    if not metas:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "c.yaml")
        optuna.artifacts.download_artifact(artifact_store=store, file_path=target, artifact_id=metas[0].artifact_id)
        return Path(target).read_text()


def _rebuilt_yaml(study: optuna.Study, t: FrozenTrial) -> str:
    return to_yaml(_candidate(study, t), {"study": study.study_name, "trial": t.number})


def _candidate(study: optuna.Study, t: FrozenTrial) -> Candidate:
    """The trial's candidate, rebuilt from its parameters (and checked against its recorded hash)."""
    settings = StudySettings.from_dict(study.user_attrs[st.SETTINGS_ATTR])
    space = build_space(load_base(settings.base), settings.space)
    candidate = space.suggest(optuna.trial.FixedTrial(t.params, t.number))
    if candidate.hash != t.user_attrs.get("candidate_hash"):
        raise SearchError(f"trial {t.number}: rebuilding its candidate gives hash {candidate.hash}, the study "
                          f"recorded {t.user_attrs.get('candidate_hash')} (space code changed?)")
    return candidate


def _write_checkpoints(study: optuna.Study, study_dir: Path, front: list[FrozenTrial],
                       yamls: dict[int, Path]) -> dict[int, dict[str, str]]:
    """``pareto/<name>.pt`` for each front trial when the study has base weights (``--weights none`` has none), and
    ``<name>-tuned.pt`` where the trial's top-rung training kept its weights; the paths written, by trial."""
    import torch

    state_path = study_dir / STATE_FILE
    if not front or not state_path.is_file():
        return {}
    settings = StudySettings.from_dict(study.user_attrs[st.SETTINGS_ATTR])
    out = Path((study.user_attrs.get(st.PATHS_ATTR) or {}).get("out") or study_dir.parent)
    data_yaml = resolve_data_yaml(settings.facts.get("data", {}).get("identity") or settings.data, out / ".data")
    # What YOLO(pt) keeps (data, imgsz), and the full training's length and batch, for python -m search.train.
    train_args = {"data": str(data_yaml), "imgsz": settings.proxy.imgsz, "epochs": settings.weights.base_epochs,
                  "batch": settings.proxy.batch}
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    names = data_names(data_yaml)
    written: dict[int, dict[str, str]] = {}
    for t in front:
        yaml_path = yamls[t.number]
        target = yaml_path.with_suffix(".pt")
        write_mapped(target, yaml_path.read_text(), _candidate(study, t).base_layers, state, names, train_args)
        written[t.number] = {"pt": str(target.relative_to(study_dir))}
        source = study.get_trials(deepcopy=False)[t.user_attrs["reused_from"]] if "reused_from" in t.user_attrs else t
        last = Path(source.user_attrs.get("run_dir", "/nonexistent")) / "weights" / "last.pt"
        tuned = yaml_path.with_name(f"{yaml_path.stem}-tuned.pt")
        if last.is_file() and write_tuned(last, tuned):
            written[t.number]["tuned_pt"] = str(tuned.relative_to(study_dir))
    return written


def _write_csv(objectives: tuple[obj.Objective, ...], front: list[FrozenTrial], yamls: dict[int, Path],
               stats: dict[int, dict[str, Any]], path: Path) -> None:
    """One row per front trial; with confirmation, also each objective's seed mean, sd and n, whether its mAP is
    above the base's by more than two standard errors, and its paired difference to the base (mean, sd, seeds)."""
    confirmed = ([f"{o.name}_{k}" for o in objectives for k in ("mean", "sd", "n")]
                 + ["above_base_2se", "vs_base_mean", "vs_base_sd", "vs_base_n"] if stats else [])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["trial", *obj.names(objectives), *confirmed, *_ATTR_COLUMNS, "yaml"])
        w.writeheader()
        for t in front:
            w.writerow({**_row(objectives, t), **stats.get(t.number, {}), "yaml": yamls[t.number].name})


def hypervolume_history(study: optuna.Study, objectives: tuple[obj.Objective, ...],
                        ref: list[float]) -> list[tuple[int, float]]:
    """Hypervolume of the front after each completed trial, in trial order."""
    points: list[tuple[float, ...]] = []
    history = []
    for t in sorted(st.completed_trials(study), key=lambda t: t.number):
        points.append(tuple(t.values))
        history.append((t.number, pareto.hypervolume(points, ref, objectives)))
    return history


def _plot_fronts(study: optuna.Study, objectives: tuple[obj.Objective, ...], done: list[FrozenTrial],
                 front: list[FrozenTrial], base: FrozenTrial | None, study_dir: Path) -> list[str]:
    """Optuna's Pareto-front plot for every pair of objectives (the whole front projected on the pair; one plot,
    ``pareto.png``, for two objectives), with the front's trial numbers and the base model marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_pareto_front

    written = []
    for i, j in itertools.combinations(range(len(objectives)), 2):
        y, x = objectives[i], objectives[j]  # the first objective (mAP by default) up the page
        ax = plot_pareto_front(study, target_names=[x.label(), y.label()],
                               targets=lambda t, i=i, j=j: (t.values[j], t.values[i]))
        for t in front:
            ax.annotate(str(t.number), (t.values[j], t.values[i]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        if base is not None:
            ax.scatter([base.values[j]], [base.values[i]], marker="*", s=160, c="tab:green", zorder=5,
                       label=f"base (trial {base.number})")
            ax.legend(fontsize=8)
        ax.set_title(f"{study.study_name}: {len(done)} trials, {len(front)} on the front", fontsize=10)
        name = "pareto.png" if len(objectives) == 2 else f"pareto-{y.name}-vs-{x.name}.png"
        ax.figure.tight_layout()
        ax.figure.savefig(study_dir / name, dpi=120)
        plt.close(ax.figure)
        written.append(name)
    return written


def _plot_hypervolume(study: optuna.Study, ref: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_hypervolume_history

    ax = plot_hypervolume_history(study, reference_point=ref)
    ax.set_title(f"hypervolume (reference {', '.join(f'{v:g}' for v in ref)})", fontsize=10)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)


