"""What a raw bench file records about the machine and the software that produced it."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata


def machine_facts() -> dict:
    """Date, processor, cores, Python and the versions of the libraries the numbers depend on."""
    from search.latency import device_model

    versions = {}
    for package in ("torch", "torchvision", "ultralytics", "optuna", "ray"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": device_model("cpu"),
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "platform": platform.platform(), **versions}
