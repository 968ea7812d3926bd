"""A study in an Optuna journal file (the storage for a shared NFS path): a driver stopped dead between rungs is
resumed from the file alone by a new storage object, as a new process would, and optuna-dashboard reads the file.
The real kill -9 of a search process is tested on PostgreSQL (tests/test_postgres.py) with the same driver."""

import optuna
import pytest
import requests
from optuna.storages.journal import JournalFileSymlinkLock

from search.storage import study as st
from test_dashboard import dashboard_server
from test_driver import new_study, rung_driver, two_slots  # noqa: F401 (two_slots: a fixture)

pytestmark = pytest.mark.slow


def test_a_journal_study_stopped_between_rungs_resumes_and_the_dashboard_reads_it(tmp_path, coco128, two_slots):
    url = str(tmp_path / "study.log")
    study = new_study(tmp_path, enqueue_base=False, storage=st.open_storage(url))
    first = rung_driver(study, two_slots, tmp_path, coco128, budget=3, storage=st.open_storage(url))
    while not first.rungs.paused:  # run until a candidate waits between rungs, then the driver is gone
        first._step()
    waiting = {n: st.rung_results(study.trials[n]) for n in first.rungs.paused}
    storage = st.open_storage(url)  # what a new process reads from the file
    resumed = optuna.load_study(study_name="d", storage=storage)
    assert not set(waiting) & dict(st.recover_stale_trials(resumed, storage)).keys()
    rung_driver(resumed, two_slots, tmp_path, coco128, budget=3, storage=storage).run()
    assert len(st.counted_trials(resumed)) == 3
    for n, results in waiting.items():
        assert st.rung_results(resumed.trials[n])[1] == results[1], "rung 0 was not trained again"
    with dashboard_server(st.dashboard_command(url, None)) as base:
        studies = requests.get(f"{base}/api/studies", timeout=10).json()["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == "d"]
        served = requests.get(f"{base}/api/studies/{summary['study_id']}", timeout=10).json()["trials"]
    assert [t["number"] for t in served] == [t.number for t in optuna.load_study(study_name="d",
                                                                                 storage=st.open_storage(url)).trials]


def test_journal_uses_the_lock_optuna_dashboard_uses(tmp_path):
    storage = st.open_storage(str(tmp_path / "j.log"))  # a local file system takes symlinks
    assert isinstance(storage._backend._lock, JournalFileSymlinkLock)
