"""The search engine end to end: real local Ray, real SQLite, real Ultralytics training on a few coco128 images.

Every run here is tiny (imgsz 64, 1 epoch, 8 train / 8 val images, latency at 64 px) so the module stays near two
minutes on 2 cores; what is checked is the engine's behaviour, not the proxy's quality.
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import run as search_run
from search import export as search_export

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ["--imgsz", "64", "--epochs", "1", "--confirm-seeds", "0", "--fraction", "8,8", "--batch", "4",
        "--latency-imgsz", "64", "--latency-runs", "3", "--latency-ci", "0", "--latency-warmup", "1", "--base-epochs", "1"]


def search_cmd(out: Path, coco128: Path, *extra: str) -> list[str]:
    data = str(coco128 / "coco128.yaml")
    return [sys.executable, "-m", "search.run", "--out", str(out), "--data", data, *TINY, *extra]


def run_search(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in its own process group and clean up whatever Ray left in it."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def load(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'study.db'}")


def states(study: optuna.Study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, coco128):
    out = tmp_path_factory.mktemp("e2e")
    result = run_search(search_cmd(out, coco128, "--budget", "3", "--study-name", "e2e"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_end_to_end_study_is_complete_and_documented(e2e):
    out, result = e2e
    study = load(out, "e2e")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 3
    assert study.metric_names == ["mAP50-95", "latency_ms"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    settings = study.user_attrs["attnas_settings"]
    assert settings["proxy"]["epochs"] == 1 and settings["latency"]["imgsz"] == 64
    assert settings["facts"]["data"]["identity"].endswith("coco128.yaml") and settings["base"] == "yolov8n.yaml"
    assert settings["objectives"] == ["mAP50-95", "latency_ms"]
    assert {"torch", "ultralytics", "optuna", "ray"} <= set(study.user_attrs["attnas_versions"])
    assert done[0].params == {"placement": "none"}, "the base model is evaluated first, as the reference"
    assert "Token authentication" not in result.stderr, "no notice a user cannot act on (issue 21)"
    # Pipelining: a trial beyond the two workers is sampled (and timed) before either training finishes.
    assert done[2].datetime_start < min(done[0].datetime_complete, done[1].datetime_complete)
    store = optuna.artifacts.FileSystemArtifactStore(str(out / "e2e" / "artifacts"))
    trained = [t for t in done if "reused_from" not in t.user_attrs]  # TPE may propose a candidate again
    assert len(trained) >= 2
    for t in trained:
        a = t.user_attrs
        assert t.values[0] == a["map50_95"] and 0 <= t.values[0] <= 1
        assert t.values[1] == a["latency_ms"] and a["latency_p90_ms"] >= a["latency_min_ms"] > 0
        assert a["latency_n"] == 3 and a["n_params"] > 1e6 and a["gflops"] > 0 and a["train_s"] > 0
        assert 0 <= a["parked_s"] < a["train_s"], "time parked for the latency meter is measured"
        assert a["proxy"]["imgsz"] == 64 and len(a["candidate_hash"]) == 16
        metas = optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)
        assert len(metas) == 1 and metas[0].filename.endswith(".yaml")
        with store.open_reader(metas[0].artifact_id) as f:
            assert a["candidate_hash"] in f.read().decode()
        assert (Path(a["run_dir"]) / "train.log").is_file()
        assert not list(Path(a["run_dir"]).rglob("*.pt")), "weights are off by default"
    assert "Pareto front" in result.stdout
    assert f"optuna-dashboard sqlite:///{out / 'e2e' / 'study.db'} --artifact-dir" in result.stdout


def test_export_files_and_pareto_yamls_reload_in_a_fresh_process(e2e):
    out, _ = e2e
    study = load(out, "e2e")
    assert search_export.main(["--study", "e2e", "--out", str(out)]) == 0
    d = out / "e2e"
    yamls = sorted((d / "pareto").glob("*.yaml"))
    front = [t for t in study.best_trials if "reused_from" not in t.user_attrs]
    assert len(yamls) == len(front) >= 1
    with open(d / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["trial"]) for r in rows) == sorted(t.number for t in front)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["trials"]["COMPLETE"] == 3 and summary["base_trial"]["trial"] == 0
    assert summary["hypervolume"]["final"] >= 0 and (d / "hypervolume.csv").is_file()
    for png in ("pareto.png", "hypervolume.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head = yamls[0].read_text().splitlines()[:3]
    assert head[0].startswith("# attnas pareto trial:") and "mAP50-95" in head[1]
    # A user's fresh process: register the modules, build each front YAML with Ultralytics, run a forward.
    code = ("import sys, torch, modules; modules.register(); from ultralytics import YOLO\n"
            "for p in sys.argv[1:]:\n"
            "    m = YOLO(p).model.eval(); m(torch.zeros(1, 3, 64, 64))\n"
            "    print(sum(x.numel() for x in m.parameters()))\n")
    res = subprocess.run([sys.executable, "-c", code, *map(str, yamls)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "YOLO_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    by_hash = {t.user_attrs["candidate_hash"]: t for t in front}
    expected = [by_hash[p.stem.split("-")[-1]].user_attrs["n_params"] for p in yamls]
    assert [int(x) for x in res.stdout.split()] == expected


def test_other_settings_are_refused_naming_the_difference(e2e, coco128, capsys):
    out, _ = e2e
    before = len(load(out, "e2e").trials)
    argv = search_cmd(out, coco128, "--budget", "4", "--study-name", "e2e")[3:]
    argv[argv.index("--epochs") + 1] = "2"
    assert search_run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "proxy.epochs: study has 1, this run 2" in err
    assert len(load(out, "e2e").trials) == before, "nothing written to the study"


def test_resume_with_other_objectives_is_refused_naming_them(e2e, coco128, capsys):
    out, _ = e2e
    before = len(load(out, "e2e").trials)
    argv = ["--out", str(out), "--resume", "--study-name", "e2e", "--budget", "4",
            "--objectives", "mAP50-95,latency_ms,params"]
    assert search_run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert 'objectives: study has ["mAP50-95", "latency_ms"], this run ["mAP50-95", "latency_ms", "params"]' in err
    assert len(load(out, "e2e").trials) == before, "nothing written to the study"


def test_rerun_with_budget_met_changes_nothing(e2e, capsys):
    out, _ = e2e
    before = states(load(out, "e2e"))
    # --resume alone: the only study under --out, with every setting taken from it.
    assert search_run.main(["--out", str(out), "--resume", "--budget", "3"]) == 0
    assert "already holds 3 completed" in capsys.readouterr().err
    assert states(load(out, "e2e")) == before


def test_failing_trials_are_recorded_and_the_study_finishes(tmp_path, coco128):
    faults = ["--inject-fault", "die@1", "--inject-fault", "raise@2", "--inject-fault", "nan@3",
              "--inject-fault", "hang@4"]
    # Faults hit trials that train; a seeded random sampler over a space without the base (which TPE likes to
    # propose again, and dedup would then not train) makes the first trials distinct candidates.
    space = tmp_path / "no-base.yaml"
    space.write_text("min_layers: 1\n")
    res = run_search(search_cmd(tmp_path, coco128, "--budget", "3", "--study-name", "f", "--trial-timeout", "15",
                                "--sampler", "random", "--space", str(space), "--weights", "none", "--verbose",
                                *faults))
    assert res.returncode == 0, res.stderr[-3000:]
    trials = {t.number: t for t in load(tmp_path, "f").trials}
    assert trials[1].state == TrialState.COMPLETE, "a dead worker is retried once"
    assert trials[1].user_attrs["attempts"] == 2 and "retried_after" in trials[1].user_attrs
    expected = {2: ("exception", "injected fault in trial 2"), 3: ("diverged", "loss became nan"),
                4: ("timeout", "--trial-timeout 15")}
    for number, (kind, reason) in expected.items():
        t = trials[number]
        assert t.state == TrialState.FAIL and t.user_attrs["fail_kind"] == kind
        assert reason in t.user_attrs["fail_reason"]
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == 3
    assert "trial   2  FAIL  exception: RuntimeError: injected fault in trial 2" in res.stderr
