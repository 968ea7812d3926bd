"""``python -m space.sample --base yolov8n.yaml --n 100 --seed 0 --out DIR``: write N valid, distinct candidates."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from .base import load_base
from .candidate import Candidate, Stats, validate, write_yaml
from .cli import run_cli, table
from .errors import SpaceError
from .search_space import SpaceConfig, build_space


def sample_candidates(space, n: int, seed: int, imgsz: int = 160, max_tries: int | None = None) -> list[tuple[Candidate, Stats]]:
    """Draw candidates with Optuna's RandomSampler until ``n`` distinct valid ones are found."""
    if n > space.size():
        raise SpaceError(f"--n {n} is larger than the space, which holds {space.size()} distinct candidates")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    found: dict[str, tuple[Candidate, Stats]] = {}
    tries = 0
    max_tries = max_tries or 50 * n + 100
    while len(found) < n:
        if tries >= max_tries:
            raise SpaceError(f"found only {len(found)} distinct valid candidates in {tries} draws; "
                             "the space (or its valid part) is smaller than --n")
        tries += 1
        trial = study.ask()
        try:
            candidate = space.suggest(trial)
            if candidate.hash in found:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            stats = validate(candidate, imgsz=imgsz)
        except (optuna.TrialPruned, SpaceError):
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        found[candidate.hash] = (candidate, stats)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # nothing to optimise here; keep the study clean
    return list(found.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m space.sample", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--base", default="yolov8n.yaml", help="bundled name (yolov8n.yaml, yolo11s.yaml) or a YAML path")
    parser.add_argument("--n", type=int, default=10, help="number of distinct candidates to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/samples", help="directory for the candidate YAMLs")
    parser.add_argument("--space", help="space YAML restricting slots/modules/values")
    parser.add_argument("--imgsz", type=int, default=160, help="proxy image size of the validation forward")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise SpaceError(f"--n must be at least 1, got {args.n}")
    base = load_base(args.base)
    space = build_space(base, SpaceConfig.load(args.space))
    picked = sample_candidates(space, args.n, args.seed, imgsz=args.imgsz)
    out = Path(args.out)
    rows = []
    for i, (cand, stats) in enumerate(picked):
        path = write_yaml(cand, out / f"{i:03d}_{cand.hash}.yaml",
                          {"params": stats.params, f"GFLOPs@{stats.flops_imgsz}": round(stats.gflops, 2)})
        rows.append({"#": i, "hash": cand.hash, "params": f"{stats.params / 1e6:.3f}M",
                     "GFLOPs": f"{stats.gflops:.2f}", "placements": cand.describe(), "file": path.name})
    print(f"{len(picked)} candidates of {base.name} (scale {base.scale}; space size {space.size():,}) -> {out}/")
    print(table(rows, ["#", "hash", "params", "GFLOPs", "placements"]))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
