"""The built-in detection sets, generated deterministically (fixed seed, lossless PNG) instead of shipped.

``shapes-v2`` (3 classes, kept byte-for-byte as it was) is easy: after a long schedule most architectures end
within seed noise of each other. ``shapes-v3`` (the default) is made so that capacity, context and placement
matter: ten classes that differ in fine structure (circle / ellipse, square / rectangle / rhombus, regular /
irregular hexagon, filled / outlined), one class that only context outside the object's box tells apart (a disc
inside a square frame), unlabelled clutter (line segments, specks, empty frames), partial occlusion and sizes
over 10-64 px. Colour never tells the class.

    generate("shapes-v3", root)         # writes images/, labels/, shapes-v3.yaml, MANIFEST.json (last) into root
    cached("shapes-v3", "runs/.data")   # the YAML under runs/.data/shapes-v3/, generated once, atomically
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import SearchError, disk_fault

IMGSZ = 128
MIN_SIZE, MAX_SIZE = 128, 1280  # NAME@SIZE: the largest objects (64 px) need a 128 px image
DONE = "MANIFEST.json"  # written last: a set without it is incomplete and regenerated

Boxes = list[tuple[int, float, float, float, float]]  # YOLO rows (class, xc, yc, w, h), normalised to [0, 1]


@dataclass(frozen=True)
class ShapesSet:
    """One built-in set: its classes, image counts per split, seed and the function that draws one image."""

    name: str
    classes: tuple[str, ...]
    splits: dict[str, int]
    seed: int
    draw: Callable[[np.random.Generator, int], tuple[np.ndarray, Boxes]]
    size: int = IMGSZ  # image side in px; objects keep their sizes in px, so a larger image spreads them further


# ---------------------------------------------------------------------------------------------------------------
# shapes-v2: unchanged (same seed, same draw order), so studies recorded on it keep their data fingerprint.
# ---------------------------------------------------------------------------------------------------------------

_V2_CLASSES = ("circle", "square", "triangle")
_V2_OBJ_PX = (10.0, 44.0)


def shapes_v2_image(rng: np.random.Generator, size: int = IMGSZ) -> tuple[np.ndarray, Boxes]:
    """One image of ``shapes-v2`` and its YOLO boxes ``(class, xc, yc, w, h)``, normalised to [0, 1]."""
    from PIL import Image, ImageDraw

    background = _gradient(rng, size)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes: Boxes = []
    taken: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, 6))):
        for _attempt in range(20):
            side = math.exp(rng.uniform(math.log(_V2_OBJ_PX[0]), math.log(_V2_OBJ_PX[1])))
            x0, y0 = rng.uniform(1, size - side - 1, 2)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_iou(box, other) < 0.1 for other in taken):
                break
        else:
            continue
        cls = int(rng.integers(len(_V2_CLASSES)))
        local = background[int(y0 + side / 2), int(x0 + side / 2)]
        colour = _contrasting(rng, local)
        if cls == 0:
            draw.ellipse(box, fill=colour)
        elif cls == 1:
            draw.rectangle(box, fill=colour)
        else:  # a triangle at a random rotation; its box is the vertices' hull
            cx, cy, r = x0 + side / 2, y0 + side / 2, side / 2
            turn = rng.uniform(0, 2 * math.pi)
            angles = [turn + k * 2 * math.pi / 3 for k in range(3)]
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
            draw.polygon(pts, fill=colour)
            box = _bounds(pts)
        taken.append(box)
        boxes.append(_yolo_row(cls, box, size))
    return _sensor_noise(image, rng, size), boxes


# ---------------------------------------------------------------------------------------------------------------
# shapes-v3
# ---------------------------------------------------------------------------------------------------------------

_V3_CLASSES = ("circle", "ellipse", "square", "rectangle", "rhombus", "triangle", "hexagon", "irregular-hexagon",
               "ring", "framed-disc")
_V3_OBJ_PX = (10.0, 64.0)  # circumscribed diameter; stride-8 cells up to about half the image
_V3_FRAMED_PX = (10.0, 36.0)  # the framed disc itself; its frame adds 40-80 % of its radius plus 3 px each side
_V3_OBJECTS = (2, 8)  # objects tried per image: 2-7 (a placement that finds no room in 20 tries is skipped)
_V3_MAX_COVER = 0.4  # a later object may hide at most this much of an earlier one's box (partial occlusion)


def _outline(cls: str, rng: np.random.Generator, r: float) -> list[tuple[float, float]] | None:
    """Vertices (around the origin, circumradius ``r``, random turn) of a polygon class; None for round classes.

    The confusable pairs are set apart by margins a 128 px image still shows: rectangles have sides in ratio
    0.40-0.65 (a square 1), rhombi diagonals in ratio 0.40-0.65, ellipses axes in ratio 0.45-0.70, and an
    irregular hexagon's vertices sit at 45-100 % of its radius, jittered by up to 15 degrees.
    """
    turn = rng.uniform(0, 2 * math.pi)
    if cls == "ellipse":
        ratio = rng.uniform(0.45, 0.70)
        pts = [(r * math.cos(t), ratio * r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif cls == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif cls == "rectangle":
        ratio = rng.uniform(0.40, 0.65)
        a = r / math.hypot(1, ratio)
        pts = [(a, ratio * a), (-a, ratio * a), (-a, -ratio * a), (a, -ratio * a)]
    elif cls == "rhombus":
        ratio = rng.uniform(0.40, 0.65)
        pts = [(r, 0.0), (0.0, ratio * r), (-r, 0.0), (0.0, -ratio * r)]
    elif cls == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3]
    elif cls == "hexagon":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    elif cls == "irregular-hexagon":
        angles = np.arange(6) * math.pi / 3 + rng.uniform(-math.pi / 12, math.pi / 12, 6)
        radii = r * rng.uniform(0.45, 1.0, 6)
        radii[int(rng.integers(6))] = r  # one vertex on the circumcircle: the size range stays that of the others
        pts = [(q * math.cos(a), q * math.sin(a)) for q, a in zip(radii, angles)]
    else:
        return None
    c, s = math.cos(turn), math.sin(turn)
    return [(x * c - y * s, x * s + y * c) for x, y in pts]


def shapes_v3_image(rng: np.random.Generator, size: int = IMGSZ) -> tuple[np.ndarray, Boxes]:
    """One image of ``shapes-v3`` and its YOLO boxes ``(class, xc, yc, w, h)``, normalised to [0, 1]."""
    background, image, draw = _cluttered_canvas(rng, size)
    boxes: Boxes = []
    taken: list[tuple[float, float, float, float]] = []  # what each object occupies, its frame included
    for _ in range(int(rng.integers(*_V3_OBJECTS))):
        cls = _V3_CLASSES[int(rng.integers(len(_V3_CLASSES)))]
        lo, hi = _V3_FRAMED_PX if cls == "framed-disc" else _V3_OBJ_PX
        r = math.exp(rng.uniform(math.log(lo), math.log(hi))) / 2
        reach = r + (rng.uniform(0.4, 0.8) * r + 3 if cls == "framed-disc" else 0.0)  # the frame's half side
        for _attempt in range(20):
            cx, cy = rng.uniform(reach + 1, size - reach - 1, 2)
            area = (cx - reach, cy - reach, cx + reach, cy + reach)
            if _fits(area, taken):
                break
        else:
            continue
        colour = _contrasting(rng, background[int(cy), int(cx)])
        pts = _outline(cls, rng, r)
        if pts is not None:
            pts = [(cx + x, cy + y) for x, y in pts]
            draw.polygon(pts, fill=colour)
            box = _bounds(pts)
        else:
            box = (cx - r, cy - r, cx + r, cy + r)
            if cls == "ring":  # outlined: the stroke is a quarter of the radius, at least 2 px
                draw.ellipse(box, outline=colour, width=max(2, round(r / 4)))
            else:  # circle, or the disc of a framed-disc inside its frame (the frame is context, not box)
                if cls == "framed-disc":
                    _frame(draw, rng, area, background[int(cy), int(cx)])
                draw.ellipse(box, fill=colour)
        taken.append(area)
        boxes.append(_yolo_row(_V3_CLASSES.index(cls), box, size))
    # Empty frames (a frame alone is no object; placed like objects, so no frame encloses a labelled shape, which
    # would make a circle look framed) and clutter over the objects: lines partly occlude shapes.
    for _ in range(int(rng.integers(0, 2))):
        half = rng.uniform(6, 24)
        cx, cy = rng.uniform(half + 1, size - half - 1, 2)
        area = (cx - half, cy - half, cx + half, cy + half)
        if _fits(area, taken):
            _frame(draw, rng, area, background[int(cy), int(cx)])
    _clutter(draw, rng, size, background, lines=int(rng.integers(0, 3)), specks=int(rng.integers(0, 4)))
    return _sensor_noise(image, rng, size), boxes


def _cluttered_canvas(rng: np.random.Generator, size: int) -> tuple[np.ndarray, Any, Any]:
    """A gradient background with clutter under the objects: (background, PIL image, its drawing context)."""
    from PIL import Image, ImageDraw

    background = _gradient(rng, size)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    _clutter(draw, rng, size, background, lines=int(rng.integers(0, 3)), specks=int(rng.integers(0, 4)))
    return background, image, draw


def _sensor_noise(image, rng: np.random.Generator, size: int) -> np.ndarray:
    """The drawn image with Gaussian pixel noise (sd 12), as uint8 pixels."""
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _frame(draw, rng: np.random.Generator, area: tuple, near: np.ndarray) -> None:
    draw.rectangle(area, outline=_contrasting(rng, near), width=int(rng.integers(1, 3)))


def _clutter(draw, rng: np.random.Generator, size: int, background: np.ndarray, lines: int, specks: int) -> None:
    """Unlabelled distractors: thin line segments and specks smaller than any object (2-5 px)."""
    for _ in range(lines):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line((x0, y0, x1, y1), fill=_contrasting(rng, background[int(y0), int(x0)]), width=int(rng.integers(1, 3)))
    for _ in range(specks):
        d = rng.uniform(2, 5)
        x0, y0 = rng.uniform(0, size - d, 2)
        draw.ellipse((x0, y0, x0 + d, y0 + d), fill=_contrasting(rng, background[int(y0), int(x0)]))


# ---------------------------------------------------------------------------------------------------------------
# shapes-v4: twins. A shape is an object only when another shape of its kind is elsewhere in the image.
# ---------------------------------------------------------------------------------------------------------------

_V4_CLASSES = ("circle", "square", "triangle", "hexagon")
_V4_OBJ_PX = (12.0, 40.0)  # circumscribed diameter; twins are sized, coloured and turned independently
_V4_TWIN_GAP = 0.35  # twins' centres at least this fraction of the image apart: the relation is long-range


def shapes_v4_layout(rng: np.random.Generator, size: int = IMGSZ) -> list[tuple[int, bool, float, float, float]]:
    """What one ``shapes-v4`` image holds: (kind, labelled, cx, cy, radius) per shape. One or two pairs of twins
    (two shapes of one kind, far apart; labelled) and one or two singles of kinds no other shape has (unlabelled:
    up close a single looks like a twin)."""
    kinds = rng.permutation(len(_V4_CLASSES))
    pairs = int(rng.integers(1, 3))
    singles = int(rng.integers(1, min(2, len(_V4_CLASSES) - pairs) + 1))
    wanted = [(int(k), True) for k in kinds[:pairs] for _ in range(2)]
    wanted += [(int(k), False) for k in kinds[pairs:pairs + singles]]
    return _place_twins(rng, size, wanted, lambda twin: _log_uniform(rng, _V4_OBJ_PX) / 2)


def _place_twins(rng: np.random.Generator, size: int, wanted: list[tuple[int, bool]],
                 radius: Callable[[tuple | None], float]) -> list[tuple[int, bool, float, float, float]]:
    """Place ``wanted`` (key, labelled) shapes without overlap, a shape whose key is already placed (its twin) at
    least ``_V4_TWIN_GAP`` of the image from it; ``radius(twin or None)`` draws each try's radius. A twin that
    finds no room in 50 tries leaves its first a single. (key, labelled, cx, cy, radius) per placed shape."""
    placed: list[tuple[int, bool, float, float, float]] = []
    for key, labelled in wanted:
        twin = next((p for p in placed if p[0] == key), None)
        for _attempt in range(50):
            r = radius(twin)
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            area = (cx - r, cy - r, cx + r, cy + r)
            far = twin is None or math.hypot(cx - twin[2], cy - twin[3]) >= _V4_TWIN_GAP * size
            if far and all(_iou(area, (x - q, y - q, x + q, y + q)) == 0.0 for _, _, x, y, q in placed):
                placed.append((key, labelled, cx, cy, r))
                break
        else:
            if labelled and twin is not None:  # no room for the second twin: its first is a single now
                placed[placed.index(twin)] = (*twin[:1], False, *twin[2:])
    return placed


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1])))


def shapes_v4_image(rng: np.random.Generator, size: int = IMGSZ) -> tuple[np.ndarray, Boxes]:
    """One image of ``shapes-v4`` and its YOLO boxes of the twins ``(class, xc, yc, w, h)``, normalised."""
    background, image, draw = _cluttered_canvas(rng, size)
    boxes: Boxes = []
    for kind, labelled, cx, cy, r in shapes_v4_layout(rng, size):
        colour = _contrasting(rng, background[int(cy), int(cx)])
        name = _V4_CLASSES[kind]
        pts = _outline(name, rng, r)
        if pts is None:  # the circle
            box = (cx - r, cy - r, cx + r, cy + r)
            draw.ellipse(box, fill=colour)
        else:
            pts = [(cx + x, cy + y) for x, y in pts]
            draw.polygon(pts, fill=colour)
            box = _bounds(pts)
        if labelled:
            boxes.append(_yolo_row(kind, box, size))
    return _sensor_noise(image, rng, size), boxes


# ---------------------------------------------------------------------------------------------------------------
# shapes-v5: matching. A shape is an object only when its exact outline is repeated elsewhere in the image.
# ---------------------------------------------------------------------------------------------------------------

_V5_CLASSES = ("matched",)
_V5_OBJ_PX = (16.0, 40.0)  # circumscribed diameter
_V5_TWIN_SCALE = (0.9, 1.1)  # a twin's size relative to its first: size alone does not pair them
_V5_VERTICES = (5, 9)  # an outline has 5-8 vertices, at 45-100 % of its radius


def random_outline(rng: np.random.Generator) -> list[tuple[float, float]]:
    """A random star-shaped outline of unit circumradius (one vertex on the circle), never seen before."""
    n = int(rng.integers(*_V5_VERTICES))
    angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * math.pi / n + rng.uniform(0, 2 * math.pi)
    radii = rng.uniform(0.45, 1.0, n)
    radii[int(rng.integers(n))] = 1.0
    return [(q * math.cos(a), q * math.sin(a)) for q, a in zip(radii, angles)]


def shapes_v5_layout(rng: np.random.Generator, size: int = IMGSZ) -> list[tuple[int, bool, float, float, float]]:
    """What one ``shapes-v5`` image holds: (outline id, labelled, cx, cy, radius) per shape. One or two pairs of
    twins (one outline drawn twice, far apart, at sizes within 10 %; labelled) and one to three singles, each with
    an outline of its own (unlabelled). Placed as ``shapes-v4`` places its shapes."""
    pairs = int(rng.integers(1, 3))
    wanted = [(k, True) for k in range(pairs) for _ in range(2)]
    wanted += [(pairs + k, False) for k in range(int(rng.integers(1, 4)))]
    return _place_twins(rng, size, wanted, lambda twin: _log_uniform(rng, _V5_OBJ_PX) / 2 if twin is None
                        else twin[4] * rng.uniform(*_V5_TWIN_SCALE))


def shapes_v5_image(rng: np.random.Generator, size: int = IMGSZ) -> tuple[np.ndarray, Boxes]:
    """One image of ``shapes-v5`` and its YOLO boxes of the twins ``(0, xc, yc, w, h)``, normalised."""
    background, image, draw = _cluttered_canvas(rng, size)
    layout = shapes_v5_layout(rng, size)
    outlines = {outline: random_outline(rng) for outline in sorted({p[0] for p in layout})}
    boxes: Boxes = []
    for outline, labelled, cx, cy, r in layout:
        pts = [(cx + r * x, cy + r * y) for x, y in outlines[outline]]
        draw.polygon(pts, fill=_contrasting(rng, background[int(cy), int(cx)]))
        if labelled:
            boxes.append(_yolo_row(0, _bounds(pts), size))
    return _sensor_noise(image, rng, size), boxes


# ---------------------------------------------------------------------------------------------------------------
# shared helpers, the registry and generation
# ---------------------------------------------------------------------------------------------------------------

def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(angle) + yy * math.sin(angle) + 1.5) / 3  # in (0, 1): a smooth gradient
    return c0 + (c1 - c0) * t[..., None]


def _contrasting(rng: np.random.Generator, near: np.ndarray) -> tuple[int, int, int]:
    for _ in range(50):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - near).sum() > 150:
            break
    return tuple(int(v) for v in colour)


def _bounds(pts: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1) around a polygon's vertices."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def _yolo_row(cls: int, box: tuple, size: int) -> tuple[int, float, float, float, float]:
    """A label row (class, xc, yc, w, h) of the box (x0, y0, x1, y1), normalised by the image side."""
    x0, y0, x1, y1 = box
    return cls, (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size


def _iou(a: tuple, b: tuple) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _fits(area: tuple, taken: list[tuple]) -> bool:
    """Whether ``area`` overlaps each taken area only partly: neither hides more than ``_V3_MAX_COVER`` of the
    other, so shapes stay recognisable and no shape sits inside another's frame (which would change its class)."""
    return all(_cover(area, other) < _V3_MAX_COVER and _cover(other, area) < _V3_MAX_COVER for other in taken)


def _cover(top: tuple, under: tuple) -> float:
    """The fraction of ``under``'s box that ``top`` (drawn later) hides."""
    w = max(0.0, min(top[2], under[2]) - max(top[0], under[0]))
    h = max(0.0, min(top[3], under[3]) - max(top[1], under[1]))
    return w * h / ((under[2] - under[0]) * (under[3] - under[1]))


SETS: dict[str, ShapesSet] = {
    # v2 keeps v1's train images (drawn first from the same seed) and has 256 val images instead of 64: with 64
    # the mAP of one network moved by about as much as candidates differ, so rankings were noise.
    "shapes-v2": ShapesSet("shapes-v2", _V2_CLASSES, {"train": 256, "val": 256}, 20240601, shapes_v2_image),
    # v3 trains on 512 images: with 256 (about 110 objects a class) the base reached only mAP50-95 0.15 after its
    # 40 epochs (0.17 with denser images), with 512 it reaches 0.30 -- in the 0.25-0.7 range where a search ranks.
    "shapes-v3": ShapesSet("shapes-v3", _V3_CLASSES, {"train": 512, "val": 256}, 20250301, shapes_v3_image),
    # v4 asks for a relation between distant objects (is there another shape of my kind?): a candidate for the
    # data on which placement matters, until the truth bench (bench/proxy_validity.py --data) has measured it.
    "shapes-v4": ShapesSet("shapes-v4", _V4_CLASSES, {"train": 512, "val": 256}, 20261207, shapes_v4_image),
    # v5 asks for the same relation without named kinds (is this exact outline repeated elsewhere?): on v4 a network
    # can count four kinds with four detectors; an outline never seen before has to be compared.
    "shapes-v5": ShapesSet("shapes-v5", _V5_CLASSES, {"train": 512, "val": 256}, 20261208, shapes_v5_image),
}
DEFAULT = "shapes-v3"


def get(name: str) -> ShapesSet:
    """The built-in set called ``name``: ``NAME`` as registered, or ``NAME@SIZE`` drawn at ``SIZE`` px (objects
    keep their sizes in px, twins their gap as a fraction of the image); a one-line error otherwise."""
    registered, _, size = name.partition("@")
    if registered not in SETS:
        raise SearchError(f"unknown built-in dataset {registered!r}: expected one of {', '.join(SETS)}, "
                          "optionally with @SIZE (e.g. shapes-v5@640)")
    if not size:
        return SETS[registered]
    if not size.isdigit() or not MIN_SIZE <= int(size) <= MAX_SIZE or int(size) % 32:
        raise SearchError(f"built-in dataset {name!r}: @SIZE must be a multiple of 32 in {MIN_SIZE}-{MAX_SIZE} px")
    return replace(SETS[registered], name=name, size=int(size))


def generate(name: str, root: str | Path) -> Path:
    """Write the set ``name`` into the new directory ``root`` (images, labels, YAML, then MANIFEST.json); its YAML."""
    from PIL import Image

    spec, root = get(name), Path(root)
    rng = np.random.default_rng(spec.seed)
    digest = hashlib.sha256()
    for split, count in spec.splits.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            pixels, boxes = spec.draw(rng, spec.size)
            Image.fromarray(pixels).save(root / "images" / split / f"{i:04d}.png")
            text = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in boxes)
            (root / "labels" / split / f"{i:04d}.txt").write_text(text)
            digest.update(pixels.tobytes() + text.encode())
    names = {"train": "images/train", "val": "images/val", "names": dict(enumerate(spec.classes))}
    yaml_path = root / f"{name}.yaml"
    yaml_path.write_text(f"# attnas built-in dataset {name}: generated by search/shapes.py (seed {spec.seed})\n"
                         + yaml.safe_dump(names, sort_keys=False))
    # The manifest's bytes are the set's fingerprint in recorded studies: keep its layout as v2 wrote it.
    (root / DONE).write_text(json.dumps({"name": name, "splits": spec.splits, "sha256": digest.hexdigest()}))
    return yaml_path


def cached(name: str, cache_dir: str | Path) -> Path:
    """The YAML of the set ``name`` under ``cache_dir/name``, generated on first use."""
    get(name)
    root = Path(cache_dir) / name
    if (root / DONE).is_file():
        return root / f"{name}.yaml"
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a killed or concurrent generation never leaves a half-written set.
    tmp = root.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate(name, tmp)
    except OSError as err:  # a full disk: nothing half-written stays behind, the next run generates it again
        shutil.rmtree(tmp, ignore_errors=True)
        fault = disk_fault(err, f"generating the built-in dataset {name}", cache_dir)
        if fault is None:
            raise
        raise fault from None
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first (or a stale incomplete set is in the way)
        if (root / DONE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
    return root / f"{name}.yaml"
