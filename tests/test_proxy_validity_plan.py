"""The truth bench's plan: which networks get a second seed (bench/proxy_validity.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
from proxy_validity import again  # noqa: E402


def _first_seed(arch: str, value: float) -> dict:
    return {"kind": "truth", "arch": arch, "seed": 0, "map50_95": value}


def test_apparent_winners_get_a_second_seed_once_every_first_seed_is_in():
    archs = [SimpleNamespace(hash=f"h{i}") for i in range(6)]  # h0 is the base
    values = {"h0": 0.50, "h1": 0.49, "h2": 0.40, "h3": 0.505, "h4": 0.48, "h5": 0.51}
    rows = [_first_seed(a, v) for a, v in values.items() if a != "h4"]
    rows.append({"kind": "proxy", "arch": "h4", "seed": 0, "map50_95": None})
    assert again(archs, rows, best=2) == [0, 1, 2]  # h4's first seed is missing: no winners known yet
    rows.append(_first_seed("h4", values["h4"]))
    assert again(archs, rows, best=2) == [0, 1, 2, 5, 3]  # the two best others, best first
    assert again(archs, rows, best=0) == [0, 1, 2]
    assert again(archs[:2], rows, best=2) == [0, 1]
