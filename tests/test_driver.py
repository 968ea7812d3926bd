"""The driver's bookkeeping without Ray: real candidates, real latency and real (tiny) trainings, run one at a time
in this process by search.engine.work.InProcessPool, on a real SQLite study."""

import csv
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search import objectives as obj
from search.storage import study as st
from search.front import pareto
from search.engine.driver import Driver, SearchAborted
from search.engine.jobs import TrainJobs
from search.latency import LatencySettings
from search.training.proxy import ProxySchedule
from search.front.ranks import pareto_ranks
from search.progress import EpochPlan, Progress
from search.settings import Constraints, Fidelity, RunSettings, Settings, StudySettings
from search.training.weights import BaseSource, WeightsPlan, base_training_job
from search.engine.work import InProcessPool
from space import SpaceConfig, build_space, load_base

SCHEDULE = ProxySchedule(epochs=1, imgsz=64, batch=4, fraction=(8, 8), train_args=(("warmup_epochs", 0),))
LATENCY = LatencySettings(imgsz=64, warmup=0, runs=2, threads=1, ci=0)  # ci 0: every window accepted, no retries
TABLE = obj.parse("mAP50-95,latency_ms,params")


@pytest.fixture(scope="module")
def base_only():
    return build_space(load_base("yolov8n.yaml"), SpaceConfig(max_layers=0))


@pytest.fixture(scope="module")
def one_layer():
    return build_space(load_base("yolov8n.yaml"), SpaceConfig(slots=("N5",), modules={"CGA": {}}, modes=("insert",),
                                                              min_layers=1, max_layers=1))


def storage_of(tmp_path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")


def new_study(tmp_path, enqueue_base: bool = True, storage=None) -> optuna.Study:
    study = optuna.create_study(storage=storage or f"sqlite:///{tmp_path / 'study.db'}", study_name="d",
                                directions=obj.directions(TABLE), sampler=optuna.samplers.RandomSampler(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(obj.names(TABLE))
    if enqueue_base:
        study.enqueue_trial({"placement": "none"}, user_attrs={"role": "base"})
    return study


def make_driver(study, space, tmp_path, coco128, budget: int, pool=None, storage=None, schedule=SCHEDULE, rungs=None,
                eta: int = 3, constraints=Constraints(), faults=None, max_failures_in_a_row: int = 5, base_job=None,
                **driver_kw) -> Driver:
    """A driver over ``study`` with the settings a run would give it (one worker, the test's tiny schedule)."""
    pool = pool or InProcessPool(LATENCY, workers=1)
    fidelity = Fidelity(rungs=rungs or (schedule.epochs,), eta=eta)
    settings = Settings(StudySettings(objectives=obj.names(TABLE), proxy=schedule, fidelity=fidelity, latency=LATENCY,
                                      constraints=constraints),
                        RunSettings(budget=budget, workers=1, faults=tuple((faults or {}).items()),
                                    max_failures_in_a_row=max_failures_in_a_row),
                        study.study_name, "sqlite:///study.db", tmp_path)
    jobs = TrainJobs(settings, str(coco128 / "coco128.yaml"), tmp_path, threads=1)
    plan = EpochPlan(fidelity.rungs, eta, budget, confirm_seeds=0, workers=1)
    return Driver(study, space, pool, settings, jobs, BaseSource(job=base_job), Progress(study, TABLE, plan),
                  storage or storage_of(tmp_path), **driver_kw)


def drive(study, space, tmp_path, coco128, budget: int, **config) -> InProcessPool:
    driver = make_driver(study, space, tmp_path, coco128, budget, **config)
    driver.run()
    return driver.pool


def test_base_trains_before_any_candidate_and_the_same_network_trains_once(tmp_path, coco128, base_only):
    study = new_study(tmp_path)
    plan = WeightsPlan("auto", None, 1, (("warmup_epochs", 0),))
    job = base_training_job(plan, base_only.base, str(coco128 / "coco128.yaml"), SCHEDULE, tmp_path, threads=1)
    pool = drive(study, base_only, tmp_path, coco128, budget=2, base_job=job, lookahead=1)
    kinds = [kind for kind, _ in pool.log]
    assert kinds.index("base") < kinds.index("train"), pool.log
    assert kinds.count("train") == 1, "the second trial is the same network: it reuses the first one's result"
    t0, t1 = study.get_trials()
    assert t0.state == t1.state == TrialState.COMPLETE and t1.user_attrs["reused_from"] == 0
    assert t1.values == t0.values and t0.values[2] == 3_157_200
    assert t0.user_attrs["inherited_tensors"] > 300, "the candidate inherited the base the pool trained first"
    assert (tmp_path / "base-weights.pt").is_file()


def test_failures_are_recorded_and_too_many_in_a_row_stop_the_search(tmp_path, coco128, one_layer):
    study = new_study(tmp_path, enqueue_base=False)
    with pytest.raises(SearchAborted, match="2 trials in a row failed; last: exception: RuntimeError"):
        drive(study, one_layer, tmp_path, coco128, budget=3, faults={0: "raise", 1: "raise"},
              max_failures_in_a_row=2, lookahead=0)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [0, 1]
    assert all(t.user_attrs["fail_kind"] == "exception" for t in failed)
    assert "injected fault in trial 0" in failed[0].user_attrs["fail_reason"]


def test_infeasible_candidates_are_told_untrained_with_floor_values(tmp_path, coco128, one_layer):
    study = new_study(tmp_path, enqueue_base=False)
    with pytest.raises(SearchAborted, match="2 infeasible candidates in a row"):  # infeasible ones do not count
        drive(study, one_layer, tmp_path, coco128, budget=1, constraints=Constraints(max_params=1_000_000),
              max_pruned_in_a_row=2)
    assert not (tmp_path / "trials" / "0" / "train.log").exists(), "nothing infeasible is trained"
    infeasible = study.get_trials(states=(TrialState.COMPLETE,))
    assert infeasible and all("params" in t.user_attrs["infeasible"] for t in infeasible)
    assert all(t.values[0] == 0.0 and t.values[2] > 1_000_000 for t in infeasible)
    assert pareto.pareto_trials(study, TABLE) == [], "infeasible trials never enter the front"


def test_resume_requeues_what_a_stopped_driver_left_running_and_reuses_what_finished(tmp_path, coco128, base_only):
    study = new_study(tmp_path)
    drive(study, base_only, tmp_path, coco128, budget=1)
    left_running = study.ask()  # a driver killed while this trial trained
    left_running.suggest_categorical("placement", base_only.placements)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    resumed = optuna.load_study(study_name="d", storage=storage)
    assert st.recover_stale_trials(resumed, storage) == [(1, {"placement": "none"})]
    pool = drive(resumed, base_only, tmp_path, coco128, budget=2)
    assert [k for k, _ in pool.log] == [], "the requeued trial is the same network as trial 0: reused, not rerun"
    states = {t.number: t.state for t in resumed.get_trials()}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.FAIL, 2: TrialState.COMPLETE}
    assert resumed.trials[1].user_attrs["fail_kind"] == "driver-stopped"
    assert resumed.trials[2].user_attrs["requeued_from"] == 1 and resumed.trials[2].user_attrs["reused_from"] == 0


# -- successive halving, confirmation ---------------------------------------------------------------------------
RUNGS = (1, 2)


@pytest.fixture(scope="module")
def two_slots():
    """CGA at N5 only, always placed (no base in the space): promotions are decided by the ladder alone."""
    return build_space(load_base("yolov8n.yaml"), SpaceConfig(slots=("N5",), modules={"CGA": {}}, modes=("insert",),
                                                               min_layers=1, max_layers=1))


def rung_driver(study, space, tmp_path, coco128, budget: int, pool=None, storage=None, **config) -> Driver:
    return make_driver(study, space, tmp_path, coco128, budget, pool=pool, storage=storage,
                       schedule=replace(SCHEDULE, epochs=RUNGS[-1]), rungs=RUNGS, eta=2, lookahead=0, **config)


def test_rungs_promote_by_pareto_rank_continue_from_checkpoints_and_fronts_stay_at_the_top_rung(
        tmp_path, coco128, two_slots):
    study = new_study(tmp_path, enqueue_base=False)
    driver = rung_driver(study, two_slots, tmp_path, coco128, budget=4)
    driver.run()
    trials = [t for t in study.get_trials() if "reused_from" not in t.user_attrs]
    counted = st.counted_trials(study)
    assert len(counted) == 4, "the budget counts candidates, whichever rung they stopped at"
    top = [t for t in trials if t.state == TrialState.COMPLETE]
    stopped = [t for t in trials if t.state == TrialState.PRUNED and st.RUNG_RESULTS in t.user_attrs]
    # 4 results at rung 0, eta 2: the best 2 are promoted; asynchronous like ASHA, a candidate promoted when the rung
    # held 2 results stays promoted, so a third may go on when two later results outrank it.
    assert len(top) in (2, 3) and len(top) + len(stopped) == 4, (len(top), len(stopped))
    for t in top:
        assert sorted(st.rung_results(t)) == [1, 2] and t.values == st.rung_results(t)[2]
        split = t.user_attrs["rung_train_s"]
        assert sorted(split) == ["1", "2"] and t.user_attrs["train_s"] == pytest.approx(sum(split.values()), abs=0.02), \
            "a candidate's training time is its total over the rungs"
    for t in stopped:
        assert sorted(st.rung_results(t)) == [1] and t.user_attrs["stopped_at_rung"] == 1
        assert not Path(t.user_attrs["rung_checkpoint"]).exists(), "a stopped candidate's checkpoint is deleted"
    assert {t.number for t in study.best_trials} <= {t.number for t in top}, "fronts compare top-rung results only"
    for t in top:  # each promotion continued from the rung checkpoint, on the top rung's schedule
        rung0, rung1 = driver.pool.jobs[t.number]
        assert rung0.stop_at == 1 and rung0.resume is None and rung1.stop_at == 2 and rung1.resume
        assert rung0.schedule.epochs == rung1.schedule.epochs == 2
    # The first promotion happened when rung 0 held two results: the better of the two by Pareto rank went on.
    first_two = sorted(t.number for t in counted)[:2]
    pair = np.array([[-v[0], v[1], v[2]] for v in (st.rung_results(study.trials[n])[1] for n in first_two)])
    ranks = pareto_ranks(pair)
    if ranks[0] != ranks[1]:
        assert first_two[int(np.argmin(ranks))] in {t.number for t in top}


def test_a_killed_driver_between_rungs_is_resumed_without_retraining(tmp_path, coco128, two_slots):
    study = new_study(tmp_path, enqueue_base=False)
    first = rung_driver(study, two_slots, tmp_path, coco128, budget=4)
    while not first.rungs.paused:  # run until a candidate waits between rungs ...
        first._step()
    waiting = {n: st.rung_results(study.trials[n]) for n in first.rungs.paused}
    # ... then the process dies (kill -9): nothing is cleaned up, the storage holds RUNNING trials.
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    resumed = optuna.load_study(study_name="d", storage=storage)
    requeued = dict(st.recover_stale_trials(resumed, storage))
    assert not set(waiting) & set(requeued), "candidates between rungs are adopted, not re-queued"
    second = rung_driver(resumed, two_slots, tmp_path, coco128, budget=4)
    assert set(second.rungs.paused) | {n for n, r in second.running.items() if r.rung > 0} >= set(waiting)
    second.run()
    for n, results in waiting.items():
        t = resumed.trials[n]
        assert st.rung_results(t)[1] == results[1], "rung 0 was not trained again"
        assert all(job.resume for job in second.pool.jobs.get(n, [])), "only a continuation, from its checkpoint"
    assert len(st.counted_trials(resumed)) == 4


def test_confirmation_retrains_the_front_and_the_base_with_more_seeds(tmp_path, coco128, base_only):
    from search.front import confirm

    study = new_study(tmp_path)
    driver = rung_driver(study, base_only, tmp_path, coco128, budget=1)
    driver.run()
    driver.confirm(seeds=2)
    record = study.user_attrs[st.CONFIRM_ATTR]
    assert list(record) == ["0"] and record["0"]["offsets"] == [1, 2] and len(record["0"]["values"]) == 2
    assert len(record["0"]["train_s"]) == 2 and all(s > 0 for s in record["0"]["train_s"]), "its compute is kept"
    seeds = {job.schedule.seed for job in driver.pool.jobs[("confirm", 0, 1)] + driver.pool.jobs[("confirm", 0, 2)]}
    assert seeds == {1, 2}
    (row,) = confirm.confirmed(study, TABLE)
    runs = [study.trials[0].values[0], *(v[0] for v in record["0"]["values"])]
    assert row.n == (3, 1, 1) and row.mean[0] == pytest.approx(np.mean(runs))
    assert row.sd[0] == pytest.approx(np.std(runs, ddof=1)) and row.above_base is None
    assert confirm.todo(study, TABLE, 2) == [], "a resumed run trains nothing more"
    # The exported front is the confirmed one, with each objective's seed mean, sd and n.
    from search.front.export import export_study
    from search.settings import StudySettings

    study.set_user_attr(st.SETTINGS_ATTR, StudySettings(space=SpaceConfig(max_layers=0)).as_dict())
    export_study(study, tmp_path / "export", storage_of(tmp_path))
    with open(tmp_path / "export" / "pareto.csv") as f:
        (csv_row,) = list(csv.DictReader(f))
    assert float(csv_row["mAP50-95_mean"]) == pytest.approx(row.mean[0]) and csv_row["mAP50-95_n"] == "3"
    assert float(csv_row["mAP50-95_sd"]) == pytest.approx(row.sd[0]) and csv_row["latency_ms_n"] == "1"
    assert csv_row["above_base_2se"] == "", "the base is not compared with itself"


def test_a_contended_latency_stays_off_the_front_until_a_re_measure_at_the_end_passes(tmp_path, coco128, one_layer):
    from space import make_candidate

    study = new_study(tmp_path, enqueue_base=False)
    # An interval target no window can meet: every latency is recorded contended after its one window.
    strict = replace(LATENCY, runs=3, min_runs=3, ci=1e-12, tries=1)
    pool = InProcessPool(strict, workers=1, reference=make_candidate(one_layer.base))
    driver = make_driver(study, one_layer, tmp_path, coco128, budget=2, pool=pool)
    driver.run()
    done = st.completed_trials(study)
    timed = [t for t in done if "reused_from" not in t.user_attrs]  # a copy of the same candidate is not timed
    assert len(done) == 2 and all(t.user_attrs["latency_contended"] for t in done)
    assert all((Path(t.user_attrs["run_dir"]) / "latency-windows.json").is_file() for t in timed), "raw runs kept"
    assert pareto.pareto_trials(study, TABLE) == [], "no trial with an untrusted latency is on the front"
    driver.remeasure_contended()  # still impossible: recorded as failed, still off the front
    again = study.user_attrs[st.REMEASURED_ATTR]
    assert sorted(again) == sorted(str(t.number) for t in timed) and not any(e["accepted"] for e in again.values())
    assert pareto.pareto_trials(study, TABLE) == []
    study.set_user_attr(st.REMEASURED_ATTR, {})
    pool._latency = replace(strict, ci=0)  # a quiet machine: every window passes
    driver.remeasure_contended()
    again = study.user_attrs[st.REMEASURED_ATTR]
    assert all(e["accepted"] for e in again.values())
    front = pareto.pareto_trials(study, TABLE)
    assert front, "re-measured trials return to the front"
    for t in front:
        assert t.values[1] == pytest.approx(again[str(t.number)]["latency_ms"]), "with the re-measured latency"
        assert study.trials[t.number].values[1] != t.values[1] or again[str(t.number)]["ratio"] == \
            study.trials[t.number].user_attrs["latency_ratio"]
    from search.front.export import latency_summary

    summary = latency_summary(study)
    assert summary["contended_trials"] == [t.number for t in timed] and summary["contended_off_the_front"] == []
    assert summary["windows"] == len(timed) and summary["windows_rejected"]["interval too wide"] == len(timed)


def test_the_front_reads_re_measured_latencies_and_leaves_out_untrusted_ones():
    study = optuna.create_study(directions=obj.directions(TABLE[:2]))
    two = TABLE[:2]

    def add(values, **attrs):
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs=attrs))

    add([0.30, 50.0])
    add([0.35, 40.0], latency_contended=True)  # recorded faster than it is
    add([0.32, 60.0])
    assert [t.number for t in pareto.pareto_trials(study, two)] == [0, 2]
    study.set_user_attr(st.REMEASURED_ATTR, {"1": {"accepted": True, "latency_ms": 70.0}})
    front = pareto.pareto_trials(study, two)
    assert [(t.number, t.values[1]) for t in front] == [(0, 50.0), (2, 60.0), (1, 70.0)]
    assert study.trials[1].values == [0.35, 40.0], "the study's own record is untouched"
    study.set_user_attr(st.REMEASURED_ATTR, {"1": {"accepted": False, "latency_ms": None}})
    assert [t.number for t in pareto.pareto_trials(study, two)] == [0, 2]


def test_the_comparison_with_the_base_is_paired_by_seed():
    """A seed that moves the base and a candidate alike (the same batches) cancels in their difference: with
    differences 0.010, 0.012, 0.011 the candidate is above the base, though the two samples' spreads overlap."""
    from optuna.distributions import CategoricalDistribution

    from search import objectives as obj
    from search.front import confirm

    objectives = obj.parse("mAP50-95,latency_ms")
    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"placement": CategoricalDistribution(["none", "N3"])}
    for number, (placement, m, latency) in enumerate((("none", 0.30, 10.0), ("N3", 0.31, 11.0))):
        study.add_trial(optuna.trial.create_trial(params={"placement": placement}, distributions=dist,
                                                  values=[m, latency]))
    base_runs, cand_runs = [0.30, 0.35, 0.27], [0.31, 0.362, 0.281]
    for number, runs in ((0, base_runs), (1, cand_runs)):
        for offset, value in enumerate(runs[1:], start=1):
            confirm.record(study, number, offset, [value, 0.0])
    rows = {c.trial.number: c for c in confirm.confirmed(study, objectives)}
    diffs = np.subtract(cand_runs, base_runs)
    mean, sd, n = rows[1].vs_base
    assert (mean, sd, n) == (pytest.approx(diffs.mean()), pytest.approx(np.std(diffs, ddof=1)), 3)
    assert rows[1].above_base, "paired: 0.011 > 2 x 0.00058"
    unpaired_se = np.sqrt(np.var(cand_runs, ddof=1) / 3 + np.var(base_runs, ddof=1) / 3)
    assert diffs.mean() < 2 * unpaired_se, "the unpaired test could not tell them apart"
    assert rows[0].vs_base is None and rows[0].above_base is None
    # A seed the base failed is left out of the pairs; the seeds both trained stay paired.
    confirm.record(study, 0, 3, None, error="diverged")
    confirm.record(study, 1, 3, [0.5, 0.0])
    assert confirm.confirmed(study, objectives)[1].vs_base[2] == 3
    report = confirm.fidelity_report(study, objectives, (1,))
    assert report["paired_sd"] == pytest.approx(np.std(diffs, ddof=1))


def test_above_the_base_uses_the_paired_sd_pooled_over_the_candidates():
    """Two seeds give a candidate's own sd one degree of freedom: a small difference with a tiny own sd is not
    'above the base' when the other candidates' differences show the seed noise is larger."""
    from optuna.distributions import CategoricalDistribution

    from search import objectives as obj
    from search.front import confirm

    objectives = obj.parse("mAP50-95,latency_ms")
    study = optuna.create_study(directions=["maximize", "minimize"])
    names = ["none", "A", "B", "C"]
    dist = {"placement": CategoricalDistribution(names)}
    runs = {"none": [0.370, 0.368], "A": [0.3708, 0.3686], "B": [0.372, 0.362], "C": [0.365, 0.371]}
    for number, name in enumerate(names):  # latency rises with the number: every one is on the front
        study.add_trial(optuna.trial.create_trial(params={"placement": name}, distributions=dist,
                                                  values=[runs[name][0], 10.0 + number]))
        confirm.record(study, number, 1, [runs[name][1], 0.0])
    rows = {c.trial.number: c for c in confirm.confirmed(study, objectives)}
    diffs = {name: np.subtract(runs[name], runs["none"]) for name in names[1:]}
    own_se = np.std(diffs["A"], ddof=1) / np.sqrt(2)
    assert diffs["A"].mean() > 2 * own_se, "on its own sd, A (+0.0007) would be above the base"
    pooled_sd = np.sqrt(np.mean([np.var(d, ddof=1) for d in diffs.values()]))  # one degree of freedom each
    assert not rows[1].above_base and diffs["A"].mean() < 2 * pooled_sd / np.sqrt(2)
    assert confirm.fidelity_report(study, objectives, (1,))["paired_sd"] == pytest.approx(pooled_sd)
