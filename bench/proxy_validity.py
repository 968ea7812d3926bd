"""Does the proxy predict what full training gives? The truth bench of the search's ranking.

    python bench/proxy_validity.py [--n 8] [--seed 0] [--recipes faithful] [--workers 2] [--device cpu]
                                   [--data builtin:shapes-v4]   # another data set: its own results file
                                   [--only 0,5]                 # only these networks (0 = the base)
    python bench/proxy_validity.py --data builtin:shapes-v5@640 --imgsz 640 --device 0   # larger images, a GPU
    python bench/proxy_validity.py --report          # the table from the results file, training nothing

Samples ``--n`` architectures from the default yolov8n space (at least 5 insert-only) and adds the base. Each is
trained in *full* the way a user trains a found candidate (``python -m search.train``'s defaults: the study's base
schedule, fine-tuning from the base's weights mapped in), the base and the first two architectures with
``--truth-seeds`` seeds, and so are the ``--confirm-best`` best others by their first seed (an apparent winner
is measured again before it counts); the rest with one. Each is also trained by the proxy under every
``--recipes`` entry: one training stopped and continued at each rung (1, 3, 9 epochs), as a promoted candidate is.
Prints the truth mAP per architecture ± sd and its difference to the base (in sd of a difference), the pairs the
truth separates beyond 2 sd of a difference, and Kendall tau / Spearman rho between each rung and the truth, over
all networks and over the insert-only ones.

Hours on a 2-core CPU: every finished training is appended to ``--results`` (JSON lines with machine, versions and
date) and skipped when the bench runs again, so a measurement can span sessions; the file is small enough to commit.
The base is trained once (or taken from ``runs/.cache/base-weights``, shared with the default search). Each row
records the digest of the base weights it started from, and a rerun from other weights is refused: a base trained
again is not bit-identical (shapes-v4: mAP50-95 0.5295 in one session, 0.5129 in another, same seed), so keep
``runs/`` (or its ``.cache``) between the sessions of one measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))  # after the repository: bench/modules.py must not shadow modules/
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from proxy_fidelity import train_through_rungs  # noqa: E402
from search.front.checkpoints import write_mapped  # noqa: E402
from search.front.fidelity import kendall_tau_b, spearman_rho  # noqa: E402
from search.settings import FINETUNE_TRAIN_ARGS, StudySettings  # noqa: E402
from search.storage.study import versions  # noqa: E402
from search.training.data import check_data, data_names, safe_batch  # noqa: E402
from search.training.proxy import TrainJob, run_training  # noqa: E402
from search.training.weights import (BaseCache, base_cache_key, base_training_job, file_sha256,  # noqa: E402
                                     store_base_weights, stored_base_weights)
from space import build_space, load_base, make_candidate, to_yaml  # noqa: E402
from space.sample import sample_candidates  # noqa: E402

# Proxy recipes compared against the truth: each is a change to the study's defaults (a recipe's settings are the
# search's own flags, so the winner becomes a default without translation).
RECIPES: dict[str, dict] = {
    "faithful": {},  # today's defaults: fresh layers start as their papers do, one learning rate for all
    "lr10": {"fresh_lr_mult": 10.0},  # --fresh-lr-mult 10
    "lr10-init": {"fresh_lr_mult": 10.0, "fresh_init": 0.1},  # --fresh-lr-mult 10 --fresh-init 0.1
    "init": {"fresh_init": 0.1},  # --fresh-init 0.1
    "no-warmup": {"train_args": tuple(sorted({**dict(FINETUNE_TRAIN_ARGS), "warmup_epochs": 0}.items()))},
}
MIN_INSERT_ONLY = 5


def sample_architectures(n: int, seed: int) -> list:
    """The base, then ``n`` distinct valid architectures of the default space: the first ``MIN_INSERT_ONLY``
    insert-only ones drawn and the first others, in draw order."""
    base = load_base(StudySettings().base)
    drawn = [c for c, _ in sample_candidates(build_space(base), 6 * n, seed, imgsz=StudySettings().proxy.imgsz)]
    insert_only = [c for c in drawn if all(p.mode == "insert" for p in c.placements)]
    others = [c for c in drawn if c not in insert_only]
    k = max(MIN_INSERT_ONLY, n - len(others))
    picked = insert_only[:k] + others[:n - k]
    return [make_candidate(base)] + sorted(picked, key=drawn.index)


def settings(imgsz: int) -> StudySettings:
    """The default study's settings at ``imgsz`` px (the base's training, the truth's and the proxies')."""
    s = StudySettings()
    return replace(s, proxy=replace(s.proxy, imgsz=imgsz))


def base_weights(data, out: Path, device: str, imgsz: int):
    """The default search's base weights: from the shared cache under runs/ when a search (or this bench) trained
    them already, else trained now and cached."""
    s = settings(imgsz)
    schedule = replace(s.proxy, batch=safe_batch(data.train_used, s.proxy.batch))
    job = base_training_job(s.weights, load_base(s.base), str(data.yaml), schedule, out, os.cpu_count() or 1, device)
    cache, key = BaseCache(REPO / "runs" / ".cache" / "base-weights"), base_cache_key(job, data.fingerprint)
    found = stored_base_weights(out, cache, key)
    if found is not None:
        return found
    print(f"training the base ({s.weights.base_epochs} epochs) ...", flush=True)
    return store_base_weights(job, run_training(job), out, print, cache, key)


def truth_task(spec: dict) -> dict:
    """One full training (run in a worker process): the mapped checkpoint, then ``search.train``'s training."""
    import torch

    from search.train import FullTraining, train_full

    torch.set_num_threads(spec["threads"])
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    start = run_dir / "start.pt"
    state = torch.load(spec["weights"], map_location="cpu", weights_only=True)
    write_mapped(start, spec["yaml"], [tuple(p) for p in spec["base_layers"]], state, spec["names"], {})
    how = FullTraining(data=spec["data"], epochs=spec["epochs"], imgsz=spec["imgsz"], batch=spec["batch"],
                       seed=spec["seed"], device=spec["device"], workers=0)
    result = train_full(run_dir / "candidate.yaml", how, start, run_dir)
    start.unlink(missing_ok=True)
    return {"map50_95": result.map50_95, "map50": result.map50, "seconds": result.train_s}


def proxy_task(spec: dict) -> dict:
    """One proxy training through the rungs (run in a worker process)."""
    jobs = [TrainJob(**{**spec["job"], "stop_at": r}) for r in spec["rungs"]]
    _, scores, seconds, error = train_through_rungs(jobs)
    return {"rungs": dict(zip(map(str, spec["rungs"]), scores)), "seconds": seconds, "error": error}


def plan(archs, data, weights, args, out: Path, rows: list[dict]) -> list[tuple[str, dict]]:
    """Every training the bench needs, in the order it runs them: truth with the first seed; the truth's further
    seeds for the base, the first two architectures and, once every first seed is in ``rows``, the
    ``--confirm-best`` best others by it (an apparent winner is trained again before it counts); the proxy under
    the first recipe, then the other recipes."""
    s = settings(args.imgsz)
    batch = safe_batch(data.train_used, s.proxy.batch)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    names = data_names(data.yaml)

    def truth(i: int, seed: int) -> tuple[str, dict]:
        c = archs[i]
        key = f"truth/{c.hash}/seed{seed}"
        return key, {"kind": "truth", "arch": c.hash, "seed": seed, "threads": threads, "data": str(data.yaml),
                     "weights": weights.state_path, "yaml": to_yaml(c), "base_layers": c.base_layers,
                     "names": names, "epochs": s.weights.base_epochs, "imgsz": s.proxy.imgsz, "batch": batch,
                     "device": args.device, "run_dir": str(out / key)}

    def proxy(i: int, recipe: str) -> tuple[str, dict]:
        c = archs[i]
        key = f"proxy/{recipe}/{c.hash}"
        schedule = replace(s.proxy, batch=batch, **RECIPES[recipe])
        job = TrainJob(trial=i, candidate_hash=c.hash, yaml_text=to_yaml(c), data=str(data.yaml), schedule=schedule,
                       run_dir=str(out / key), device=args.device, threads=threads, weights=weights.state_path,
                       base_layers=c.base_layers)
        return key, {"kind": "proxy", "arch": c.hash, "recipe": recipe, "rungs": list(s.fidelity.rungs),
                     "job": job.__dict__}

    chosen = args.only if args.only is not None else range(len(archs))
    first = [truth(i, 0) for i in chosen]
    proxies = [[proxy(i, r) for i in chosen] for r in args.recipes]
    return first + [truth(i, seed) for seed in range(1, args.truth_seeds)
                    for i in again(archs, rows, args.confirm_best) if i in chosen] + sum(proxies, [])


def again(archs, rows: list[dict], best: int) -> list[int]:
    """Indices of the networks trained with more than one seed: the base, the first two architectures and, once
    every network has its first seed, the ``best`` others with the highest first-seed truth."""
    fixed = list(range(min(3, len(archs))))
    first = {r["arch"]: r["map50_95"] for r in rows if r["kind"] == "truth" and r["seed"] == 0}
    if best <= 0 or any(c.hash not in first for c in archs):
        return fixed
    others = sorted((i for i in range(len(archs)) if i not in fixed), key=lambda i: -first[archs[i].hash])
    return fixed + others[:best]


def run(args) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = check_data(args.data, REPO / "runs" / ".data")
    archs = sample_architectures(args.n, args.seed)
    rows = read_results(args.results)
    other = next((r for r in rows if r.get("data_fingerprint") not in (None, data.fingerprint)), None)
    if other is not None:
        raise SystemExit(f"{args.results} holds results on {other['data']} (fingerprint {other['data_fingerprint']}), "
                         f"not {data.identity}: give another --results")
    t0 = time.time()
    weights = base_weights(data, out, args.device, args.imgsz)

    def todo() -> list[tuple[str, dict]]:  # planned again after each result: the winners' seeds need the first ones
        done = {r["key"] for r in rows}
        return [(k, spec) for k, spec in plan(archs, data, weights, args, out, rows) if k not in done]

    print(f"{len(archs)} networks; {len(rows)} trainings already in {args.results}, {len(todo())} to run", flush=True)
    base = file_sha256(Path(weights.state_path))[:16]  # as a study records --weights PATH
    stale = next((r for r in rows if r.get("base_weights") != base), None)
    if stale is not None:  # every training starts from the base weights: rows from other weights do not compare
        raise SystemExit(f"{args.results} was measured from base weights {stale.get('base_weights', '(unrecorded)')}, "
                         f"not these ({base}, {weights.state_path}): restore those weights or give another --results")
    stamp = {"machine": machine(), "versions": versions(), "data": data.identity, "data_fingerprint": data.fingerprint,
             "base_weights": base}
    tasks = {"truth": truth_task, "proxy": proxy_task}
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        running: dict = {}
        while True:
            for key, spec in todo():
                if len(running) >= args.workers:
                    break
                if key not in {k for k, _ in running.values()}:
                    running[pool.submit(tasks[spec["kind"]], spec)] = key, spec
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                key, spec = running.pop(future)
                row = {"key": key, "kind": spec["kind"], "arch": spec["arch"], "seed": spec.get("seed", 0),
                       "recipe": spec.get("recipe"), **future.result(), **stamp,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                rows.append(row)
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"[{time.time() - t0:6.0f} s] {key}: " + json.dumps({k: row[k] for k in row if k in
                      ("map50_95", "rungs", "seconds", "error")}), flush=True)
    report(archs, read_results(args.results))


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def report(archs, rows: list[dict]) -> None:
    """The truth table and the rank correlations of every recipe's rungs against it."""
    truth: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] == "truth":
            truth.setdefault(r["arch"], []).append(r["map50_95"])
    sds = [statistics.stdev(v) for v in truth.values() if len(v) > 1]
    sd = statistics.mean(sds) if sds else None
    print(f"\ntruth: {StudySettings().weights.base_epochs} epochs from the mapped base, mAP50-95 "
          "(mean ± sd over seeds)")
    base_runs = truth.get(archs[0].hash, [])
    for c in archs:
        v = truth.get(c.hash, [])
        spread = f" ± {statistics.stdev(v):.4f} (n={len(v)})" if len(v) > 1 else ""
        shown = f"{statistics.mean(v):.4f}{spread}" if v else "-"
        versus = ""
        if v and base_runs and c is not archs[0]:
            diff = statistics.mean(v) - statistics.mean(base_runs)
            # in sd of a difference of two means: the seed sd, pooled, times sqrt(1/n + 1/n_base)
            units = f" = {diff / (sd * (1 / len(v) + 1 / len(base_runs)) ** 0.5):+.1f} sd" if sd else ""
            versus = f"{diff:+.4f}{units}"
        print(f"  {c.hash}  {shown:<24}  {versus:<18}  {c.describe()}")
    known = [c for c in archs if c.hash in truth]
    if sd is not None:
        gap = 2 * (2 ** 0.5) * sd
        apart = [(a.hash, b.hash) for i, a in enumerate(known) for b in known[i + 1:]
                 if abs(statistics.mean(truth[a.hash]) - statistics.mean(truth[b.hash])) > gap]
        base = known[0].hash if known and known[0].describe() == "base" else None
        print(f"seed sd {sd:.4f} (pooled over {len(sds)} networks); pairs apart by more than 2 sd of a difference "
              f"({gap:.4f}): {len(apart)} of {len(known) * (len(known) - 1) // 2}"
              + (f"; against the base: {sum(base in p for p in apart)}" if base else ""))
    recipes = sorted({r["recipe"] for r in rows if r["kind"] == "proxy"})
    for recipe in recipes:
        proxies = {r["arch"]: r["rungs"] for r in rows if r["kind"] == "proxy" and r["recipe"] == recipe}
        for label, subset in (("all", known), ("insert-only", [c for c in known if all(
                p.mode == "insert" for p in c.placements)])):
            both = [c for c in subset if c.hash in proxies]
            if len(both) < 3:
                continue
            y = [statistics.mean(truth[c.hash]) for c in both]
            cells = []
            for rung in proxies[both[0].hash]:
                x = [proxies[c.hash][rung] or 0.0 for c in both]
                cells.append(f"rung {rung}: tau {kendall_tau_b(x, y):+.2f} rho {spearman_rho(x, y):+.2f}")
            print(f"  {recipe:<10} {label:<11} n={len(both)}  " + "   ".join(cells))


def machine() -> dict:
    return {"node": platform.node(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="architectures sampled besides the base [8]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the architectures [0]")
    p.add_argument("--truth-seeds", type=int, default=2,
                   help="seeds of the networks trained more than once: the base, the first two architectures and "
                        "the --confirm-best others [2]")
    p.add_argument("--confirm-best", type=int, default=2,
                   help="also train the truth's further seeds for this many best others by their first seed [2]")
    p.add_argument("--recipes", type=lambda t: t.split(","), default=list(RECIPES),
                   help=f"proxy recipes to compare, the first also the earliest [{','.join(RECIPES)}]")
    p.add_argument("--workers", type=int, default=2, help="trainings at once [2]")
    p.add_argument("--only", type=lambda t: [int(i) for i in t.split(",")],
                   help="train only these networks, by their index in the table (0 = the base), e.g. 0,5 [all]")
    p.add_argument("--device", default="cpu", help="Ultralytics device string, e.g. 0 for the first GPU [cpu]")
    p.add_argument("--imgsz", type=int, default=StudySettings().proxy.imgsz,
                   help="image size of every training, the base's included; give a built-in set drawn at it "
                        "(--data builtin:shapes-v5@640 --imgsz 640) [the search's default]")
    p.add_argument("--data", help="an Ultralytics dataset YAML or builtin:NAME [the default built-in set]")
    p.add_argument("--results", help="JSON lines file [bench/results/proxy-validity.jsonl; with --data builtin:NAME "
                                     "proxy-validity-NAME.jsonl]")
    p.add_argument("--out", help="where the trainings run [runs/bench-proxy-validity, -NAME with --data]")
    p.add_argument("--report", action="store_true", help="print the table from --results and exit")
    args = p.parse_args()
    tag = "" if args.data is None else "-" + Path(args.data.removeprefix("builtin:")).stem
    args.results = args.results or str(REPO / "bench" / "results" / f"proxy-validity{tag}.jsonl")
    args.out = args.out or str(REPO / "runs" / f"bench-proxy-validity{tag}")
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe {unknown[0]!r}; known: {', '.join(RECIPES)}")
    if args.report:
        return report(sample_architectures(args.n, args.seed), read_results(args.results))
    run(args)


if __name__ == "__main__":
    main()
