"""The built-in dataset and the data checks: real files, real Ultralytics parsing, no Ray."""

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from search.training.data import SHAPES_CLASSES, SHAPES_SPLITS, check_data, default_dataset, parse_fraction, safe_batch
from search.errors import SearchError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return default_dataset(tmp_path_factory.mktemp("cache"))


def test_default_dataset_is_complete_and_deterministic(shapes, tmp_path):
    root = shapes.parent
    for split, count in SHAPES_SPLITS.items():
        assert len(list((root / "images" / split).glob("*.png"))) == count
        labels = sorted((root / "labels" / split).glob("*.txt"))
        assert len(labels) == count
    files = sorted((root / "labels" / "train").glob("*.txt"))
    rows = [line.split() for f in files for line in f.read_text().splitlines()]
    classes = {int(r[0]) for r in rows}
    assert classes == set(range(len(SHAPES_CLASSES)))
    sizes = [float(r[3]) * 128 for r in rows]
    assert min(sizes) < 16 and max(sizes) > 32, "objects must span several detection scales"
    assert all(0 < float(v) <= 1 for r in rows for v in r[1:])
    # A second generation elsewhere gives byte-identical content (the manifest hashes every image and label).
    again = default_dataset(tmp_path).parent
    assert json.loads((again / "MANIFEST.json").read_text()) == json.loads((root / "MANIFEST.json").read_text())
    assert default_dataset(root.parent) == shapes  # cached: not regenerated


def test_builtin_data_checks_as_ultralytics_reads_it(shapes):
    info = check_data(None, shapes.parent.parent, 1.0)
    assert info.identity == "builtin:shapes-v3" and info.nc == len(SHAPES_CLASSES)
    assert (info.n_train, info.n_val, info.train_used) == (SHAPES_SPLITS["train"], SHAPES_SPLITS["val"],
                                                           SHAPES_SPLITS["train"])


def test_coco128_with_counts_per_split(coco128):
    info = check_data(coco128 / "coco128.yaml", "unused", parse_fraction("8,16"))
    assert (info.nc, info.train_used, info.val_used) == (80, 8, 16)


@pytest.mark.parametrize("write, message", [
    (None, "does not exist"),
    ("train: [unclosed\n", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
    ("train: images/train\nval: images/val\nnames: {0: a}\n", "images not found"),
    ("val: images/val\nnames: {0: a}\n", "'train:' key missing"),
])
def test_bad_data_yaml_is_one_clear_line(tmp_path, write, message):
    path = tmp_path / "data.yaml"
    if write is not None:
        path.write_text(write)
    with pytest.raises(SearchError, match=message) as err:
        check_data(path, tmp_path, 1.0)
    assert "\n" not in str(err.value)


def test_empty_dataset_and_missing_labels_are_refused(tmp_path, shapes):
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
    path = tmp_path / "data.yaml"
    path.write_text("train: images/train\nval: images/val\nnames: {0: a}\n")
    with pytest.raises(SearchError, match=r"no train images found .* \(empty dataset\)"):
        check_data(path, tmp_path, 1.0)
    for split in ("train", "val"):  # images but no labels at all
        for src in sorted((shapes.parent / "images" / split).glob("*.png"))[:3]:
            (tmp_path / "images" / split / src.name).write_bytes(src.read_bytes())
    with pytest.raises(SearchError, match="has a label file"):
        check_data(path, tmp_path, 1.0)
    with pytest.raises(SearchError, match="need at least 2"):
        check_data(shapes, tmp_path, parse_fraction("0.001"))  # one image of 256


def test_fraction_parsing():
    assert parse_fraction("0.25") == 0.25 and parse_fraction("8") == 8 and parse_fraction("8,16") == [8, 16]
    for bad in ("0", "1.5", "x", "-2", "1,2,3,4"):
        with pytest.raises(SearchError):
            parse_fraction(bad)


@given(n=hs.integers(2, 5000), batch=hs.integers(2, 512))
def test_safe_batch_never_leaves_a_last_batch_of_one(n, batch):
    b = safe_batch(n, batch)
    assert 2 <= b <= n and n % b != 1
    below = [x for x in range(2, min(batch, n) + 1) if n % x != 1]
    assert b == (max(below) if below else min(x for x in range(batch + 1, n + 1) if n % x != 1))


def test_shapes_v4_labels_twins_far_apart_and_leaves_singles_unlabelled():
    """shapes-v4: a shape is labelled exactly when another shape of its kind is in the image, at least 35 % of the
    image away; a single's kind is no other shape's, so only the relation tells the two apart."""
    import collections
    import math

    import numpy as np

    from search.training.shapes import _V4_TWIN_GAP, get, shapes_v4_image, shapes_v4_layout

    rng = np.random.default_rng(0)
    singles = 0
    for _ in range(300):
        layout = shapes_v4_layout(rng)
        kinds = collections.Counter(kind for kind, *_ in layout)
        for kind, labelled, cx, cy, _r in layout:
            assert labelled == (kinds[kind] == 2), layout
            if labelled:
                twin = next(s for s in layout if s[0] == kind and s[2:4] != (cx, cy))
                assert math.hypot(cx - twin[2], cy - twin[3]) >= _V4_TWIN_GAP * 128
        assert max(kinds.values()) <= 2
        singles += sum(not labelled for _, labelled, *_ in layout)
    assert singles >= 300, "about one unlabelled single an image, or the relation would not matter"
    pixels, boxes = shapes_v4_image(np.random.default_rng(1))
    assert pixels.shape == (128, 128, 3) and boxes
    assert all(n == 2 for n in collections.Counter(c for c, *_ in boxes).values())
    assert get("shapes-v4").classes == ("circle", "square", "triangle", "hexagon")


def test_shapes_v5_labels_exactly_the_repeated_outlines():
    """shapes-v5: a shape is labelled exactly when its outline is drawn twice in the image (at sizes within 10 %, at
    least 35 % of the image apart); every single has an outline of its own, so only comparing outlines tells them
    apart. The drawn twins' boxes scale with their sizes: same outline, same orientation."""
    import collections
    import math

    import numpy as np

    from search.training import shapes

    rng = np.random.default_rng(0)
    singles = 0
    for _ in range(300):
        layout = shapes.shapes_v5_layout(rng)
        outlines = collections.Counter(o for o, *_ in layout)
        assert max(outlines.values()) <= 2
        for outline, labelled, cx, cy, r in layout:
            assert labelled == (outlines[outline] == 2), layout
            if labelled:
                _, _, x, y, q = next(s for s in layout if s[0] == outline and s[2:4] != (cx, cy))
                assert math.hypot(cx - x, cy - y) >= shapes._V4_TWIN_GAP * 128
                assert 0.9 / 1.1 <= q / r <= 1.1 / 0.9
        singles += sum(not labelled for _, labelled, *_ in layout)
    assert singles >= 300, "about one unlabelled single an image, or the relation would not matter"

    a, b = shapes.random_outline(np.random.default_rng(1)), shapes.random_outline(np.random.default_rng(2))
    assert max(math.hypot(*p) for p in a) == 1.0 and a != b
    pixels, boxes = shapes.shapes_v5_image(np.random.default_rng(3))
    assert pixels.shape == (128, 128, 3) and len(boxes) % 2 == 0 and boxes
    widths = sorted((w / h, w) for _, _, _, w, h in boxes)  # twins: one aspect ratio, sizes within 10 %
    pairs = [widths[i:i + 2] for i in range(0, len(widths), 2)]
    assert all(math.isclose(p[0][0], p[1][0], rel_tol=1e-2) and p[1][1] / p[0][1] <= 1.1 / 0.9 + 1e-6 for p in pairs)
    assert shapes.get("shapes-v5").classes == ("matched",)


def test_a_builtin_set_drawn_at_another_size(tmp_path, monkeypatch):
    """``builtin:NAME@SIZE`` draws the registered set at SIZE px under its own name (so its own fingerprint); its
    objects keep their sizes in px. A bad size is one line naming the rule."""
    from dataclasses import replace

    from PIL import Image

    from search.training import shapes

    small = replace(shapes.SETS["shapes-v5"], splits={"train": 3, "val": 2})
    monkeypatch.setitem(shapes.SETS, "shapes-v5", small)
    yaml_path = shapes.generate("shapes-v5@256", tmp_path / "big")
    assert yaml_path.name == "shapes-v5@256.yaml"
    assert Image.open(tmp_path / "big" / "images" / "train" / "0000.png").size == (256, 256)
    assert json.loads((tmp_path / "big" / "MANIFEST.json").read_text())["name"] == "shapes-v5@256"
    sides = [float(w) * 256 for f in (tmp_path / "big" / "labels").rglob("*.txt")
             for w in (line.split()[3] for line in f.read_text().splitlines())]
    assert sides and max(sides) <= 40.0 * 1.1  # px, as at 128 px: scaled with the image they would reach 88
    assert shapes.get("shapes-v3").size == 128 and shapes.get("shapes-v3@640").size == 640
    for bad in ("shapes-v5@100", "shapes-v5@big", "shapes-v5@2048", "shapes-v9@256"):
        with pytest.raises(SearchError, match="@SIZE|unknown built-in dataset"):
            shapes.get(bad)
