"""kind="dask" on a real LocalCluster: records, notebook-style code, a killed worker, cancel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from cellpool import Executor

distributed = pytest.importorskip("distributed")


def double_or_fail(x):
    if x == 3:
        raise ValueError("three")
    return 2 * x


def test_results_and_errors_come_back_as_records_with_worker_addresses():
    with Executor("dask", 2, progress="none") as ex:
        assert ex.workers == 2
        results = ex.run(double_or_fail, range(200))
        rows = ex.workers_info()
    assert results.values[:5] == [0, 2, 4, None, 8]
    assert results[3].status == "error" and results[3].error_type == "ValueError"
    assert "double_or_fail" in results[3].traceback
    assert {r.worker for r in results} <= {row["worker"] for row in rows}
    assert all(r.worker.startswith("tcp://127.0.0.1:") for r in results)
    assert len(rows) == 2 and all(row["rss"] > 0 and row["pid"] for row in rows)


def test_identical_calls_are_not_merged():
    with Executor("dask", 2, progress="none") as ex:
        first, second = ex.submit(uuid.uuid4), ex.submit(uuid.uuid4)
        assert first.result() != second.result()


def test_a_killed_worker_is_replaced_and_the_run_finishes(tmp_path):
    marker = tmp_path / "killed-once"

    def kill_worker_once(x):
        if x == 5 and not marker.exists():
            marker.touch()
            os._exit(1)
        time.sleep(0.05)
        return x

    with Executor("dask", 2, progress="none") as ex:
        results = ex.run(kill_worker_once, range(20))
    assert marker.exists()
    assert results.values == list(range(20))


def test_cancel_stops_the_run_and_keeps_what_finished():
    with Executor("dask", 2, progress="none") as ex:
        job = ex.start(time.sleep, [0.3] * 40)
        time.sleep(1.0)
        job.cancel()
        results = job.result(timeout=10)
    assert len(results) == 40
    statuses = {r.status for r in results}
    assert statuses == {"ok", "cancelled"}


def test_two_executors_on_one_cluster_never_share_results():
    with (
        distributed.LocalCluster(n_workers=1, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as client,
        Executor("dask", client=client, progress="none") as first,
        Executor("dask", client=client, progress="none") as second,
    ):
        # batch numbers restart in every process: keys must not rely on them
        assert first._pool._key != second._pool._key
        assert first.run(abs, [-1, -2]).values == [1, 2]
        assert second.run(str, [7, 8]).values == ["7", "8"]


def test_an_existing_client_is_used_and_left_open():
    with (
        distributed.LocalCluster(n_workers=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        with Executor("dask", client=client, progress="none") as ex:
            assert ex.run(abs, [-1, -2]).values == [1, 2]
        assert client.submit(abs, -3).result() == 3  # still open


NOTEBOOK_STYLE = """
import cellpool

class Scaler:
    def __init__(self, k):
        self.k = k

offset = 100
work = lambda x: Scaler(3).k * x + offset

if __name__ == "__main__":
    with cellpool.Executor("dask", 2, progress="none") as ex:
        print(ex.run(work, range(4)).values)
"""


def test_functions_and_classes_defined_in_main_travel_to_dask_workers(tmp_path):
    script = tmp_path / "notebook_like.py"
    script.write_text(NOTEBOOK_STYLE)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[100, 103, 106, 109]"


def test_dask_options_are_checked():
    with pytest.raises(ValueError, match="applies to kind='dask' only"):
        Executor("thread", address="tcp://127.0.0.1:1")
