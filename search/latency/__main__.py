"""``python -m search.latency MODEL.yaml|MODEL.pt ...``: time models with exactly the search's protocol.

Each model is timed paired with a reference network (default: the base named in a Pareto YAML's provenance
header; ``--reference none`` times it alone) and the table gives its own median, the ratio to the reference with
its 95% interval, and the reference's median in the same window, so a result can be checked on a target machine.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import modules
from space import SpaceError, build_model, load_base, make_candidate
from space.cli import run_cli, table

from ..errors import SearchError
from . import BACKENDS, LatencySettings, _gflops_hw, parse_imgsz, prepare_reference, time_model


def load_model(spec: str):
    """An eval nn.Module from an Ultralytics checkpoint (.pt) or a model YAML (a path or a bundled name)."""
    modules.register()
    if spec.endswith(".pt"):
        if not Path(spec).is_file():
            raise SearchError(f"{spec}: no such checkpoint")
        from ultralytics import YOLO

        return YOLO(spec, task="detect").model.float().eval()
    if not spec.endswith((".yaml", ".yml")):
        raise SearchError(f"{spec}: expected a model .yaml or an Ultralytics .pt checkpoint")
    try:
        if Path(spec).is_file():
            from ultralytics import YOLO

            return YOLO(spec, task="detect", verbose=False).model.eval()
        return build_model(make_candidate(load_base(spec))).model.eval()
    except SpaceError as err:
        raise SearchError(str(err)) from None


def header_base(spec: str) -> str | None:
    """The base named in an attnas YAML's provenance header (``# base: yolov8n.yaml`` + ``# scale: n``)."""
    if not spec.endswith((".yaml", ".yml")) or not Path(spec).is_file():
        return None
    head = Path(spec).read_text()[:4000]
    base = re.search(r"^# base: (\S+)", head, re.M)
    scale = re.search(r"^# scale: (\w+)", head, re.M)
    if not base:
        return None
    name = base.group(1)
    if scale and scale.group(1) != "None" and re.fullmatch(r"(yolov?\d+)(\.yaml)", name):
        name = re.sub(r"(yolov?\d+)(\.yaml)", rf"\g<1>{scale.group(1)}\2", name)  # yolov8.yaml + n -> yolov8n.yaml
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.latency", description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="MODEL", help="model YAML (e.g. runs/<study>/pareto/*.yaml) or .pt")
    p.add_argument("--reference", help="reference model (YAML, bundled name or .pt) or 'none' "
                                       "[the base named in the first YAML's header, else none]")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--imgsz", default="640", help="SIDE or HEIGHT,WIDTH, multiples of 32 [640]")
    p.add_argument("--half", action="store_true", help="fp16 (CUDA only)")
    p.add_argument("--batch", type=int, default=1)
    defaults = LatencySettings()
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help=f"CPU threads, 0 = all cores [{defaults.threads}]")
    p.add_argument("--runs", type=int, default=defaults.runs, help=f"most timed pairs [{defaults.runs}]")
    p.add_argument("--min-runs", type=int, default=defaults.min_runs, help=f"[{defaults.min_runs}]")
    p.add_argument("--warmup", type=int, default=defaults.warmup, help=f"[{defaults.warmup}]")
    p.add_argument("--ci", type=float, default=defaults.ci, help="a window is accepted when the ratio's 95%% "
                   f"interval is within ± this; 0 accepts every window, as search.run's --latency-ci [{defaults.ci}]")
    args = p.parse_args(argv)
    settings = LatencySettings(device=args.device, imgsz=parse_imgsz(args.imgsz), warmup=args.warmup,
                               runs=args.runs, threads=args.threads, backend=args.backend, half=args.half,
                               batch=args.batch, min_runs=args.min_runs, ci=args.ci)
    settings.check()
    ref_spec = args.reference or header_base(args.models[0])
    reference = None
    if ref_spec and ref_spec.lower() != "none":
        reference = prepare_reference(load_model(ref_spec), settings, name=ref_spec)
    ident = settings.identity()
    print(f"{ident['backend']} {ident['backend_version']} on {ident['device']} ({ident['device_model']}), "
          f"input {'x'.join(map(str, settings.shape))}{' fp16' if settings.half else ''}, "
          f"reference: {ref_spec if reference else 'none'}")
    rows = []
    for spec in args.models:
        model = load_model(spec)
        gflops = _gflops_hw(model, *settings.hw)
        res = time_model(model, settings, reference)
        row = {"model": Path(spec).name, "params": f"{res.params:,}", "GFLOPs": f"{gflops:.2f}",
               "peak MB": f"{res.peak_mem_mb:.1f}", "median ms": f"{res.median_ms:.2f}", "p90 ms": f"{res.p90_ms:.2f}",
               "n": res.n}
        if res.ratio is not None:
            verdict = "accepted" if res.accepted else "contended: " + "; ".join(res.rejected)
            row.update({"x reference": f"{res.ratio:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}]",
                        "reference ms": f"{res.reference_ms:.2f}", "windows": f"{len(res.windows)} ({verdict})"})
        rows.append(row)
    columns = ["model", "params", "GFLOPs", "peak MB", "median ms", "p90 ms", "n"]
    if reference is not None:
        columns[5:5] = ["x reference", "reference ms"]
        columns.append("windows")
    print(table(rows, columns))
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, errors=(SearchError,))


if __name__ == "__main__":
    sys.exit(cli())
