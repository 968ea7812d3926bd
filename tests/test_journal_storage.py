"""A study in an Optuna journal file (the storage for a shared NFS path): a search killed with kill -9 and resumed
keeps every trial once, and optuna-dashboard reads the file with the command the search printed."""

import optuna
import pytest
from optuna.storages.journal import JournalFileSymlinkLock

from search import study as st
from test_postgres import assert_every_trial_kept_once, assert_requeue_said, dashboard_trials, kill_9_then_resume

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def searched(tmp_path_factory, coco128):
    out = tmp_path_factory.mktemp("journal")
    url = str(out / "study.log")
    first, res = kill_9_then_resume(out, coco128, url)
    return url, first, res


def test_kill_9_then_resume_keeps_every_trial_once(searched):
    url, first, res = searched
    assert res.returncode == 0, res.stderr[-3000:]
    assert_every_trial_kept_once(url, first)
    assert_requeue_said(res.stderr)


def test_dashboard_reads_the_journal_file(searched):
    url, _, res = searched
    served = dashboard_trials(res.stdout, "s")
    assert [t["number"] for t in served] == [t.number for t in optuna.load_study(study_name="s",
                                                                                 storage=st.open_storage(url)).trials]
    assert sum(t["state"] == "Complete" for t in served) == 2


def test_journal_uses_the_lock_optuna_dashboard_uses(tmp_path):
    storage = st.open_storage(str(tmp_path / "j.log"))  # a local file system takes symlinks
    assert isinstance(storage._backend._lock, JournalFileSymlinkLock)
