"""The search space: slots, renumbering, hashing, sampling, YAML round trips and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modules
from space import (
    NONE, Placement, SpaceConfig, build_model, build_space, canonical_hash, find_slots, load_base,
    make_candidate, validate, write_yaml,
)
from space import sample as sample_cli
from space import show as show_cli
from space.cli import run_cli
from space.graph import absolute_rows

REPO = Path(__file__).resolve().parents[1]

TINY = """\
nc: 2
scales:
  n: [1.0, 0.25, 1024]
  s: [1.0, 0.5, 1024]
backbone:
  - [-1, 1, Conv, [64, 3, 2]]    # 0 /2
  - [-1, 1, Conv, [128, 3, 2]]   # 1 /4
  - [-1, 1, Conv, [256, 3, 2]]   # 2 /8
  - [-1, 1, C2f, [256]]          # 3 /8  -> slot P3
  - [-1, 1, Conv, [512, 3, 2]]   # 4 /16
  - [-1, 1, C2f, [512]]          # 5 /16 -> slot P4
head:
  - [-1, 1, nn.Upsample, [None, 2, nearest]]  # 6
  - [[-1, 3], 1, Concat, [1]]                 # 7
  - [-1, 1, C2f, [256]]                       # 8 -> slot N3
  - [[8, 5], 1, Detect, [nc]]                 # 9
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.yaml"
    path.write_text(TINY)
    return load_base(path, scale="n")


def sta(slot: str, mode: str = "insert", **hp) -> Placement:
    return Placement(slot, "STA", mode, tuple(sorted(hp.items())))


def test_slots_come_from_the_graph(tiny):
    slots = {s.name: s for s in find_slots(tiny)}
    assert list(slots) == ["P3", "P4", "N3"]
    assert (slots["P3"].after, slots["P3"].channels, slots["P3"].stride) == (3, 64, 8)
    assert (slots["P4"].after, slots["P4"].channels, slots["P4"].stride) == (5, 128, 16)
    assert slots["P3"].replaceable and not slots["N3"].replaceable  # N3 reads a Concat of 64+128 channels


def test_insert_renumbers_relative_absolute_concat_and_detect(tiny):
    cand = make_candidate(tiny, {"P3": sta("P3", stoken_size=4)})
    rows = cand.yaml["backbone"] + cand.yaml["head"]
    assert [r[2] for r in rows] == ["Conv", "Conv", "Conv", "C2f", "STA", "Conv", "C2f",
                                    "nn.Upsample", "Concat", "C2f", "Detect"]
    assert rows[4][:2] == [-1, 1] and rows[4][3][:2] == [64, 4]  # scaled channels first, then stoken_size
    assert rows[8][0] == [-1, 4]  # Concat now reads the attention output instead of layer 3
    assert rows[10][0] == [9, 6]  # Detect: 8 -> 9, 5 -> 6
    assert len(cand.yaml["backbone"]) == 7  # a backbone insertion stays in the backbone


def test_insert_everywhere_and_replace(tiny):
    cand = make_candidate(tiny, {"N3": sta("N3"), "P4": sta("P4"), "P3": sta("P3", "replace")})
    rows = absolute_rows(cand.yaml)
    names = [r[2] for r in rows]
    assert names == ["Conv", "Conv", "Conv", "STA", "Conv", "C2f", "STA", "nn.Upsample", "Concat", "C2f", "STA", "Detect"]
    assert rows[3][0] == 2  # the replacing layer reads what the replaced C2f read
    assert rows[8][0] == [7, 3]
    assert rows[11][0] == [10, 6]


def test_candidate_computes_the_base_plus_new_layers(tiny):
    """Every non-attention layer keeps its parameter shapes; with zero-output attention the outputs are equal."""
    base_model = build_model(make_candidate(tiny)).model
    cand = make_candidate(tiny, {"P3": sta("P3"), "N3": sta("N3")})
    model = build_model(cand).model
    base_layers = [m for m in base_model.model]
    kept = [m for m in model.model if m.type.split(".")[-1] != "STA"]
    assert [m.type for m in kept] == [m.type for m in base_layers]
    for a, b in zip(kept, base_layers):
        assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    # Load the base weights layer by layer and make the attention layers exact identities: same outputs.
    for a, b in zip(kept, base_layers):
        a.load_state_dict(b.state_dict())
    for m in model.model:
        if m.type.split(".")[-1] == "STA":
            m.forward = lambda x: x
    x = torch.rand(1, 3, 64, 64)
    base_model.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], base_model(x)[0])


def test_no_placement_is_the_base(tiny):
    cand = make_candidate(tiny)
    assert cand.yaml["backbone"] == tiny.yaml["backbone"] and cand.yaml["head"] == tiny.yaml["head"]
    assert cand.hash == canonical_hash(tiny.yaml)
    assert cand.describe() == "base"


def test_hash_ignores_order_and_spelling(tiny):
    a = make_candidate(tiny, {"P3": sta("P3", stoken_size=4), "N3": sta("N3")})
    b = make_candidate(tiny, {"N3": sta("N3", mlp_ratio=4.0), "P3": sta("P3", stoken_size=4, n_iter=1)})
    c = make_candidate(tiny, {"P3": sta("P3", stoken_size=2), "N3": sta("N3")})
    assert a.hash == b.hash != c.hash
    # A YAML with defaults left out builds the same layers, so it hashes the same.
    short = {**a.yaml, "backbone": [r if r[2] != "STA" else [r[0], r[1], r[2], r[3][:2]] for r in a.yaml["backbone"]]}
    assert canonical_hash(short) == a.hash
    # Insert and replace build different networks.
    assert make_candidate(tiny, {"P3": sta("P3", "replace")}).hash != make_candidate(tiny, {"P3": sta("P3")}).hash


def test_hash_is_stable_across_processes(tiny, tmp_path):
    cand = make_candidate(tiny, {"P4": sta("P4", stoken_size=2)})
    path = write_yaml(cand, tmp_path / "c.yaml")
    code = f"import yaml; from space import canonical_hash; print(canonical_hash(yaml.safe_load(open({str(path)!r}))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin", "YOLO_OFFLINE": "1"})
    assert out.stdout.strip().splitlines()[-1] == cand.hash


@pytest.mark.parametrize("filename", ["trial-12.yaml", "yolov8n-looks-like-n.yaml"])
def test_exported_yaml_builds_at_its_scale_in_a_fresh_process(tmp_path, filename):
    base = load_base("yolov8s.yaml")
    cand = make_candidate(base, {"N4": Placement("N4", "CoT")})
    path = write_yaml(cand, tmp_path / filename)
    text = path.read_text()
    assert text.startswith("# attnas candidate: " + cand.hash) and "scale: s" in text
    expected = sum(p.numel() for p in build_model(cand).model.parameters())
    code = ("import modules; modules.register(); from ultralytics import YOLO; "
            f"m = YOLO({str(path)!r}); print(sum(p.numel() for p in m.model.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "YOLO_OFFLINE": "1", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) == expected
    assert 11e6 < expected < 12e6  # yolov8s (11.2 M) plus one CoT, not yolov8n or yolov8l


def test_scaled_channels_are_written(tmp_path):
    for name, expected in (("yolov8n.yaml", 64), ("yolov8s.yaml", 128), ("yolo11m.yaml", 256)):
        base = load_base(name)
        p3 = next(s for s in find_slots(base) if s.name == "N3")
        assert p3.channels == expected
        cand = make_candidate(base, {"N3": Placement("N3", "GMA")})
        row = next(r for r in cand.yaml["head"] if r[2] == "GMA")
        assert row[3][0] == expected


def test_validate_records_params_and_flops(tiny):
    stats = validate(make_candidate(tiny, {"N3": sta("N3")}), imgsz=64)
    base_stats = validate(make_candidate(tiny), imgsz=64)
    assert stats.params > base_stats.params > 0
    assert stats.gflops > base_stats.gflops > 0


def test_suggest_uses_readable_names_and_never_crashes(tiny):
    space = build_space(tiny)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        try:
            cand = space.suggest(trial)
        except optuna.TrialPruned:
            assert "invalid_reason" in trial.user_attrs
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        seen.add(cand.hash)
        for name in trial.params:
            assert name == "placement" or name.split(".")[0] in ("P3", "P4", "N3")
    assert len(seen) > 20


def test_space_size_counts_distinct_candidates(tiny):
    config = SpaceConfig.from_dict({
        "slots": ["P3", "N3"], "max_layers": 2,
        "modules": {"CoT": {"kernel_size": [3, 5], "expansion": [4]},
                    "STA": {"stoken_size": [4], "n_iter": [1], "num_heads": [1], "mlp_ratio": [2, 4]}},
    })
    space = build_space(tiny, config)
    assert space.placements == (NONE, "P3", "N3", "P3+N3")
    # P3: 2 modes x (2 CoT + 2 STA) = 8; N3: insert only x 4 = 4; total 1 + 8 + 4 + 32.
    assert space.size() == 45
    hashes = set()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(600):
        trial = study.ask()
        hashes.add(space.suggest(trial).hash)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert len(hashes) == 45


BASES = [("yolov8n.yaml", None), ("yolov8s.yaml", None), ("yolo11n.yaml", None), ("yolo11s.yaml", None)]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_idx=st.integers(0, len(BASES) - 1), seed=st.integers(0, 2**31 - 1))
def test_every_sampled_candidate_is_sound(base_idx, seed):
    base = load_base(*BASES[base_idx])
    space = build_space(base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    try:
        cand = space.suggest(trial)
    except optuna.TrialPruned:
        return
    rows = absolute_rows(cand.yaml)
    for i, (f, *_rest) in enumerate(rows):
        for src in f if isinstance(f, list) else [f]:
            assert (i == 0 and src == -1) or 0 <= src < i, f"layer {i} reads {src}"
    model = build_model(cand).model
    base_model = build_model(make_candidate(base)).model
    replaced = {p.slot for p in cand.placements if p.mode == "replace"}
    replaced_after = {s.after for s in find_slots(base) if s.name in replaced}
    expected = [m for m in base_model.model if m.i not in replaced_after]
    kept = [m for m in model.model if m.type.split(".")[-1] not in modules.names()]
    assert [[p.shape for p in m.parameters()] for m in kept] == [[p.shape for p in m.parameters()] for m in expected]
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.zeros(1, 3, 64, 64))[0]).all()


# --- bad input: one-line errors, exit status 2 -------------------------------------------------------------

def _cli(main, argv, capsys) -> tuple[int, str]:
    code = run_cli(main, argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("body, message", [
    ("backbone: [[-1, 1, Conv", "not valid YAML"),
    ("nc: 2\nbackbone:\n  - [-1, 1, Conv, [16, 3, 2]]\nhead:\n  - [-1, 1, Conv, [16, 3, 2]]\n", "no Detect head"),
    (TINY.replace("nc: 2", "nc: 2\nactivation: __import__('os').system('echo pwned')"), "activation"),
])
def test_bad_base_yaml(tmp_path, capsys, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    code, err = _cli(show_cli.main, ["--base", str(path)], capsys)
    assert code == 2 and message in err and "\n" not in err


def test_safe_activation_is_accepted(tmp_path):
    path = tmp_path / "relu.yaml"
    path.write_text(TINY.replace("nc: 2", "nc: 2\nactivation: nn.ReLU()"))
    assert load_base(path).yaml["activation"] == "nn.ReLU()"


@pytest.mark.parametrize("space_text, message", [
    ("modules: [STA, Nope]", "unknown attention module 'Nope'"),
    ("modules:\n  STA: {num_heads: [7]}", "STA.num_heads=7"),
    ("modules:\n  STA: {no_such: [1]}", "no hyper-parameter 'no_such'"),
    ("slots: [P3, P9]", "['P9'] do not exist"),
])
def test_bad_space_file(tiny, tmp_path, capsys, space_text, message):
    path = tmp_path / "space.yaml"
    path.write_text(space_text)
    code, err = _cli(show_cli.main, ["--base", tiny.name, "--space", str(path)], capsys)
    assert code == 2 and message in err and "\n" not in err


def test_n_larger_than_space(tiny, tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text("slots: [N3]\nmax_layers: 1\nmodules:\n  CoT: {kernel_size: [3], expansion: [4]}\n")
    code, err = _cli(sample_cli.main, ["--base", tiny.name, "--space", str(path), "--n", "3", "--out", str(tmp_path)], capsys)
    assert code == 2 and "larger than the space, which holds 2" in err


def test_unknown_base(capsys):
    code, err = _cli(show_cli.main, ["--base", "yolov99z.yaml"], capsys)
    assert code == 2 and "unknown base" in err


def test_sample_cli_writes_distinct_valid_yamls(tmp_path):
    out = subprocess.run([sys.executable, "-m", "space.sample", "--base", "yolov8n.yaml", "--n", "3", "--seed", "0",
                          "--out", str(tmp_path), "--imgsz", "64"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    files = sorted(tmp_path.glob("*.yaml"))
    assert len(files) == 3 and len({f.name.split("_")[1] for f in files}) == 3
    assert "GFLOPs" in out.stdout and "hash" in out.stdout


def test_show_cli_lists_slots(capsys):
    assert run_cli(show_cli.main, ["--base", "yolo11n.yaml"]) == 0
    out = capsys.readouterr().out
    for name in ("P3", "P4", "P5", "P5_sppf", "P5_c2psa", "N3", "N4", "N5"):
        assert f"\n{name} " in out
