"""Opening a study's storage while another process creates the same new SQLite database (a dashboard, a test
polling the study) must not fail the search."""

import multiprocessing as mp

import optuna

from search.storage.study import open_storage


def _open(url: str) -> str:
    return type(open_storage(url)).__name__


def test_concurrent_creation_of_one_new_sqlite_database(tmp_path):
    for i in range(3):
        url = f"sqlite:///{tmp_path / f'race{i}.db'}"
        with mp.get_context("fork").Pool(6) as pool:
            assert pool.map(_open, [url] * 6) == ["RDBStorage"] * 6
        assert optuna.get_all_study_names(url) == []
