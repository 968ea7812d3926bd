"""A full disk at each write of a search (issue 22): the search stops with one line saying what was being written
and what to do, cuts nothing short for good (the candidate whose files could not be written runs again), and the
same study, once there is room, finishes its budget with every earlier result kept.

The disk is a real small tmpfs (tests/conftest.py ``small_disk``) holding the study's files; the database lives
elsewhere (a full disk under it: tests/test_study_storage.py). The driver runs real trainings in this process.
"""

import optuna
import pytest
from optuna.trial import TrialState

from search import session
from search.engine.inflight import DiskFull
from search.prepare import Prepared
from search.storage import study as st
from search.training.weights import base_training_job
from space import SpaceConfig, build_space, load_base
from test_dashboard_states import ActingPool
from test_driver import SCHEDULE, TABLE, make_driver, new_study, rung_driver, storage_of


pytestmark = pytest.mark.slow  # real trainings, in this process

@pytest.fixture(scope="module")
def two_places():
    return build_space(load_base("yolov8n.yaml"), SpaceConfig(slots=("N4", "N5"), modules={"CGA": {}},
                                                              modes=("insert",), min_layers=1, max_layers=1))


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


def resume(tmp_path, disk, space, coco128, budget: int, **config):
    """The study reloaded, as a new run finds it, driven on to ``budget``."""
    study = optuna.load_study(study_name="d", storage=storage_of(tmp_path))
    driver = rung_driver(study, space, disk.path, coco128, budget, storage=storage_of(tmp_path), **config)
    driver.run()
    return study, driver


@pytest.mark.disk_mb(200)  # room for two candidates' rung checkpoints once it is freed
def test_a_rung_checkpoint_that_does_not_fit_stops_the_search_and_its_candidate_trains_again(
        tmp_path, coco128, small_disk, two_places):
    study = new_study(tmp_path, enqueue_base=False)
    # 1 MB left: the training's small files fit, its rung checkpoint (~30 MB) does not.
    pool = ActingPool(("train", 0), lambda: small_disk.fill(leave=1_000_000))
    driver = rung_driver(study, two_places, small_disk.path, coco128, budget=2, pool=pool,
                         storage=storage_of(tmp_path))
    with pytest.raises(DiskFull) as stop:
        driver.run()
    assert one_line(stop.value).startswith(f"trial 0's training stopped: no space left on the device of "
                                           f"{small_disk.path / 'trials' / '0'} while writing a training's files")
    assert str(stop.value).endswith("; free space there")
    first = study.trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs["fail_kind"] == "driver-stopped"
    again = [t for t in study.trials if t.user_attrs.get("requeued_from") == 0]
    assert len(again) == 1 and again[0].state == TrialState.WAITING
    assert again[0].system_attrs["fixed_params"] == first.params, "queued again with its parameters"

    small_disk.free()
    study, second = resume(tmp_path, small_disk, two_places, coco128, budget=2)
    assert again[0].number in {t.number for t in st.counted_trials(study)}, "the cut-short candidate ran again"
    assert len(st.counted_trials(study)) == 2


@pytest.mark.disk_mb(200)
def test_a_trial_directory_that_cannot_be_written_stops_the_search_before_any_training(
        tmp_path, coco128, small_disk, two_places):
    study = new_study(tmp_path, enqueue_base=False)
    small_disk.fill()
    driver = rung_driver(study, two_places, small_disk.path, coco128, budget=2, storage=storage_of(tmp_path))
    with pytest.raises(DiskFull) as stop:
        driver.run()
    yaml_dir = small_disk.path / "trials" / "0"
    assert one_line(stop.value).startswith(f"no space left on the device of {yaml_dir} while writing candidate-")
    assert driver.pool.log == [], "nothing was timed or trained"
    assert [t.user_attrs.get("requeued_from") for t in study.trials] == [None, 0], "the proposal is kept"

    small_disk.free()
    study, _ = resume(tmp_path, small_disk, two_places, coco128, budget=2)
    assert len(st.counted_trials(study)) == 2


@pytest.mark.disk_mb(160)
def test_base_weights_that_do_not_fit_stop_the_search_and_the_base_trains_again(tmp_path, coco128, small_disk):
    base_only = build_space(load_base("yolov8n.yaml"), SpaceConfig(max_layers=0))
    study = new_study(tmp_path)
    from search.training.weights import WeightsPlan

    job = base_training_job(WeightsPlan(mode="auto", base_epochs=1), base_only.base, str(coco128 / "coco128.yaml"),
                            SCHEDULE, small_disk.path, threads=1)
    pool = ActingPool(("base", "base"), small_disk.fill, after=True)  # trained; then the disk is full
    driver = make_driver(study, base_only, small_disk.path, coco128, budget=1, pool=pool, base_job=job,
                         storage=storage_of(tmp_path))
    with pytest.raises(DiskFull) as stop:
        driver.run()
    assert one_line(stop.value) == (f"no space left on the device of {small_disk.path} while writing "
                                    "base-weights.pt; free space there")
    assert not list(small_disk.path.glob("*base-weights*")), "no half-written weights are left to be taken as whole"
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[-1].user_attrs == {"requeued_from": 0, "role": "base"}, \
        "the base trial, timed while the base trained, is queued again, as the base"

    small_disk.free()
    again = make_driver(optuna.load_study(study_name="d", storage=storage_of(tmp_path)), base_only, small_disk.path,
                        coco128, budget=1, base_job=job, storage=storage_of(tmp_path))
    again.run()
    assert ("base", "base") in again.pool.log and (small_disk.path / "base-weights.pt").is_file()
    (counted,) = st.counted_trials(again.study)
    assert counted.params == {"placement": "none"} and counted.user_attrs["inherited_tensors"] > 300


def test_an_export_that_does_not_fit_is_one_line_and_exports_whole_when_there_is_room(
        tmp_path, coco128, small_disk, capsys):
    base_only = build_space(load_base("yolov8n.yaml"), SpaceConfig(max_layers=0))
    study = new_study(tmp_path)
    driver = make_driver(study, base_only, tmp_path, coco128, budget=1)
    driver.run()
    study.set_user_attr(st.SETTINGS_ATTR, driver.settings.study.as_dict())
    prep = Prepared(driver.settings, base_only, None, TABLE)
    study_dir = small_disk.path / "d"
    study_dir.mkdir()
    small_disk.fill()
    capsys.readouterr()
    assert session._finish(study, storage_of(tmp_path), prep, 1.0, study_dir) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"error: no space left on the device of {study_dir} while exporting the front; free space there; "
                    f"then export it with: python -m search.export --study d --out {small_disk.path} "
                    f"--storage sqlite:///study.db")
    small_disk.free()
    assert session._finish(study, storage_of(tmp_path), prep, 1.0, study_dir) == 0
    assert (study_dir / "summary.json").is_file() and len(list((study_dir / "pareto").glob("*.yaml"))) == 1
