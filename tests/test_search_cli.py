"""Bad input to ``python -m search.run``: one line on stderr, exit status 2, nothing written to any study."""

import importlib.util

import pytest
import torch

from search import run as search_run


def _cases(tmp, coco):
    data = ["--data", str(coco / "coco128.yaml")]
    broken = tmp / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    empty = tmp / "empty"
    for split in ("train", "val"):
        (empty / "images" / split).mkdir(parents=True)
    (empty / "data.yaml").write_text("train: images/train\nval: images/val\nnames: {0: thing}\n")
    cases = {
        "budget 0": (["--budget", "0", *data], "--budget must be at least 1"),
        "missing data": (["--data", str(tmp / "nope.yaml")], "does not exist"),
        "malformed data": (["--data", str(broken)], "not valid YAML"),
        "empty dataset": (["--data", str(empty / "data.yaml")], "(empty dataset)"),
        "unknown base": (["--base", "yolov99z.yaml", *data], "unknown base"),
        "bad storage URL": (["--storage", "foo://nowhere/db", *data], "bad storage"),
        "journal in a missing dir": (["--storage", str(tmp / "no" / "dir" / "j.log"), *data], "does not exist"),
        "imgsz not /32": (["--imgsz", "100", *data], "multiple of 32"),
        "latency imgsz not /32": (["--latency-imgsz", "650", *data], "multiple of 32"),
        "unknown train arg": (["--train-arg", "nonsense=1", *data], "not an Ultralytics train argument"),
        "reserved train arg": (["--train-arg", "epochs=3", *data], "set by the search itself"),
        "batch 1": (["--batch", "1", *data], "at least 2"),
        "bad fraction": (["--fraction", "1.5", *data], "ratios must be in (0, 1]"),
        "resume of nothing": (["--resume", "--study-name", "ghost", *data], "no study 'ghost'"),
        "bad space file": (["--space", str(broken), *data], "not valid YAML"),
    }
    if importlib.util.find_spec("scipy") is None:
        cases["gp without scipy"] = (["--sampler", "gp", *data], "needs scipy")
    if not torch.cuda.is_available():
        cases["gpus without a GPU"] = (["--gpus-per-trial", "0.5", *data], "has no GPU")
    return cases


CASES = ["budget 0", "missing data", "malformed data", "empty dataset", "unknown base", "bad storage URL",
         "journal in a missing dir", "imgsz not /32", "latency imgsz not /32", "unknown train arg",
         "reserved train arg", "batch 1", "bad fraction", "resume of nothing", "bad space file", "gpus without a GPU",
         "gp without scipy"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, coco128, capsys):
    cases = _cases(tmp_path, coco128)
    if case not in cases:
        pytest.skip("not bad input on this machine (it has a GPU / scipy)")
    argv, message = cases[case]
    out = tmp_path / "out"
    assert search_run.main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not list(out.rglob("*.db")) and not list(out.rglob("trials")), "nothing may be written"


@pytest.fixture(scope="module")
def builtin_set(tmp_path_factory):
    """The default built-in set, generated once for this module (about 10 s a generation)."""
    from search.training import shapes

    return shapes.cached(shapes.DEFAULT, tmp_path_factory.mktemp("data")).parent


@pytest.fixture(autouse=True)
def _builtin_data_under_out(tmp_path, builtin_set):
    """Each test's ``--out tmp_path`` finds the built-in set already generated (as a second study under one
    ``--out`` would), instead of generating it again."""
    (tmp_path / ".data").mkdir()
    (tmp_path / ".data" / builtin_set.name).symlink_to(builtin_set, target_is_directory=True)


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        search_run.main(["--workers", "many"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'many'" in err


def test_no_arguments_means_the_builtin_dataset_and_default_schedule(tmp_path):
    prep = search_run.prepare(search_run.build_parser().parse_args(["--out", str(tmp_path)]))
    s = prep.settings
    assert s.study_name == "yolov8n-shapes-v3"
    assert s.storage_url == f"sqlite:///{tmp_path / 'yolov8n-shapes-v3' / 'study.db'}"
    assert prep.data.identity == "builtin:shapes-v3" and prep.data.yaml.is_file()
    assert s.study.proxy.imgsz == 128 and s.study.latency.imgsz == 640
    assert [o.name for o in prep.objectives] == ["mAP50-95", "latency_ms"]
    recorded = s.study.as_dict()
    assert recorded["objectives"] == ["mAP50-95", "latency_ms"]
    assert recorded["proxy"]["train_args"] == {"lr0": 0.001, "optimizer": "AdamW", "warmup_epochs": 3,
                                               "warmup_bias_lr": 0.0}
    assert recorded["weights"] == {"mode": "auto", "path": None, "sha256": None, "base_epochs": 40,
                                   "train_args": {"lr0": 0.003, "optimizer": "AdamW", "warmup_epochs": 3}}
    assert recorded["facts"]["data"]["identity"] == "builtin:shapes-v3"
    assert recorded["fidelity"] == {"rungs": [1, 3, 9], "eta": 3, "confirm_seeds": 1, "promotion": "capped"}
    assert s.study.proxy.epochs == 9, "every rung follows the top rung's schedule"
    assert not (tmp_path / "yolov8n-shapes-v3").exists(), "checking writes no study"
    named = search_run.prepare(search_run.build_parser().parse_args(["--out", str(tmp_path), "--data",
                                                                     "builtin:shapes-v2"]))
    assert named.settings.study_name == "yolov8n-shapes-v2" and named.data.nc == 3


@pytest.mark.parametrize("argv, message", [
    (["--rungs", "3,1"], "strictly increasing"),
    (["--rungs", "1,3", "--epochs", "3"], "give --rungs or --epochs, not both"),
    (["--eta", "1"], "--eta must be at least 2"),
    (["--confirm-seeds", "-1"], "--confirm-seeds must be >= 0"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--latency-backend", "tensorrt"], "--latency-backend tensorrt needs the tensorrt package"),
    (["--latency-half"], "--latency-half needs --latency-device cuda"),
    (["--latency-imgsz", "640,100"], "multiple of 32"),
    (["--latency-batch", "0"], "--latency-batch must be >= 1"),
    (["--fresh-lr-mult", "0"], "--fresh-lr-mult must be positive, got 0"),
    (["--fresh-init", "open"], "--fresh-init 'open': expected 'none' or a positive number"),
])
def test_bad_fidelity_and_latency_settings_are_one_line_exit_2(argv, message, tmp_path, capsys):
    assert search_run.main(["--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_candidates_fine_tune_when_they_inherit_and_train_like_the_base_from_scratch(tmp_path):
    def prepared(*argv: str):
        return search_run.prepare(search_run.build_parser().parse_args(["--out", str(tmp_path), *argv]))

    scratch = prepared("--weights", "none", "--epochs", "10").settings.study
    assert dict(scratch.proxy.train_args) == {"lr0": 0.003, "optimizer": "AdamW", "warmup_epochs": 3}
    tuned = prepared("--train-arg", "lr0=0.0005", "--base-train-arg", "lr0=0.004", "--base-epochs", "5").settings.study
    assert dict(tuned.proxy.train_args)["lr0"] == 0.0005
    assert dict(tuned.proxy.train_args)["warmup_bias_lr"] == 0.0, "--train-arg adds to the defaults"
    assert tuned.weights.train_args == (("lr0", 0.004), ("optimizer", "AdamW"), ("warmup_epochs", 3))
    assert tuned.weights.base_epochs == 5


def test_recorded_settings_round_trip_through_json(tmp_path):
    """The recorded identity is the settings object's serialised form: rebuilding it from the stored JSON gives
    the same settings, so a resumed study is checked against exactly what was recorded."""
    import json

    from search.settings import StudySettings

    space = tmp_path / "space.yaml"
    space.write_text("slots: [P4, N5]\nmodules:\n  CGA: {kernels: [[5, 5, 5, 5]]}\n  STA: {}\nmax_layers: 2\n")
    prep = search_run.prepare(search_run.build_parser().parse_args(
        ["--out", str(tmp_path), "--space", str(space), "--objectives", "mAP50,latency_ms,params",
         "--max-params", "4000000", "--fraction", "16,8"]))
    recorded = json.loads(json.dumps(prep.settings.study.as_dict()))
    again = StudySettings.from_dict(recorded)
    assert again == prep.settings.study and again.as_dict() == recorded
    assert again.space.modules["CGA"]["kernels"] == ((5, 5, 5, 5),)
    assert again.objectives == ("mAP50", "latency_ms", "params") and again.proxy.fraction == (16, 8)


@pytest.mark.parametrize("value, message", [
    ("mAP50-95", "choose 2-4 objectives, got 1"),
    ("mAP50-95,latency_ms,params,gflops,mAP50", "choose 2-4 objectives, got 5"),
    ("mAP50-95,speed", "unknown objective(s) speed"),
    ("latency_ms,latency_ms", "names an objective twice"),
    ("latency_ms,params", "needs no training"),
])
def test_bad_objectives_are_one_line_exit_2(value, message, tmp_path, capsys):
    assert search_run.main(["--out", str(tmp_path / "out"), "--objectives", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.db"))


def _stored_study(prep, recorded: dict):
    """The study ``prep`` names, made in its storage with ``recorded`` as its settings (as a first run leaves it)."""
    import optuna

    prep.settings.study_dir.mkdir(parents=True)
    study = optuna.create_study(study_name=prep.settings.study_name, storage=prep.settings.storage_url,
                                directions=["maximize", "minimize"])
    study.set_user_attr("attnas_settings", recorded)
    return study


def test_resume_on_another_latency_backend_or_processor_is_refused(tmp_path, capsys):
    """Latencies from another runtime, runtime version, processor or machine do not compare: part of the identity."""

    prep = search_run.prepare(search_run.build_parser().parse_args(["--out", str(tmp_path)]))
    recorded = prep.settings.study.as_dict()
    assert set(recorded["facts"]["latency"]) == {"backend_version", "device_model", "node"}
    study = _stored_study(prep, recorded)
    argv = ["--out", str(tmp_path), "--resume", "--latency-backend", "onnxruntime"]
    assert search_run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'latency.backend: study has "torch", this run "onnxruntime"' in err, err
    moved = {**recorded, "facts": {**recorded["facts"], "latency": {**recorded["facts"]["latency"],
                                                                    "device_model": "another CPU"}}}
    study.set_user_attr("attnas_settings", moved)
    assert search_run.main(["--out", str(tmp_path), "--resume"]) == 2
    assert 'facts.latency.device_model: study has "another CPU"' in capsys.readouterr().err
    elsewhere = {**recorded, "facts": {**recorded["facts"], "latency": {**recorded["facts"]["latency"],
                                                                        "node": "another-host"}}}
    study.set_user_attr("attnas_settings", elsewhere)  # timed on another machine (its latency node)
    assert search_run.main(["--out", str(tmp_path), "--resume"]) == 2
    assert 'facts.latency.node: study has "another-host"' in capsys.readouterr().err


def test_recipe_settings_are_recorded_and_a_resume_with_others_is_refused(tmp_path, capsys):
    """--fresh-lr-mult / --fresh-init are part of the study's identity; a study recorded before they existed reads
    as the papers' recipe (and keeps its fidelity key)."""

    from search.settings import StudySettings

    prep = search_run.prepare(search_run.build_parser().parse_args(
        ["--out", str(tmp_path), "--fresh-lr-mult", "10", "--fresh-init", "0.1"]))
    recorded = prep.settings.study.as_dict()
    assert (recorded["proxy"]["fresh_lr_mult"], recorded["proxy"]["fresh_init"]) == (10.0, 0.1)
    older = {**recorded, "proxy": {k: v for k, v in recorded["proxy"].items() if not k.startswith("fresh_")}}
    faithful = StudySettings.from_dict(older).proxy
    assert (faithful.fresh_lr_mult, faithful.fresh_init) == (1.0, None) and faithful.faithful
    assert faithful.key() == StudySettings.from_dict(older).proxy.key() != prep.settings.study.proxy.key()
    study = _stored_study(prep, recorded)
    assert search_run.main(["--out", str(tmp_path), "--resume", "--fresh-init", "none"]) == 2
    assert "proxy.fresh_init: study has 0.1, this run null" in capsys.readouterr().err
    study.set_user_attr("attnas_settings", older)
    resumed = search_run.prepare(search_run.build_parser().parse_args(["--out", str(tmp_path), "--resume"]))
    assert resumed.settings.study.proxy.faithful, "an older study resumes with the recipe it used"
    assert search_run.main(["--out", str(tmp_path), "--resume", "--fresh-lr-mult", "10"]) == 2
    assert "proxy.fresh_lr_mult: study has 1.0, this run 10.0" in capsys.readouterr().err


def test_the_promotion_rule_is_recorded_and_an_older_study_reads_as_asha(tmp_path, capsys):

    from search.settings import StudySettings

    prep = search_run.prepare(search_run.build_parser().parse_args(["--out", str(tmp_path), "--promotion", "capped"]))
    recorded = prep.settings.study.as_dict()
    assert recorded["fidelity"]["promotion"] == "capped"
    older = {**recorded, "fidelity": {k: v for k, v in recorded["fidelity"].items() if k != "promotion"}}
    assert StudySettings.from_dict(older).fidelity.promotion == "asha", "studies from before the flag used ASHA"
    _stored_study(prep, recorded)
    assert search_run.main(["--out", str(tmp_path), "--resume", "--promotion", "asha"]) == 2
    assert 'fidelity.promotion: study has "capped", this run "asha"' in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's own one-line refusal
        search_run.main(["--out", str(tmp_path), "--promotion", "halving"])
    assert stop.value.code == 2 and "invalid choice: 'halving'" in capsys.readouterr().err
