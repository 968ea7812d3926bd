"""The built-in shapes sets: deterministic, v2 unchanged, v3's labels sound and every class in both splits."""

import json
from pathlib import Path

import pytest

from search.training import shapes
from search.training.data import builtin_name, check_data, default_dataset
from search.errors import SearchError

# MANIFEST.json of shapes-v2 as search/data.py wrote it before the generators moved to search/shapes.py: its
# bytes are the data fingerprint recorded in existing studies, so they must not change.
V2_MANIFEST = ('{"name": "shapes-v2", "splits": {"train": 256, "val": 256}, '
               '"sha256": "cef82b402784e144fbdf5073f273c5d678baf893820a2558e711d6a3c2aadde5"}')

V3_SHA256 = "b459a02323a91c875b497529df9e5456971f914a1b30a0a19f3dc351135e95d5"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def _rows(root: Path, split: str) -> list[list[str]]:
    return [line.split() for f in sorted((root / "labels" / split).glob("*.txt")) for line in f.read_text().splitlines()]


def test_v2_is_byte_for_byte_what_it_was(cache):
    root = shapes.cached("shapes-v2", cache).parent
    assert (root / "MANIFEST.json").read_text() == V2_MANIFEST


def test_v3_generates_the_same_set_every_time(cache):
    first = shapes.cached("shapes-v3", cache).parent / "MANIFEST.json"
    # Pinned: a change to v3's drawing changes every study's data fingerprint, so it must be deliberate (and
    # re-measured with bench/proxy_fidelity.py).
    assert json.loads(first.read_text())["sha256"] == V3_SHA256
    assert shapes.cached("shapes-v3", cache).parent / "MANIFEST.json" == first  # cached: not regenerated


def test_v3_labels_lie_inside_the_image_and_every_class_is_in_both_splits(cache):
    root = shapes.cached("shapes-v3", cache).parent
    spec = shapes.get("shapes-v3")
    for split, count in spec.splits.items():
        assert len(list((root / "images" / split).glob("*.png"))) == count
        rows = _rows(root, split)
        assert all(len(r) == 5 for r in rows)
        classes = [int(r[0]) for r in rows]
        assert set(classes) == set(range(len(spec.classes))), f"{split}: a class is missing"
        assert min(classes.count(c) for c in set(classes)) >= 50, f"{split}: a class has too few objects to score"
        for _, xc, yc, w, h in ((r[0], *map(float, r[1:])) for r in rows):
            assert 0 < w <= 1 and 0 < h <= 1
            assert 0 <= xc - w / 2 and xc + w / 2 <= 1 and 0 <= yc - h / 2 and yc + h / 2 <= 1
        sides = [max(float(r[3]), float(r[4])) * shapes.IMGSZ for r in rows]
        assert min(sides) < 12 and max(sides) > 56, "objects must span every detection scale"


def test_builtin_names_and_check_data(cache):
    assert builtin_name(None) == "shapes-v3" and builtin_name("builtin:shapes-v2") == "shapes-v2"
    assert builtin_name("data/coco.yaml") is None and builtin_name(Path("x.yaml")) is None
    with pytest.raises(SearchError, match="unknown built-in dataset 'shapes-v9': expected one of shapes-v2, shapes-v3"):
        builtin_name("builtin:shapes-v9")
    assert default_dataset(cache) == shapes.cached("shapes-v3", cache)
    v2 = check_data("builtin:shapes-v2", cache)
    assert (v2.identity, v2.nc, v2.n_train, v2.n_val) == ("builtin:shapes-v2", 3, 256, 256)
    v3 = check_data(None, cache)
    assert (v3.identity, v3.nc) == ("builtin:shapes-v3", 10)
    assert v3.fingerprint != v2.fingerprint


def test_a_full_disk_while_generating_is_one_line_leaves_nothing_half_written_and_the_next_run_generates_it(
        tmp_path, monkeypatch, capsys):
    """ENOSPC injected at the 20th image written (issue 22): the run stops with one line naming the fault and where,
    no partial set stays under --out, and once there is room the same command generates the whole set."""
    import errno

    from PIL import Image

    from search import run as search_run

    save, written = Image.Image.save, []

    def full_disk(self, fp, *args, **kwargs):
        if len(written) >= 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        written.append(fp)
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "runs"
    assert search_run.main(["--out", str(out), "--data", "builtin:shapes-v2", "--budget", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("error: no space left on the device of") and "built-in dataset shapes-v2" in err, err
    assert str(out / ".data") in err and "run the same command again" in err
    assert list((out / ".data").iterdir()) == [], "the half-written set is removed"
    monkeypatch.setattr(Image.Image, "save", save)  # room again
    yaml_path = shapes.cached("shapes-v2", out / ".data")
    assert (yaml_path.parent / shapes.DONE).read_text() == V2_MANIFEST, "the whole set, as always"
