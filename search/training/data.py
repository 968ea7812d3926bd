"""Datasets for the proxy: the built-in sets (generated on first use, see search/shapes.py) and checks of a user's
data YAML.

``--data`` left out means the default built-in set, ``shapes-v3``; ``builtin:NAME`` picks one by name
(``builtin:shapes-v2``, the easy 3-class set of earlier studies). Anything else is a path to an Ultralytics YAML.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import shapes
from ..errors import SearchError

SHAPES_NAME = shapes.DEFAULT  # the built-in set --data means when left out
SHAPES_CLASSES = shapes.SETS[SHAPES_NAME].classes
SHAPES_SPLITS = shapes.SETS[SHAPES_NAME].splits
BUILTIN_PREFIX = "builtin:"
_DONE = shapes.DONE


@dataclass(frozen=True)
class DataInfo:
    """A checked detection dataset: its YAML, identity for resume checks, and the image counts a trial uses."""

    yaml: Path
    identity: str  # "builtin:shapes-v3" (or another built-in set) or the YAML's absolute path
    fingerprint: str  # content hash of the YAML (and of the manifest for the built-in set)
    nc: int
    n_train: int
    n_val: int
    train_used: int  # after --fraction
    val_used: int
    notes: tuple[str, ...] = ()  # what the label check ignored, said at start


    def describe(self) -> str:
        return (f"{self.identity} ({self.nc} classes, {self.train_used}/{self.n_train} train and "
                f"{self.val_used}/{self.n_val} val images used)")


def default_dataset(cache_dir: str | Path, name: str = SHAPES_NAME) -> Path:
    """The YAML of the built-in set ``name`` (default ``shapes-v3``) under ``cache_dir``, generated on first use."""
    return shapes.cached(name, cache_dir)


def builtin_name(data: str | Path | None) -> str | None:
    """The built-in set ``--data`` names (None: the default; ``"builtin:NAME"``: that one), else None (a YAML path).

    An unknown ``builtin:NAME`` is a one-line error naming the known sets.
    """
    if data is None:
        return SHAPES_NAME
    text = str(data)
    if not text.startswith(BUILTIN_PREFIX):
        return None
    return shapes.get(text[len(BUILTIN_PREFIX):]).name


def parse_fraction(text: str) -> float | int | list[float | int]:
    """``--fraction`` as Ultralytics takes it: a ratio (0.25), an image count (8) or per split ("8,16")."""
    try:
        parts = [float(p) if "." in p or "e" in p.lower() else int(p) for p in str(text).split(",")]
    except ValueError:
        raise SearchError(f"--fraction {text!r}: expected a ratio (0.25), an image count (8) "
                          "or train,val counts (8,16)") from None
    for p in parts:
        if p <= 0 or (isinstance(p, float) and p > 1):
            raise SearchError(f"--fraction {text!r}: ratios must be in (0, 1] and counts at least 1")
    if len(parts) > 3:
        raise SearchError(f"--fraction {text!r}: at most train,val,test")
    return parts[0] if len(parts) == 1 else parts


def used_count(total: int, fraction: float | int | list, split: str) -> int:
    """Images of ``split`` Ultralytics trains/validates on for ``fraction`` (its get_split_fraction rule)."""
    from ultralytics.data.utils import get_split_fraction

    f = get_split_fraction(fraction, split)
    count = f if isinstance(f, int) else max(1, round(total * f))
    return min(count, total)


def resolve_data_yaml(data: str | Path | None, cache_dir: str | Path) -> Path:
    """The dataset YAML ``--data`` (or a study's recorded data identity) means: a built-in set's under
    ``cache_dir`` (generated on first use), else the path itself."""
    name = builtin_name(data)
    return default_dataset(cache_dir, name) if name is not None else Path(data).expanduser()


def data_names(data_yaml: str | Path) -> dict[int, str]:
    """The class names of a dataset YAML as Ultralytics keeps them on a model (index -> name)."""
    names = (yaml.safe_load(Path(data_yaml).read_text()) or {}).get("names") or {}
    return dict(enumerate(names)) if isinstance(names, list) else {int(k): str(v) for k, v in names.items()}


def check_data(data: str | Path | None, cache_dir: str | Path, fraction: float | int | list = 1.0) -> DataInfo:
    """Resolve ``--data`` (None: the built-in set) and check it as Ultralytics will read it, without downloads."""
    name = builtin_name(data)
    builtin = name is not None
    path = resolve_data_yaml(data, cache_dir)
    if not path.is_file():
        raise SearchError(f"data YAML {path} does not exist (pass an Ultralytics dataset YAML, or omit --data "
                          f"for the built-in {SHAPES_NAME} set)")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SearchError(f"data YAML {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SearchError(f"data YAML {path}: expected a mapping with train, val and names")
    from ultralytics.data.utils import check_det_dataset

    try:
        # autodownload=False: a YAML's `download:` field may be a URL or Python code; a search never runs it.
        info = check_det_dataset(str(path), autodownload=False)
    except Exception as err:  # Ultralytics raises SyntaxError/TypeError/FileNotFoundError with multi-line text
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise SearchError(f"data YAML {path}: {first.strip(' ❌')}") from None
    counts = {}
    for split in ("train", "val"):
        images = list_images(info[split])
        if not images:
            raise SearchError(f"data YAML {path}: no {split} images found in {info[split]} (empty dataset)")
        counts[split] = images
    n_train, n_val = len(counts["train"]), len(counts["val"])
    train_used = used_count(n_train, fraction, "train")
    if train_used < 2:
        raise SearchError(f"--fraction {fraction} leaves {train_used} training image of {n_train}; need at least 2")
    if not any(_has_label(p) for p in counts["train"][:train_used]):
        raise SearchError(f"data YAML {path}: none of the {train_used} training images used has a label file "
                          "(expected labels/… beside images/…)")
    notes = tuple(note for split in ("train", "val") if (note := check_labels(path, info, split)))
    fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if builtin:
        fingerprint = hashlib.sha256((path.parent / _DONE).read_bytes()).hexdigest()[:16]
    return DataInfo(yaml=path.resolve(), identity=f"{BUILTIN_PREFIX}{name}" if builtin else str(path.resolve()),
                    fingerprint=fingerprint, nc=int(info["nc"]), n_train=n_train, n_val=n_val,
                    train_used=train_used, val_used=used_count(n_val, fraction, "val"), notes=notes)


def check_labels(path: Path, info: dict, split: str) -> str | None:
    """Verify a split's images and labels once, as every trial's trainer will (Ultralytics' own YOLODataset scan:
    image decodes, label format, class ids below the class count), and write its labels cache where Ultralytics
    can (a read-only dataset is scanned again by each trial; Ultralytics only warns about that).

    Raises SearchError when no image of the split is usable with a box (every trial would fail with "No valid
    images found", or learn and score nothing); returns a note saying how many are ignored when only some are."""
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel("ERROR")  # Ultralytics logs each bad file and a read-only cache; the summary below says it
    try:
        _label_scan().last_scan = None
        dataset = _label_scan()(img_path=info[split], data=info, task="detect", imgsz=64, augment=False)
        failed = None
    except (RuntimeError, ValueError) as err:  # no usable image at all: "No valid images found" and why
        dataset, failed = None, err
    finally:
        LOGGER.setLevel(level)
    total = len(list_images(info[split]))
    scan = _label_scan().last_scan
    corrupt = scan["results"][3] if scan else total
    msgs = [m for m in (scan["msgs"] if scan else str(failed).splitlines()) if "ignoring" in m or "corrupt" in m]
    example = _clip(msgs[0].strip()) if msgs else "no details from Ultralytics"
    boxes = sum(len(lb["cls"]) for lb in dataset.labels) if dataset is not None else 0
    if boxes == 0:
        raise SearchError(f"data YAML {path}: no usable {split} image ({corrupt} of {total} have an unreadable image "
                          f"or a bad label, the rest no box); first: {example}")
    if corrupt == 0:
        return None
    return f"{split}: {corrupt} of {total} images ignored (unreadable image or bad label; first: {example})"


@functools.cache
def _label_scan() -> type:
    """Ultralytics' YOLODataset, keeping its scan's counts and messages (it drops them once the labels load)."""
    from ultralytics.data.dataset import YOLODataset

    class LabelScan(YOLODataset):
        last_scan: dict | None = None  # also set when loading then fails ("No valid images found")

        def _load_or_scan_cache(self, cache_path, cache_hash):
            cache, exists = super()._load_or_scan_cache(cache_path, cache_hash)
            type(self).last_scan = {"results": cache["results"], "msgs": list(cache.get("msgs", []))}
            return cache, exists

    return LabelScan


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def list_images(spec: str | list[str]) -> list[Path]:
    """Image files of a split given as Ultralytics allows: a directory, a .txt list of files, or a list of those."""
    from ultralytics.data.utils import IMG_FORMATS

    found: list[Path] = []
    for item in spec if isinstance(spec, list) else [spec]:
        p = Path(item)
        if p.is_dir():
            found += [f for f in p.rglob("*.*") if f.suffix[1:].lower() in IMG_FORMATS]
        elif p.is_file() and p.suffix == ".txt":
            lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
            found += [(p.parent / ln).resolve() if ln.startswith("./") else Path(ln) for ln in lines]
            found = [f for f in found if f.suffix[1:].lower() in IMG_FORMATS]
        elif p.is_file() and p.suffix[1:].lower() in IMG_FORMATS:
            found.append(p)
    return sorted(found)


def _has_label(image: Path) -> bool:
    from ultralytics.data.utils import img2label_paths

    label = Path(img2label_paths([str(image)])[0])
    return label.is_file() and label.stat().st_size > 0


def safe_batch(n_train: int, batch: int) -> int:
    """The batch size nearest below (else above) ``batch`` whose last training batch is not a single image.

    A final batch of 1 makes BatchNorm on pooled 1x1 features (CoT's squeeze-excite path) fail with "expected
    more than 1 value per channel"; Ultralytics only guards this at tiny image sizes. Changing the batch here,
    once for the whole study, keeps every trial's schedule identical (a per-trial drop_last would not).
    """
    batch = min(batch, n_train)
    for b in [*range(batch, 1, -1), *range(batch + 1, n_train + 1)]:  # nearest below first, else above
        if n_train % b != 1:
            return b
    return n_train  # unreachable for n_train >= 2: n_train % n_train == 0
