"""``python -m search.export --study NAME [--storage URL]``: the Pareto front of a study as files, at any time.

What is written is :func:`search.front.export.export_study`'s: pareto/, pareto.csv, the plots, summary.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from .errors import SearchError
from .front import pareto
from .front.export import export_study
from .storage import study as st


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
        storage = st.open_storage(url)
        study = st.find_study(storage, args.study)
        if study is None:
            raise SearchError(f"no study {args.study!r} in {url}")
        if not st.completed_trials(study):
            raise SearchError(f"study {args.study!r} has no completed trial yet")
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    target = export_study(study, out / args.study, storage)
    n = len(pareto.pareto_trials(study, pareto.objectives_of(study)))
    print(f"{n} Pareto trial(s) of {args.study!r} -> {target}/pareto/, pareto.csv, pareto*.png, hypervolume.csv, "
          "hypervolume.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
