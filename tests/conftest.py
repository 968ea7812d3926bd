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


class SmallDisk:
    """A real small file system (tmpfs) at ``path``: ``fill()`` takes every free byte (writes then fail with ENOSPC,
    as on a full disk), ``free()`` gives them back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / ".filler"

    def fill(self, leave: int = 0) -> None:
        """Take every free byte but ``leave``."""
        import errno

        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
        finally:
            os.close(fd)
        if leave:
            os.truncate(self.filler, max(0, self.filler.stat().st_size - leave))

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path, request) -> SmallDisk:
    """A 4 MB tmpfs under ``tmp_path`` (size: ``@pytest.mark.disk_mb(N)``), unmounted after the test. Mounting needs
    root: elsewhere the test is skipped, saying so."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs here, and only root can mount one")
    marker = request.node.get_closest_marker("disk_mb")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={marker.args[0] if marker else 4}m", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield SmallDisk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # lazy: a test's open files may still hold it
