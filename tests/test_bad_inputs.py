"""Bad input that used to get through ``python -m search.run`` (issue 12): each ends with one line on stderr,
exit status 2, no traceback, no study created and nothing written outside ``--out``."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from search import run as search_run
from search.settings import RAY_CONNECT_S

REPO = Path(__file__).resolve().parents[1]


def _subset(coco128: Path, root: Path, n: int = 4, names: str = "{0: person}") -> Path:
    """A small copy of coco128 (n train, n val images with their labels) under ``root``; returns its YAML."""
    for split, src in (("train", "train2017"), ("val", "val2017")):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for image in sorted((coco128 / "images" / src).glob("*.jpg"))[:n]:
            shutil.copy(image, root / "images" / split / image.name)
            label = coco128 / "labels" / src / f"{image.stem}.txt"
            if label.is_file():
                shutil.copy(label, root / "labels" / split / label.name)
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {names}\n")
    return yaml


def _refused(argv, tmp_path, capsys, message: str) -> str:
    """Run the CLI in-process; assert the bad-input contract; return stderr."""
    out = tmp_path / "out"
    before = set(tmp_path.parent.iterdir())
    assert search_run.main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err, err
    assert not list(out.rglob("*.db")) and not list(out.rglob("trials")) and not list(out.rglob("artifacts"))
    assert set(tmp_path.parent.iterdir()) == before, "nothing may be written beside --out"
    return err


def test_a_study_name_that_is_not_one_path_component_is_refused(tmp_path, coco128, capsys):
    data = ["--data", str(coco128 / "coco128.yaml")]
    for name in ("../../escape", "a/b", "..", ".hidden", "with space"):
        err = _refused(["--study-name", name, *data], tmp_path, capsys, "letters, digits, '.', '_' or '-'")
        assert repr(name) in err
    assert not (tmp_path.parent.parent / "escape").exists()


def test_out_below_a_file_or_unwritable_is_one_line(tmp_path, coco128, capsys):
    data = tmp_path / "data.yaml"
    data.write_text("not a directory")
    for out in (data / "sub", data):
        assert search_run.main(["--out", str(out), "--data", str(coco128 / "coco128.yaml")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out}: {data} is a file" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_latency_on_cuda_without_a_gpu_is_refused_before_the_study_exists(tmp_path, coco128, capsys):
    _refused(["--latency-device", "cuda", "--data", str(coco128 / "coco128.yaml")], tmp_path, capsys,
             "--latency-device cuda but no CUDA GPU is visible")


def test_labels_that_do_not_fit_the_names_are_refused_with_the_count_and_an_example(tmp_path, coco128, capsys):
    yaml = tmp_path / "one-class.yaml"  # coco128 itself, but one class: every label's class is out of range
    yaml.write_text(f"path: {coco128}\ntrain: images/train2017\nval: images/val2017\nnames: {{0: person}}\n")
    err = _refused(["--data", str(yaml)], tmp_path, capsys, "no usable train image (126 of 128 have")
    assert "Label class" in err and "exceeds dataset class count 1" in err


def test_some_bad_labels_are_ignored_and_said(tmp_path, coco128):
    from search.training.data import check_data

    yaml = tmp_path / "forty.yaml"  # coco128 with its first 40 classes: images with a higher class are unusable
    names = {i: f"c{i}" for i in range(40)}
    yaml.write_text(f"path: {coco128}\ntrain: images/train2017\nval: images/val2017\nnames: {names}\n")
    info = check_data(yaml, tmp_path / "cache")
    assert [n.split(":")[0] for n in info.notes] == ["train", "val"], info.notes
    assert all(" of 128 images ignored" in n and "exceeds dataset class count 40" in n for n in info.notes)


def test_corrupt_images_are_refused(tmp_path, coco128, capsys):
    yaml = _subset(coco128, tmp_path / "d", names=str(dict(enumerate(f"c{i}" for i in range(80)))))
    for image in (tmp_path / "d" / "images" / "train").glob("*.jpg"):
        image.write_bytes(b"\xff\xd8 this is not a jpeg")
    err = _refused(["--data", str(yaml)], tmp_path, capsys, "no usable train image (4 of 4 have")
    assert "ignoring corrupt image/label" in err


def test_an_empty_val_split_is_refused(tmp_path, coco128, capsys):
    yaml = _subset(coco128, tmp_path / "d", names=str(dict(enumerate(f"c{i}" for i in range(80)))))
    for image in (tmp_path / "d" / "images" / "val").glob("*.jpg"):
        image.unlink()
    _refused(["--data", str(yaml)], tmp_path, capsys, "no val images found")


def test_a_space_that_is_empty_at_the_training_size_is_refused(tmp_path, coco128, capsys):
    space = tmp_path / "space.yaml"  # stoken_size 8 fits P5 at 640 px (20x20), not at 64 px (2x2)
    space.write_text("slots: [P5]\nmodules: {STA: {stoken_size: [8]}}\nmin_layers: 1\n")
    _refused(["--space", str(space), "--imgsz", "64", "--data", str(coco128 / "coco128.yaml")], tmp_path, capsys,
             "the space is empty at --imgsz 64")


def test_resume_without_a_name_among_several_studies_lists_them(tmp_path, coco128, capsys):
    out = tmp_path / "out"
    for name in ("first", "second"):
        (out / name).mkdir(parents=True)
        optuna.create_study(study_name=name, storage=f"sqlite:///{out / name / 'study.db'}")
    dbs = sorted(p.stat().st_mtime_ns for p in out.rglob("*.db"))
    assert search_run.main(["--out", str(out), "--resume", "--data", str(coco128 / "coco128.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which study? pass --study-name" in err and "first, second" in err, err
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*.db")) == dbs, "no study touched"
    storage = out / "journal.log"
    from optuna.storages.journal import JournalFileBackend

    journal = optuna.storages.JournalStorage(JournalFileBackend(str(storage)))
    for name in ("a", "b"):
        optuna.create_study(study_name=name, storage=journal)
    assert search_run.main(["--out", str(out), "--resume", "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a, b" in err, err


def test_an_unreachable_ray_address_is_refused_quickly_and_creates_nothing(tmp_path, coco128):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "search.run", "--out", str(out), "--ray-address", "127.0.0.1:1",
           "--data", str(coco128 / "coco128.yaml")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    wall = time.monotonic() - t0
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--ray-address 127.0.0.1:1: cannot reach a Ray cluster there" in proc.stderr
    assert wall < RAY_CONNECT_S + 30, "bounded: refused within the connect timeout (plus start-up)"
    assert not out.exists() or not list(out.rglob("*.db"))
