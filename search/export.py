"""``python -m search.export --study NAME [--storage URL]``: the Pareto front of a study as files, at any time.

Writes into ``<out>/<study>/``: ``pareto/*.yaml`` (one Ultralytics YAML per Pareto trial, provenance header),
``pareto.csv``, ``pareto.png`` (mAP vs latency, front highlighted, base marked), ``hypervolume.csv`` and
``hypervolume.png`` (hypervolume after each completed trial) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from . import study as st
from .errors import SearchError


def export_study(study: optuna.Study, study_dir: Path) -> Path:
    """Write the front files for ``study`` into ``study_dir``; returns the directory."""
    study_dir.mkdir(parents=True, exist_ok=True)
    done = st.completed_trials(study)
    front = st.pareto_trials(study)
    pareto_dir = study_dir / "pareto"
    pareto_dir.mkdir(exist_ok=True)
    for old in pareto_dir.glob("*.yaml"):  # the front moves between exports
        old.unlink()
    yamls = {t.number: _write_pareto_yaml(study, t, pareto_dir) for t in front}
    _write_csv(front, yamls, study_dir / "pareto.csv")
    ref = reference_point(done)
    history = hypervolume_history(study, ref)
    with open(study_dir / "hypervolume.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "hypervolume"])
        w.writerows(history)
    _plot_front(study, done, front, study_dir / "pareto.png")
    _plot_hypervolume(history, ref, study_dir / "hypervolume.png")
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    base = _base_trial(done)
    summary = {
        "study": study.study_name,
        "objectives": dict(zip(st.OBJECTIVES, st.DIRECTIONS)),
        "trials": {k: v for k, v in states.items() if v},
        "settings": {k: v for k, v in study.user_attrs.get(st.SETTINGS_ATTR, {}).items() if k != "args"},
        "versions": study.user_attrs.get(st.VERSIONS_ATTR, {}),
        "base_trial": _row(base) if base else None,
        "pareto": [{**_row(t), "yaml": str(yamls[t.number].relative_to(study_dir))} for t in front],
        "hypervolume": {"reference_point": {"mAP50-95": ref[0], "latency_ms": ref[1]},
                        "final": history[-1][1] if history else 0.0, "history": "hypervolume.csv"},
    }
    (study_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return study_dir


def _row(t: FrozenTrial) -> dict[str, Any]:
    a = t.user_attrs
    return {"trial": t.number, "mAP50-95": t.values[0], "mAP50": a.get("map50"), "latency_ms": t.values[1],
            "latency_p90_ms": a.get("latency_p90_ms"), "n_params": a.get("n_params"), "gflops": a.get("gflops"),
            "candidate_hash": a.get("candidate_hash"), "placements": a.get("placements"),
            "reused_from": a.get("reused_from")}


def _base_trial(done: list[FrozenTrial]) -> FrozenTrial | None:
    return next((t for t in done if t.params.get("placement") == "none"), None)


def _write_pareto_yaml(study: optuna.Study, t: FrozenTrial, pareto_dir: Path) -> Path:
    """The trial's candidate YAML (its uploaded artifact, else rebuilt from its parameters) with the result."""
    body = _artifact_yaml(study, t) or _rebuilt_yaml(study, t)
    a = t.user_attrs
    settings = study.user_attrs.get(st.SETTINGS_ATTR, {})
    header = {
        "attnas pareto trial": f"{t.number} of study {study.study_name}",
        "mAP50-95": f"{t.values[0]:.5f} (mAP50 {a.get('map50')}) on {settings.get('data', {}).get('identity')}",
        "latency": f"{t.values[1]:.3f} ms median (p90 {a.get('latency_p90_ms')} ms, n={a.get('latency_n')}) on "
                   f"{settings.get('latency', {}).get('device')} at {settings.get('latency', {}).get('imgsz')} px",
        "params": a.get("n_params"), f"GFLOPs@{a.get('gflops_imgsz')}": a.get("gflops"),
        "proxy": json.dumps(settings.get("proxy", a.get("proxy")), sort_keys=True),
    }
    lines = [f"# {k}: {v}" for k, v in header.items()]
    path = pareto_dir / f"trial-{t.number:04d}-{a.get('candidate_hash', 'unknown')}.yaml"
    path.write_text("\n".join(lines) + "\n" + body)
    return path


def _artifact_yaml(study: optuna.Study, t: FrozenTrial) -> str | None:
    paths = study.user_attrs.get(st.PATHS_ATTR, {})
    artifact_dir = paths.get("artifact_dir")
    source = t
    if "reused_from" in t.user_attrs:  # a reused result has no upload of its own
        source = study.get_trials(deepcopy=False)[t.user_attrs["reused_from"]]
    if not artifact_dir or not Path(artifact_dir).is_dir():
        return None
    store = optuna.artifacts.FileSystemArtifactStore(artifact_dir)
    metas = optuna.artifacts.get_all_artifact_meta(source, storage=study._storage)
    if not metas:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "c.yaml")
        optuna.artifacts.download_artifact(artifact_store=store, file_path=target, artifact_id=metas[0].artifact_id)
        return Path(target).read_text()


def _rebuilt_yaml(study: optuna.Study, t: FrozenTrial) -> str:
    from space import SpaceConfig, build_space, load_base, to_yaml

    args = study.user_attrs[st.SETTINGS_ATTR]["args"]
    space = build_space(load_base(args["base"]), SpaceConfig.load(args["space"]))
    candidate = space.suggest(optuna.trial.FixedTrial(t.params, t.number))
    if candidate.hash != t.user_attrs.get("candidate_hash"):
        raise SearchError(f"trial {t.number}: rebuilding its candidate gives hash {candidate.hash}, the study "
                          f"recorded {t.user_attrs.get('candidate_hash')} (space code changed?)")
    return to_yaml(candidate, {"study": study.study_name, "trial": t.number})


def _write_csv(front: list[FrozenTrial], yamls: dict[int, Path], path: Path) -> None:
    with open(path, "w", newline="") as f:
        fields = ["trial", "mAP50-95", "mAP50", "latency_ms", "latency_p90_ms", "n_params", "gflops", "candidate_hash",
                  "placements", "reused_from", "yaml"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for t in front:
            w.writerow({**_row(t), "yaml": yamls[t.number].name})


def reference_point(done: list[FrozenTrial]) -> tuple[float, float]:
    """Hypervolume reference: mAP 0 and 10 % beyond the slowest completed trial."""
    worst = max((t.values[1] for t in done), default=1.0)
    return 0.0, float(worst * 1.1)


def hypervolume_history(study: optuna.Study, ref: tuple[float, float]) -> list[tuple[int, float]]:
    """Hypervolume of the front after each completed trial, in trial order.

    Uses Optuna's own hypervolume routine (``optuna._hypervolume``, the one its samplers and its hypervolume
    plot use; Optuna exports no public numeric API for it) on (−mAP, latency), both minimised.
    """
    from optuna._hypervolume import compute_hypervolume

    points: list[list[float]] = []
    history = []
    for t in sorted(st.completed_trials(study), key=lambda t: t.number):
        if t.values[0] >= ref[0] and t.values[1] <= ref[1]:
            points.append([-t.values[0], t.values[1]])
        hv = compute_hypervolume(np.array(points), np.array([-ref[0], ref[1]])) if points else 0.0
        history.append((t.number, float(hv)))
    return history


def _plot_front(study: optuna.Study, done: list[FrozenTrial], front: list[FrozenTrial], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    others = [t for t in done if t not in front]
    ax.scatter([t.values[1] for t in others], [t.values[0] for t in others], s=18, c="0.7", label="trials")
    ax.plot([t.values[1] for t in front], [t.values[0] for t in front], "-o", c="tab:red", ms=5, label="Pareto front",
            drawstyle="steps-post")
    for t in front:
        ax.annotate(str(t.number), (t.values[1], t.values[0]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    base = _base_trial(done)
    if base is not None:
        ax.scatter([base.values[1]], [base.values[0]], marker="*", s=160, c="tab:blue", zorder=5,
                   label=f"base (trial {base.number})")
    settings = study.user_attrs.get(st.SETTINGS_ATTR, {})
    lat = settings.get("latency", {})
    ax.set_xlabel(f"latency, ms (median, {lat.get('device', '?')}, {lat.get('imgsz', '?')} px, batch 1)")
    ax.set_ylabel("mAP50-95 (proxy)")
    ax.set_title(f"{study.study_name}: {len(done)} trials, {len(front)} on the front", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_hypervolume(history: list[tuple[int, float]], ref: tuple[float, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([n for n, _ in history], [hv for _, hv in history], "-o", ms=3)
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume")
    ax.set_title(f"hypervolume (reference mAP {ref[0]:g}, latency {ref[1]:.1f} ms)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.export",
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--storage", help="Optuna storage URL or journal file [sqlite:///<out>/<study>/study.db]")
    parser.add_argument("--out", default="runs", help="where the study's directory is (and the files go)")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    url = args.storage or st.default_storage(out, args.study)
    try:
        if not args.storage and not (out / args.study / "study.db").is_file():
            raise SearchError(f"no study database at {out / args.study / 'study.db'}; pass --storage or --out")
        study = st.find_study(st.open_storage(url), args.study)
        if study is None:
            raise SearchError(f"no study {args.study!r} in {url}")
        if not st.completed_trials(study):
            raise SearchError(f"study {args.study!r} has no completed trial yet")
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    target = export_study(study, out / args.study)
    n = len(st.pareto_trials(study))
    print(f"{n} Pareto trial(s) of {args.study!r} -> {target}/pareto/, pareto.csv, pareto.png, hypervolume.csv, "
          "hypervolume.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
