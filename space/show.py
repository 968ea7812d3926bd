"""``python -m space.show --base yolo11n.yaml``: list the slots found in a base with channels and strides."""

from __future__ import annotations

import argparse
import sys

from .base import load_base
from .cli import run_cli, table
from .search_space import SpaceConfig, build_space


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m space.show", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--base", default="yolov8n.yaml", help="bundled name (yolov8n.yaml, yolo11s.yaml) or a YAML path")
    parser.add_argument("--space", help="space YAML restricting slots/modules/values")
    args = parser.parse_args(argv)
    base = load_base(args.base)
    space = build_space(base, SpaceConfig.load(args.space))
    imgsz = space.config.imgsz
    rows = []
    for slot in space.slots:
        h, w = slot.feature_hw(imgsz)
        rows.append({"slot": slot.name, "after layer": f"{slot.after} {base.layers[slot.after].type}",
                     "channels": slot.channels, "stride": slot.stride, f"map@{imgsz}": f"{h}x{w}",
                     "modes": "/".join(space.modes(slot)), "modules": " ".join(space.options[slot.name])})
    print(f"{base.name} (scale {base.scale}): {len(space.slots)} slots, "
          f"{space.config.min_layers}-{min(space.config.max_layers, len(space.slots))} attention layers per candidate, "
          f"{space.size():,} distinct candidates")
    print(table(rows, list(rows[0]) if rows else ["slot"]))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
