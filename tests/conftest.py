"""Test-wide settings: offline Ultralytics, quiet logs, paths to the shared real data."""

import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics must never reach the network in tests
os.environ.setdefault("YOLO_VERBOSE", "False")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "datasets" / "coco128"


@pytest.fixture(scope="session")
def coco128() -> Path:
    """The real coco128 set that CI provides beside the clone (../shared/datasets/coco128)."""
    if not (COCO128 / "coco128.yaml").is_file():
        pytest.fail(f"real test data missing: expected {COCO128}/coco128.yaml beside the repository")
    return COCO128


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Layer tests run single-threaded: stable timings on a shared 2-core machine, no oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
