"""Has a network learned the relation of ``shapes-v4`` / ``shapes-v5``? Twins and singles it finds, on the val split.

    python bench/relation_check.py shapes-v5 WEIGHTS.pt [MORE.pt ...] [--conf 0.25]
    python bench/relation_check.py shapes-v5@640 runs/.../weights/best.pt         # a set drawn at 640 px

Up close a single looks like a twin, so a network that does not relate distant shapes finds both alike: its mAP
stalls at the precision the twins' share of all shapes allows, whatever its architecture. The gap between the two
rates is what attention would have to add. The singles are unlabelled, so this replays the set's generator (same
seed, same draw order) to know where they are; the replay is checked against the set's label files.

WEIGHTS are Ultralytics checkpoints (a training's ``weights/best.pt``; ``search.train`` and the truth bench leave
them under their run directories).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import modules  # noqa: E402
from search.training import shapes  # noqa: E402

LAYOUTS = {"shapes-v4": "shapes_v4_layout", "shapes-v5": "shapes_v5_layout"}  # (kind, labelled, cx, cy, r) lists
MATCH_IOU = 0.3  # a detection finds a shape when its box overlaps the shape's circumscribed square this much


def val_layouts(name: str) -> list[list[tuple[int, bool, float, float, float]]]:
    """Each val image's shapes, as the generator placed them: the whole set is drawn again, recording layouts."""
    spec = shapes.get(name)
    attr = LAYOUTS[name.partition("@")[0]]
    original, seen = getattr(shapes, attr), []

    def recording(rng, size):
        seen.append(original(rng, size))
        return seen[-1]

    setattr(shapes, attr, recording)  # the draw functions look their layout function up at call time
    try:
        rng = np.random.default_rng(spec.seed)
        for count in spec.splits.values():
            for _ in range(count):
                spec.draw(rng, spec.size)
    finally:
        setattr(shapes, attr, original)
    return seen[spec.splits["train"]:]


def found_rates(weights: str, name: str, layouts: list, conf: float) -> tuple[float, float, int, int]:
    """(twins found, singles found, twins, singles) by ``weights`` on the val images of the cached set ``name``."""
    import torch
    from ultralytics import YOLO
    from ultralytics.utils.metrics import box_iou

    spec = shapes.get(name)
    images = REPO / "runs" / ".data" / name / "images" / "val"
    model = YOLO(weights, task="detect")
    found = {True: 0, False: 0}
    total = {True: 0, False: 0}
    for i, layout in enumerate(layouts):
        labels = (images.parent.parent / "labels" / "val" / f"{i:04d}.txt").read_text().splitlines()
        if len(labels) != sum(labelled for _, labelled, *_ in layout):
            raise SystemExit(f"the replayed layout of val image {i} does not match its labels: regenerate {name}")
        boxes = model.predict(str(images / f"{i:04d}.png"), imgsz=spec.size, conf=conf, device="cpu",
                              verbose=False)[0].boxes.xyxy
        squares = torch.tensor([(cx - r, cy - r, cx + r, cy + r) for _, _, cx, cy, r in layout])
        hits = (box_iou(squares, boxes) >= MATCH_IOU).any(dim=1).tolist()
        for (_, labelled, *_), hit in zip(layout, hits):
            found[labelled] += hit
            total[labelled] += 1
    return found[True] / total[True], found[False] / total[False], total[True], total[False]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="shapes-v4 or shapes-v5, optionally NAME@SIZE (generated under runs/.data if absent)")
    p.add_argument("weights", nargs="+", help="Ultralytics checkpoints to check")
    p.add_argument("--conf", type=float, default=0.25, help="detection confidence threshold [0.25]")
    args = p.parse_args()
    if args.data.partition("@")[0] not in LAYOUTS:
        raise SystemExit(f"{args.data}: only {', '.join(LAYOUTS)} have unlabelled look-alikes to check")
    modules.register()
    shapes.cached(args.data, REPO / "runs" / ".data")
    layouts = val_layouts(args.data)
    print(f"{'weights':<70} {'twins found':>12} {'singles found':>14} {'gap':>6}")
    for w in args.weights:
        twins, singles, n_twins, n_singles = found_rates(w, args.data, layouts, args.conf)
        print(f"{w:<70} {twins:>12.2f} {singles:>14.2f} {twins - singles:>+6.2f}")
    print(f"({n_twins} twins and {n_singles} singles in {len(layouts)} val images; conf >= {args.conf})")


if __name__ == "__main__":
    main()
