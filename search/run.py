"""``python -m search.run``: multi-objective NAS (mAP50-95 up, measured latency down) over attention placements.

One driver process owns the Optuna study; a Ray pool trains candidates; a single latency meter per device times
them while trainings on its node are parked. Bad input exits with status 2 and a one-line message, before anything
is written to the study. This file is the flags; :mod:`search.prepare` checks them, :mod:`search.session` runs.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")  # a search never downloads weights, fonts or datasets
os.environ.setdefault("YOLO_VERBOSE", "False")

from space import SpaceError  # noqa: E402

from . import objectives as obj  # noqa: E402
from .errors import SearchError  # noqa: E402
from .latency import BACKENDS, ESTIMATORS, STATISTICS  # noqa: E402
from .prepare import prepare  # noqa: E402
from .settings import RAY_CONNECT_S, RAY_START_S, RunSettings, default  # noqa: E402
from .strategy import SAMPLERS  # noqa: E402
from .training import shapes  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the whole usage first)
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m search.run", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    run = RunSettings()
    p.add_argument("--budget", type=int, default=run.budget,
                   help=f"completed trials the study should hold, all runs together [{run.budget}]")
    p.add_argument("--study-name", help="default: <base>-<data> (re-running the same command continues it); a new "
                                        "study's name is a directory under --out: letters, digits, '.', '_', '-'")
    p.add_argument("--storage", help="Optuna RDB URL (sqlite:///…, postgresql://…, mysql://…) or a journal file "
                                     "path; default sqlite:///<out>/<study>/study.db")
    p.add_argument("--out", default="runs", help="directory for everything a study writes [runs]")
    p.add_argument("--resume", action="store_true", help="continue an existing study, taking every setting not "
                                                         "given here from it")
    g = p.add_argument_group("what is searched (fixed for a study)")
    g.add_argument("--objectives", help=f"2-4 of {', '.join(obj.OBJECTIVES)}, comma-separated "
                                        f"[{default('objectives')}]")
    g.add_argument("--base", help=f"base model YAML of the space, bundled name or path [{default('base')}]")
    g.add_argument("--space", help="space YAML restricting slots/modules/values (see space/)")
    g.add_argument("--data", help="Ultralytics dataset YAML, or builtin:NAME for a built-in generated set "
                                  f"({', '.join(shapes.SETS)}) [builtin:{shapes.DEFAULT}, generated on first use]")
    g = p.add_argument_group("proxy training (fixed for a study)")
    g.add_argument("--rungs", help="epochs at each rung of asynchronous successive halving, e.g. 1,3,9: every "
                   "candidate trains to the first; the best 1/--eta of a rung by Pareto rank continue from their "
                   f"checkpoint to the next; one value = every candidate trains that long [{default('rungs')}]")
    g.add_argument("--eta", type=int, help=f"promote the best 1/eta of each rung [{default('eta')}]")
    g.add_argument("--promotion", choices=("asha", "capped"),
                   help="asha: a candidate in its rung's best 1/eta now is promoted; capped: and no more than 1/eta "
                        f"of the rung's results are promoted so far (synchronous halving's count) [{default('promotion')}]")
    g.add_argument("--epochs", type=int, help="same as --rungs N: every candidate trains N epochs")
    g.add_argument("--confirm-seeds", type=int, help="after the budget, train the top-rung front and the base again "
                   f"with this many more seeds; the exported front uses the seed means [{default('confirm_seeds')}]")
    g.add_argument("--imgsz", type=int, help=f"training image size, a multiple of 32 [{default('imgsz')}]")
    g.add_argument("--batch", type=int, help=f"[{default('batch')}]")
    g.add_argument("--fraction", help="train images used: ratio (0.5), count (8) or train,val (8,16) "
                                      f"[{default('fraction')}]")
    g.add_argument("--seed", type=int, help=f"training and sampler seed [{default('seed')}]")
    g.add_argument("--train-arg", action="append", metavar="KEY=VALUE",
                   help="further Ultralytics train argument of every candidate, repeatable [inheriting: "
                        f"{default('train_arg')}; --weights none: {default('base_train_arg')}]")
    g.add_argument("--fresh-lr-mult", type=float, help="learning rate of the layers a candidate does not inherit "
                   "(inserted or replacing), as a multiple of the inherited layers' rate; their 1-d weights (layer "
                   f"scales) skip weight decay unless 1 [{default('fresh_lr_mult')}]")
    g.add_argument("--fresh-init", help="'none' (fresh layers' residual gates start closed, as their papers start "
                   "them) or the value the gates start at: zero-initialised norm weights and layer scales of CGA, "
                   f"CoT and DualViT [{default('fresh_init')}]")
    g.add_argument("--weights", help="what every candidate starts from: 'auto' (the base trained once by the driver "
                   "for --base-epochs, stored with the study), a checkpoint .pt of the base, or 'none' (from "
                   f"scratch; then give more --epochs) [{default('weights')}]")
    g.add_argument("--base-epochs", type=int, help=f"epochs of the base training for --weights auto "
                   f"[{default('base_epochs')}]")
    g.add_argument("--base-train-arg", action="append", metavar="KEY=VALUE",
                   help=f"Ultralytics train argument of the base training, repeatable [{default('base_train_arg')}]")
    g = p.add_argument_group("constraints, checked before training (fixed for a study)")
    g.add_argument("--max-latency-ms", type=float, help="candidates slower than this are recorded infeasible, untrained")
    g.add_argument("--max-params", type=int, help="candidates with more parameters are recorded infeasible, untrained")
    g = p.add_argument_group("latency (fixed for a study)")
    g.add_argument("--latency-device", choices=("cpu", "cuda"), help=f"[{default('latency_device')}]")
    g.add_argument("--latency-backend", choices=BACKENDS, help="the runtime the latency is timed on: eager PyTorch, "
                   "ONNX Runtime (the fused model exported to ONNX), or TensorRT (needs the tensorrt package and a GPU) "
                   f"[{default('latency_backend')}]")
    g.add_argument("--latency-imgsz", help=f"SIZE or HEIGHT,WIDTH, e.g. 640,384 [{default('latency_imgsz')}]")
    g.add_argument("--latency-batch", type=int, help=f"[{default('latency_batch')}]")
    g.add_argument("--latency-half", action="store_const", const=True, help="time in fp16 (CUDA only)")
    g.add_argument("--latency-warmup", type=int, help=f"untimed runs of each network [{default('latency_warmup')}]")
    g.add_argument("--latency-runs", type=int, help="most timed pairs of base and candidate "
                   f"[{default('latency_runs')}]")
    g.add_argument("--latency-min-runs", type=int, help="pairs after which the meter stops once the ratio's 95%% "
                   f"interval is within ±--latency-ci [{default('latency_min_runs')}]")
    g.add_argument("--latency-ci", type=float, help="a window is accepted when the ratio's 95%% interval is within "
                   f"± this fraction; 0 accepts every window [{default('latency_ci')}]")
    g.add_argument("--latency-estimator", choices=ESTIMATORS, help="paired: time every candidate against the base; "
                   "table: predict it from per-placement costs timed once per machine and cached under --out "
                   f"(for shared machines) [{default('latency_estimator')}]")
    g.add_argument("--latency-statistic", choices=STATISTICS, help="how a window's runs give the ratio "
                   f"(search/latency/window.py) [{default('latency_statistic')}]")
    g.add_argument("--latency-aa-tolerance", type=float, help="a window is accepted when its A/A control (the base "
                   f"against itself) is within 1 ± this [{default('latency_aa_tolerance')}]")
    g.add_argument("--latency-tries", type=int, help="windows timed before a trial is recorded latency_contended "
                   f"[{default('latency_tries')}]")
    g.add_argument("--latency-threads", type=int, help=f"CPU threads for timing, 0 = all cores [{default('latency_threads')}]")
    g = p.add_argument_group("execution (may change between runs)")
    g.add_argument("--sampler", choices=SAMPLERS, default=run.sampler, help=f"[{run.sampler}]; docs/design.md says why the default")
    g.add_argument("--workers", type=int, default=run.workers, help=f"trials in flight at once [{run.workers}]")
    g.add_argument("--cpus-per-trial", type=float, help="default: the cluster's CPUs / --workers")
    g.add_argument("--gpus-per-trial", type=float, default=run.gpus_per_trial, help="fractional allowed; needs a GPU [0]")
    g.add_argument("--ray-address", help="join an existing cluster: auto, host:port or ray://host:port (default: "
                                         f"local Ray); an address that does not answer within {RAY_CONNECT_S:g} s "
                                         f"is refused, and joining is given up after {RAY_START_S:g} s")
    g.add_argument("--latency-node", default=run.latency_node,
                   help="the one node every latency of the study is timed on: 'driver' (this process's node), a "
                        "node id, or an IP/hostname naming one node; its hostname and processor are part of the "
                        f"study's identity [{run.latency_node}]")
    g.add_argument("--ship-data", action="store_true",
                   help="with --ray-address: copy the dataset through Ray into each node's local cache "
                        "(/tmp/attnas-data or $ATTNAS_DATA_CACHE) instead of requiring it at the same path on every "
                        "node; at most 200 MB")
    g.add_argument("--trial-timeout", type=float, help="seconds; a training running longer is FAIL")
    g.add_argument("--save-weights", action="store_true", help="keep each trial's last.pt in its run directory")
    g.add_argument("--max-failures-in-a-row", type=int, default=run.max_failures_in_a_row,
                   help=f"stop the search after this many [{run.max_failures_in_a_row}]")
    g.add_argument("--no-export", dest="export", action="store_false", help="skip writing pareto/ and the plots at the end")
    g.add_argument("--verbose", action="store_true", help="print every event (a trial finished, a rung result, a "
                   "retry) on the console as well as in <study>/search.log; default: one status line")
    p.add_argument("--inject-fault", dest="faults", action="append", default=[], help=argparse.SUPPRESS)  # tests: KIND@TRIAL
    return p




def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prep = prepare(args)
    except KeyboardInterrupt:  # Ctrl-C while checking: nothing was written
        print("interrupted before anything was written", file=sys.stderr)
        return 130
    except (SearchError, SpaceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .session import run_session  # Ray takes ~0.4 s to import: bad input is refused before that

    return run_session(prep)


if __name__ == "__main__":
    sys.exit(main())
