"""A real search study served by the real optuna-dashboard on localhost, read back over its HTTP API."""

import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory, coco128):
    """A two-trial, three-objective study of the base model alone: one trained trial and one that reuses its
    result, exported as a user would."""
    out = tmp_path_factory.mktemp("dash")
    space = out / "base-only.yaml"
    space.write_text("max_layers: 0\n")
    cmd = [sys.executable, "-m", "search.run", "--out", str(out), "--study-name", "dash", "--budget", "2",
           "--space", str(space), "--data", str(coco128 / "coco128.yaml"), "--imgsz", "64", "--epochs", "1", "--confirm-seeds", "0",
           "--fraction", "8,8", "--batch", "4", "--latency-imgsz", "64", "--latency-runs", "3", "--latency-ci", "0",
           "--objectives", "mAP50-95,latency_ms,params", "--weights", "none"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left behind
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stderr[-3000:]
    command = next(line for line in stdout.splitlines() if line.startswith("Dashboard: ")).split(": ", 1)[1]
    return out, command


@contextmanager
def dashboard_server(command: str):
    """The dashboard command a search printed, run as a real server on a free port; yields its base URL."""
    port = _free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    args = [str(exe), *shlex.split(command)[1:], "--port", str(port), "--host", "127.0.0.1", "--quiet"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if requests.get(f"{url}/api/meta", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.2)
        else:
            pytest.fail("optuna-dashboard did not answer within 30 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def dashboard(study):
    """The exact command the search printed, plus a free port, as a real server process."""
    with dashboard_server(study[1]) as url:
        yield url


def test_three_objective_exports_have_a_column_and_a_pairwise_plot_per_objective(study):
    out, _ = study
    study_dir = out / "dash"
    with open(study_dir / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["trial", "mAP50-95", "latency_ms", "params"]
    assert [int(r["trial"]) for r in rows] == [0] and float(rows[0]["params"]) == 3_157_200
    summary = json.loads((study_dir / "summary.json").read_text())
    assert [o["name"] for o in summary["objectives"]] == ["mAP50-95", "latency_ms", "params"]
    assert set(summary["hypervolume"]["reference_point"]) == {"mAP50-95", "latency_ms", "params"}
    pairs = ["pareto-mAP50-95-vs-latency_ms.png", "pareto-mAP50-95-vs-params.png", "pareto-latency_ms-vs-params.png"]
    assert summary["plots"] == [*pairs, "hypervolume.png"]
    for name in summary["plots"]:
        assert (study_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (yaml_file,) = (study_dir / "pareto").glob("*.yaml")
    header = yaml_file.read_text().splitlines()[:4]
    assert header[1].startswith("# mAP50-95: ") and header[3] == "# params: 3157200 parameters"


def test_dashboard_serves_the_study_and_its_trials(dashboard):
    studies = requests.get(f"{dashboard}/api/studies", timeout=10).json()["study_summaries"]
    (summary,) = [s for s in studies if s["study_name"] == "dash"]
    assert summary["directions"] == ["maximize", "minimize", "minimize"]
    assert "attnas_settings" in {a["key"] for a in summary["user_attrs"]}
    detail = requests.get(f"{dashboard}/api/studies/{summary['study_id']}", timeout=10).json()
    assert detail["objective_names"] == ["mAP50-95", "latency_ms", "params"]
    trials = detail["trials"]
    assert [t["state"] for t in trials] == ["Complete", "Complete"]
    attrs = [{a["key"]: a["value"] for a in t["user_attrs"]} for t in trials]
    assert attrs[0]["placements"] == "base" and float(attrs[0]["latency_ms"]) > 0
    assert attrs[1]["reused_from"] == "0", "the dashboard shows that trial 1 reused trial 0"
    assert {b["number"] for b in detail["best_trials"]} >= {0}
    (artifact,) = trials[0]["artifacts"]
    yaml_text = requests.get(f"{dashboard}/artifacts/{summary['study_id']}/{trials[0]['trial_id']}/"
                             f"{artifact['artifact_id']}", timeout=10).text
    assert yaml_text.startswith("# attnas candidate: ") and "Detect" in yaml_text
