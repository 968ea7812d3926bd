"""The default-run bench's front comparison: one reference for every study (bench/default_run.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
from default_run import compare_fronts  # noqa: E402


def _record(name: str, base: list[float], points: list[list[float]]) -> dict:
    return {"variant": name, "front": {"objectives": ["mAP50-95", "latency_ms / base"], "maximize": [True, False],
                                       "base": base, "points": [{"values": p} for p in points]}}


def test_fronts_are_compared_above_the_lowest_base_with_one_latency_reference():
    a = _record("a", [0.50, 1.0], [[0.50, 1.0], [0.52, 1.2]])
    b = _record("b", [0.49, 1.0], [[0.49, 1.0], [0.53, 1.5]])
    got = compare_fronts([a, b])
    ref_map, ref_ratio = 0.49, 1.5 * 1.1  # the lowest base, 10 % beyond the dearest point of either front
    assert got["reference"] == pytest.approx([ref_map, ref_ratio])
    # staircases by hand: a point adds its width (to the reference ratio) times its height above what came before
    hv_a = (ref_ratio - 1.0) * (0.50 - ref_map) + (ref_ratio - 1.2) * (0.52 - 0.50)
    hv_b = (ref_ratio - 1.5) * (0.53 - ref_map)  # its base point sits on the reference mAP: it adds nothing
    assert got["hypervolume"]["a"] == pytest.approx(hv_a)
    assert got["hypervolume"]["b"] == pytest.approx(hv_b)
