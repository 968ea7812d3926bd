"""The content-addressed cache of trained bases shared by the studies under one --out."""

from dataclasses import replace

import torch

import space
from search.training.proxy import ProxySchedule, TrainResult
from search.training.weights import STATE_FILE, BaseCache, WeightsPlan, base_cache_key, base_training_job, store_base_weights, \
    stored_base_weights

SCHEDULE = ProxySchedule(epochs=3, imgsz=64, batch=4, fraction=(8, 8))
PLAN = WeightsPlan("auto", None, 2, (("lr0", 0.003),))


def _job(tmp_path, base="yolov8n.yaml", plan=PLAN, schedule=SCHEDULE):
    return base_training_job(plan, space.load_base(base), "data.yaml", schedule, tmp_path / "study", threads=1)


def test_key_changes_with_the_base_the_data_and_the_base_schedule_only(tmp_path):
    key = base_cache_key(_job(tmp_path), "fp1")
    assert key == base_cache_key(_job(tmp_path / "elsewhere"), "fp1"), "where the study lives does not matter"
    assert key != base_cache_key(_job(tmp_path), "fp2")
    assert key != base_cache_key(_job(tmp_path, base="yolo11n.yaml"), "fp1")
    assert key != base_cache_key(_job(tmp_path, plan=replace(PLAN, base_epochs=3)), "fp1")
    assert key != base_cache_key(_job(tmp_path, plan=replace(PLAN, train_args=(("lr0", 0.001),))), "fp1")
    assert key != base_cache_key(_job(tmp_path, schedule=replace(SCHEDULE, seed=1)), "fp1")
    assert key == base_cache_key(_job(tmp_path, schedule=replace(SCHEDULE, epochs=9)), "fp1"), \
        "the candidates' proxy epochs are not the base's"


def test_a_second_study_gets_the_first_ones_base_and_a_miss_trains(tmp_path):
    cache = BaseCache(tmp_path / "out" / ".cache" / "base-weights")
    job = _job(tmp_path / "out")
    key = base_cache_key(job, "fp1")
    assert stored_base_weights(tmp_path / "out" / "second", cache, key) is None, "miss: nothing stored yet"
    # What the pool's base training leaves behind: Ultralytics' last.pt with an EMA.
    weights_dir = tmp_path / "out" / "study" / "base-training" / "weights"
    weights_dir.mkdir(parents=True)
    model = torch.nn.Conv2d(3, 4, 1)
    torch.save({"ema": model.half(), "model": None}, weights_dir / "last.pt")
    stored = store_base_weights(job, TrainResult(map50_95=0.5, map50=0.7, train_s=12.0), tmp_path / "out" / "study",
                                say=lambda text: None, cache=cache, key=key)
    assert stored.info["base_map50_95"] == 0.5
    hit = stored_base_weights(tmp_path / "out" / "second", cache, key)
    assert hit is not None and hit.info["source"] == "cache" and hit.info["base_map50_95"] == 0.5
    got = torch.load(tmp_path / "out" / "second" / STATE_FILE, weights_only=True)
    assert got["weight"].dtype == torch.float32 and torch.equal(got["weight"], model.float().weight.detach())
    assert stored_base_weights(tmp_path / "out" / "third", cache, "another-key") is None


def test_a_corrupt_cache_entry_is_detected_by_its_hash_removed_and_trained_again(tmp_path, capsys):
    """Issue 22: a truncated base in the cache (a crash, a full disk) is not inherited by the next study."""
    cache = BaseCache(tmp_path / "cache")
    good = tmp_path / "base.pt"
    torch.save({"weight": torch.arange(1000.0)}, good)
    cache.put("k", good, {"source": "auto"})
    state, info = cache.get("k")
    assert info["sha256"] and torch.equal(torch.load(state, weights_only=True)["weight"], torch.arange(1000.0))
    state.write_bytes(state.read_bytes()[:100])  # truncated
    assert cache.get("k") is None, "a mismatching entry is a miss"
    assert not state.exists() and not (tmp_path / "cache" / "k.json").exists(), "and is removed"
    assert "does not match its recorded hash" in capsys.readouterr().err
    assert stored_base_weights(tmp_path / "study", cache, "k") is None, "so the base is trained again"
    cache.put("k", good, {"source": "auto"})
    assert stored_base_weights(tmp_path / "study", cache, "k").info["source"] == "cache", "a sound entry is a hit"
