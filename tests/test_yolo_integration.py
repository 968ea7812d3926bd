"""Each attention layer inside real yolov8n / yolo11n models: build, forward, train on coco128, reload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modules
from layer_utils import fitting_hparams
from space import Placement, build_model, find_slots, load_base, make_candidate, write_yaml

REPO = Path(__file__).resolve().parents[1]
BASES = ("yolov8n.yaml", "yolo11n.yaml")


def with_module(base_name: str, module: str, slots=("P3", "P4", "P5")):
    base = load_base(base_name)
    return make_candidate(base, {s: Placement(s, module) for s in slots})


@pytest.fixture(scope="module")
def coco_batch(coco128):
    """Four real coco128 training images at 64 px, collated and normalised as the Ultralytics trainer does."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cfg = get_cfg(overrides={"imgsz": 64, "mosaic": 0.0, "plots": False})
    data = check_det_dataset(str(coco128 / "coco128.yaml"))
    dataset = build_yolo_dataset(cfg, data["train"], batch=4, data=data, mode="train", stride=32)
    batch = dataset.collate_fn([dataset[i] for i in range(4)])
    batch["img"] = batch["img"].float() / 255
    return cfg, batch


@pytest.mark.parametrize("base_name", BASES)
@pytest.mark.parametrize("module", modules.names())
def test_module_in_yolo_builds_runs_and_trains_a_step(base_name, module, coco_batch):
    cfg, batch = coco_batch
    torch.manual_seed(0)
    yolo = build_model(with_module(base_name, module))
    model = yolo.model
    assert sum(m.type.endswith(module) for m in model.model) == 3
    model.eval()
    with torch.no_grad():
        for shape in ((64, 64), (160, 160), (192, 320)):
            out = model(torch.zeros(1, 3, *shape))[0]
            assert torch.isfinite(out).all(), shape
            assert out.shape[-1] == sum((shape[0] // s) * (shape[1] // s) for s in (8, 16, 32))

    # One real optimisation step on real images, as the trainer does it.
    model.train()
    model.args = cfg
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _ = model.loss(batch)
    loss = loss.sum()
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    attention_params = [n for n, _ in model.named_parameters()
                        if model.model[int(n.split(".")[1])].type.endswith(module)]
    assert attention_params and set(attention_params) & set(changed), "the attention layers did not learn"


def test_trainer_run_and_checkpoint_reload_in_a_fresh_process(coco128, tmp_path):
    """The real Ultralytics trainer (unfreezing, EMA, AMP checks, validation) with every registered module in one
    model (one per slot, the P5 one replacing its block), then the checkpoint loads in another process that only
    calls modules.register()."""
    base = load_base("yolov8n.yaml")
    slots = ("P3", "P4", "P5", "N4", "N5", "N3", "P5_sppf")
    names = modules.names()
    assert len(names) <= len(slots), "more families than yolov8n has slots: split this test over two models"
    by_name = {s.name: s for s in find_slots(base)}
    cand = make_candidate(base, {
        slot: Placement(slot, name, "replace" if slot == "P5" else "insert",
                        fitting_hparams(modules.get_spec(name), by_name[slot].channels, by_name[slot].feature_hw(64)))
        for slot, name in zip(slots, names)
    })
    path = write_yaml(cand, tmp_path / "all.yaml")
    modules.register()
    from ultralytics import YOLO

    yolo = YOLO(str(path))
    # 9 images at batch 4 end every epoch with a batch of 1: CoT's SE BatchNorm must cope.
    results = yolo.train(data=str(coco128 / "coco128.yaml"), epochs=1, imgsz=64, batch=4, fraction=9 / 128,
                         workers=0, device="cpu", plots=False, val=True, project=str(tmp_path), name="run",
                         exist_ok=True, seed=0, deterministic=True, amp=False, verbose=False)
    assert results is not None and 0.0 <= results.box.map <= 1.0
    weights = tmp_path / "run" / "weights" / "last.pt"
    assert weights.is_file()
    code = (
        "import modules, torch; modules.register(); from ultralytics import YOLO; "
        f"m = YOLO({str(weights)!r}); names = [type(l).__name__ for l in m.model.model]; "
        "print(','.join(n for n in names if n in modules.names())); "
        "r = m.predict(torch.zeros(1, 3, 64, 64), verbose=False); print(len(r))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "YOLO_OFFLINE": "1", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    in_model_order = [row[2] for row in cand.yaml["backbone"] + cand.yaml["head"] if row[2] in names]
    assert lines[-2] == ",".join(in_model_order) and lines[-1] == "1"


@pytest.mark.parametrize("module", modules.names())
def test_onnx_export_of_a_yolo_model(module, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = build_model(with_module("yolov8n.yaml", module, slots=("N4",))).model.eval()
    x = torch.rand(1, 3, 128, 128)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["images"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": x.numpy()})[:1]
    with torch.no_grad():
        ref = model(x)[0].numpy()
    assert out.shape == ref.shape
    assert abs(out - ref).max() <= 1e-3 * max(1.0, abs(ref).max())
