"""Paired latency: the estimator on synthetic clocks, the deployment backends, the settings' refusals, the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

import space
from search.errors import SearchError
from search.latency import (LatencySettings, estimate, measure_latency, parse_imgsz, prepare_reference,
                            study_reference_ms, time_paired)

REPO = Path(__file__).resolve().parents[1]


class DriftingMachine:
    """A synthetic clock: each run advances it by its work times the machine's slowness at that moment."""

    def __init__(self, slowness):
        self.now = 0.0
        self.slowness = slowness

    def clock(self) -> float:
        return self.now

    def runner(self, work_s: float):
        def run() -> None:
            self.now += work_s * self.slowness(self.now)
        return run


def test_a_candidate_timed_during_a_2x_slowdown_keeps_its_ratio():
    # The whole machine runs 2x slower from t = 0.1 s on (another tenant arrives mid-window).
    machine = DriftingMachine(lambda t: 2.0 if t >= 0.1 else 1.0)
    ref, cand = time_paired(machine.runner(0.010), machine.runner(0.012), min_pairs=10, max_pairs=10,
                            rel_half_width=0, clock=machine.clock)
    assert len(ref) == 11 and len(cand) == 10
    est = estimate(ref, cand)
    assert est.ratio == pytest.approx(1.2, rel=1e-9)
    assert max(cand) == pytest.approx(24.0) and min(cand) == pytest.approx(12.0), "the candidate's own time doubled"
    # Measured alone (today's method) the candidate's median would move by the machine's speed, not its own.


def test_a_linear_drift_cancels_in_the_bracketing_pairs():
    machine = DriftingMachine(lambda t: 1.0 + 5.0 * t)  # 50% slower after 0.1 s, continuously
    ref, cand = time_paired(machine.runner(0.010), machine.runner(0.015), min_pairs=8, max_pairs=8,
                            rel_half_width=0, clock=machine.clock)
    est = estimate(ref, cand)
    assert est.ratio == pytest.approx(1.5, rel=0.02)  # the machine got ~45% slower meanwhile
    assert est.ci_low <= est.ratio <= est.ci_high and est.rel_half_width < 0.02


def test_the_protocol_stops_early_once_the_interval_is_narrow():
    machine = DriftingMachine(lambda t: 1.0)
    ref, cand = time_paired(machine.runner(0.01), machine.runner(0.02), min_pairs=6, max_pairs=30,
                            rel_half_width=0.01, clock=machine.clock)
    assert len(cand) == 6 and estimate(ref, cand).ratio == pytest.approx(2.0)


def test_a_burst_of_another_tenant_does_not_move_the_ratio():
    one_outlier = estimate([10.0] * 9, [11.0] * 7 + [40.0])
    assert one_outlier.ratio == pytest.approx(1.1)
    assert one_outlier.ci_low <= 1.1 <= one_outlier.ci_high
    with pytest.raises(ValueError, match="n or n\\+1 reference"):
        estimate([1.0], [1.0, 1.0, 1.0])


def test_the_study_reference_is_fixed_after_the_first_windows():
    assert study_reference_ms([40.0]) == 40.0
    assert study_reference_ms([40.0, 50.0, 30.0]) == 40.0
    fixed = study_reference_ms([40.0, 50.0, 30.0, 45.0, 41.0], settle=5)
    assert study_reference_ms([40.0, 50.0, 30.0, 45.0, 41.0, 90.0, 95.0], settle=5) == fixed == 41.0
    with pytest.raises(ValueError):
        study_reference_ms([])


@pytest.mark.parametrize("text, expected", [("640", 640), ("640,384", (640, 384)), ("320,320", 320)])
def test_imgsz_parses_one_or_two_sides(text, expected):
    assert parse_imgsz(text) == expected


@pytest.mark.parametrize("text", ["640,380", "abc", "640,384,32", "0"])
def test_a_bad_imgsz_is_one_line(text):
    with pytest.raises(SearchError, match="latency-imgsz") as err:
        parse_imgsz(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("settings, message", [
    (LatencySettings(backend="tensorrt", device="cuda"), "tensorrt"),
    (LatencySettings(backend="tensorrt"), "tensorrt"),
    (LatencySettings(half=True), "--latency-half needs --latency-device cuda"),
    (LatencySettings(device="cuda"), "no CUDA GPU"),
    (LatencySettings(backend="openvino"), "choose one of torch, onnxruntime, tensorrt"),
    (LatencySettings(batch=0), "batch must be >= 1"),
])
def test_impossible_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(SearchError, match=message) as err:
        settings.check(gpu_available=False)
    assert "\n" not in str(err.value)


def test_identity_names_backend_version_and_processor():
    settings = LatencySettings(backend="onnxruntime", imgsz=(640, 384))
    settings.check(gpu_available=False)
    ident = settings.identity()
    import onnxruntime

    assert ident["backend"] == "onnxruntime" and ident["backend_version"] == onnxruntime.__version__
    assert ident["imgsz"] == [640, 384] and ident["device_model"]


def _with(module: str) -> "space.Candidate":
    base = space.load_base("yolov8n.yaml")
    return space.make_candidate(base, {"N4": space.Placement("N4", module, "insert", ())})


@pytest.mark.parametrize("module", ["STA", "CoT", "CGA", "DualViT", "GMA"])
def test_onnxruntime_times_a_model_with_each_attention_layer(module):
    settings = LatencySettings(imgsz=64, backend="onnxruntime", runs=3, min_runs=3, threads=1, ci=0)  # no retries
    reference = prepare_reference(space.make_candidate(space.load_base("yolov8n.yaml")), settings)
    res = measure_latency(_with(module), settings, proxy_imgsz=64, reference=reference)
    assert res.error is None and res.backend == "onnxruntime" and res.n == 3
    assert res.median_ms > 0 and res.reference_ms > 0 and res.ci_low <= res.ratio <= res.ci_high
    assert res.peak_mem_mb > 0 and res.params > 3_157_200


def test_a_rectangular_size_counts_its_own_flops():
    base = space.make_candidate(space.load_base("yolov8n.yaml"))
    square = measure_latency(base, LatencySettings(imgsz=64, runs=2, threads=1), proxy_imgsz=64)
    rect = measure_latency(base, LatencySettings(imgsz=(64, 128), runs=2, threads=1), proxy_imgsz=64)
    assert rect.gflops == pytest.approx(2 * square.gflops, rel=0.02)


def test_the_cli_times_a_pareto_yaml_against_its_base(tmp_path):
    path = space.write_yaml(_with("CGA"), tmp_path / "trial-0001.yaml")
    out = subprocess.run([sys.executable, "-m", "search.latency", str(path), "--imgsz", "64,96", "--threads", "1",
                          "--runs", "3", "--min-runs", "3", "--ci", "0"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert "reference: yolov8n.yaml" in lines[0] and "1x3x64x96" in lines[0]
    assert lines[1].split()[:4] == ["model", "params", "GFLOPs", "peak"] and "x reference" in lines[1]
    assert lines[-1].startswith("trial-0001.yaml") and "3,319,892" in lines[-1]


def test_the_cli_refuses_half_on_cpu_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "search.latency", "yolov8n.yaml", "--half"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "cuda" in out.stderr
