"""kind="dask": records, one record per bad task, timeouts from a task's start, what listens where,
scripts, a cluster started from the command line, and TLS."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import requests

import cellpool
from cellpool import Executor
from cellpool.pool.dask import ShortNames, dashboard_link, shown_name

from .conftest import settle

distributed = pytest.importorskip("distributed")


def run_script(path, text: str) -> subprocess.CompletedProcess:
    """``text`` written to ``path`` and run as a script in a fresh interpreter."""
    path.write_text(text)
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)


def double_or_fail(x):
    if x == 3:
        raise ValueError("three")
    return 2 * x


def test_results_and_errors_come_back_as_records_with_the_workers_short_names():
    with Executor("dask", 2, progress="none") as ex:
        assert ex.workers == 2
        before = time.time()
        results = ex.run(double_or_fail, range(200))
        after = time.time()
        rows = ex.workers_info()
    # times measured in the dask workers, on this machine's epoch clock
    assert all(before <= r.started <= r.finished <= after for r in results)
    assert results.values[:5] == [0, 2, 4, None, 8]
    assert results[3].status == "error" and results[3].error_type == "ValueError"
    assert "double_or_fail" in results[3].traceback
    # a LocalCluster names its workers 0 and 1: the rows and the records say d0 and d1
    assert [row["worker"] for row in rows] == ["d0", "d1"]
    assert {r.worker for r in results} <= {"d0", "d1"}
    assert all(row["address"].startswith("tcp://127.0.0.1:") for row in rows)
    assert len({row["address"] for row in rows}) == 2
    assert len(rows) == 2 and all(row["rss"] > 0 and row["pid"] for row in rows)
    done = {row["worker"]: row["done"] for row in rows}  # the rows count as the records say
    assert done == {w: sum(r.worker == w for r in results) for w in ("d0", "d1")}


def not_idle(ex):
    return [row for row in ex.workers_info() if row["state"] != "idle" or row["task"] is not None]


def test_a_pipeline_stage_runs_on_dask_between_thread_stages():
    results = cellpool.pipeline(
        cellpool.stage(abs, name="first"),
        cellpool.stage(double_or_fail, kind="dask", workers=2),
        cellpool.stage(str, name="last"),
    ).run([-1, -2, -3, -4], progress="none")
    assert results.values == ["2", "4", None, "8"]
    assert (results[2].status, results[2].stage) == ("error", "double_or_fail")
    assert {r.worker for r in results.stages["double_or_fail"]} <= {"d0", "d1"}


def test_workers_are_idle_with_no_task_once_a_run_ends_and_between_runs():
    # The rows were published as the run ended, from the scheduler's figures of a moment
    # before (a task executing on each worker), and not again: busy, with no task, forever.
    with Executor("dask", 2, progress="none") as ex:
        for _ in range(2):  # the second run on the same executor, after a pause
            job = ex.start(time.sleep, [0.4] * 12)
            # while it runs, a worker shows a task it runs
            assert not settle(lambda: all(r["task"] is None for r in ex.workers_info()))
            assert [r.status for r in job.result(timeout=60)] == ["ok"] * 12
            assert not settle(lambda: not_idle(ex), seconds=3), ex.workers_info()
            time.sleep(1.5)  # the scheduler's figures of the idle workers come in
            assert not not_idle(ex), ex.workers_info()


def test_short_names_are_a_workers_own_when_short_and_d_numbers_otherwise():
    shown = {0: "d0", 12: "d12", "3": "d3", "gpu-a": "gpu-a", "w-1": "w-1"}
    assert {name: shown_name(name) for name in shown} == shown
    unshown = ("tcp://10.0.0.5:40123", "a-name-too-long-to-show", "two words", "", None, True, -1)
    assert [shown_name(n) for n in unshown] == [None] * len(unshown)
    names = ShortNames()
    # the `dask worker` command names a worker by its address: it gets the first free d<n>
    assert names("tcp://10.0.0.5:1", "tcp://10.0.0.5:1") == "d0"
    assert names(None, "tcp://10.0.0.5:2") == "d1"
    assert names(0, "tcp://10.0.0.6:1") == "d2"  # d0 is given: a number of its own
    assert names(5, "tcp://10.0.0.6:2") == "d5"
    assert names("gpu-a", "tcp://10.0.0.6:3") == "gpu-a"
    assert names(5, "tcp://10.0.0.6:9") == "d5"  # worker 5 started again elsewhere
    assert names("tcp://10.0.0.5:1", "tcp://10.0.0.5:1") == "d0"


def test_a_dashboard_link_is_none_when_dask_names_no_dashboard():
    class NoDashboard:
        @property
        def dashboard_link(self):
            raise KeyError("dashboard")  # a scheduler without that service

    class Empty:
        dashboard_link = ""  # a cluster object without one

    assert dashboard_link(NoDashboard()) is None
    assert dashboard_link(Empty()) is None
    with Executor("thread", 1, progress="none") as ex:
        assert ex.dashboard_link is None


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
            assert ex.dashboard_link == (client.dashboard_link or None)
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
    done = run_script(tmp_path / "notebook_like.py", NOTEBOOK_STYLE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[100, 103, 106, 109]"


def test_dask_options_are_checked():
    with pytest.raises(ValueError, match="applies to kind='dask' only"):
        Executor("thread", address="tcp://127.0.0.1:1")


# -- one bad task costs one record -----------------------------------------------------


def segfault_at_1234(x):
    if x == 1234:
        os.kill(os.getpid(), signal.SIGSEGV)
    return x


def hang_at_1234(x):
    if x == 1234:
        time.sleep(3600)
    return x


@pytest.mark.timeout(300)
def test_one_segfault_among_many_tiny_tasks_costs_one_crashed_record():
    with Executor("dask", 2, progress="none") as ex:
        results = ex.run(segfault_at_1234, range(2000))
    assert len(results) == 2000
    crashed = [r for r in results if r.status != "ok"]
    assert [(r.index, r.status) for r in crashed] == [(1234, "crashed")]
    assert "KilledWorker" in crashed[0].error
    assert results.values[:1234] == list(range(1234))


@pytest.mark.timeout(300)
def test_one_hung_task_among_many_costs_one_timeout_record():
    with Executor("dask", 2, timeout=2, progress="none") as ex:
        results = ex.run(hang_at_1234, range(2000))
    assert len(results) == 2000
    failed = [r for r in results if r.status != "ok"]
    assert [(r.index, r.status) for r in failed] == [(1234, "timeout")]
    assert failed[0].error == "the task ran past its 2 s timeout"


def test_a_timeout_counts_from_the_start_of_the_task_not_from_its_hand_over(tmp_path):
    slow_started = tmp_path / "slow-started"

    def slow_then_quick(seconds):
        if seconds > 1:
            slow_started.touch()
        elif not slow_started.exists():  # the order this test is about did not happen
            raise AssertionError("the quick task ran before the slow one")
        time.sleep(seconds)
        return seconds

    began = time.monotonic()
    with Executor("dask", 1, timeout=2, progress="none") as ex:  # one worker thread
        results = ex.run(slow_then_quick, [30, 0.1])
        waited = time.monotonic() - began
    assert [r.status for r in results] == ["timeout", "ok"], results.errors
    # the quick task started once the slow one was given up, not when it ended
    assert waited < 25


# -- what listens where, and how a script ends ------------------------------------------


def listening_addresses(processes):
    found = set()
    for process in processes:
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.add((process.pid, conn.laddr.ip, conn.laddr.port))
    return found


def test_everything_a_local_cluster_starts_listens_on_loopback_only():
    before = {port for _, _, port in listening_addresses([psutil.Process()])}
    with Executor("dask", 2, progress="none") as ex:
        assert ex.run(abs, [-1]).values == [1]
        ours = [psutil.Process(), *psutil.Process().children(recursive=True)]
        listening = {
            (pid, ip, port)
            for pid, ip, port in listening_addresses(ours)
            if pid != os.getpid() or port not in before
        }
        dashboard = ex.dashboard_link
        with requests.Session() as session:
            session.trust_env = False  # no proxy: the dashboard is on this machine
            # the scheduler, in this process, closes its end at once: no fd is left
            answer = session.get(dashboard, headers={"Connection": "close"}, timeout=30)
    assert len(listening) >= 5, listening  # scheduler, dashboard, two nannies, two workers
    assert {ip for _, ip, _ in listening} <= {"127.0.0.1", "::1"}, listening
    assert "0.0.0.0" not in {ip for _, ip, _ in listening}
    found = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/.*", dashboard)
    assert found, dashboard
    assert (os.getpid(), "127.0.0.1", int(found[1])) in listening  # the dashboard's socket
    assert answer.status_code == 200


UNGUARDED = """
import cellpool

with cellpool.Executor("dask", 2, progress="none") as ex:
    print(ex.run(abs, [-1, -2]).values)
"""


def test_an_unguarded_script_works_or_says_at_once_what_to_add(tmp_path):
    done = run_script(tmp_path / "unguarded.py", UNGUARDED)
    output = done.stdout + done.stderr
    if done.returncode == 0:
        assert done.stdout.strip() == "[1, 2]"
    else:
        assert 'if __name__ == "__main__":' in output
    assert len(output.splitlines()) <= 12, output


DROPPED = """
import time

import cellpool

def main():
    ex = cellpool.Executor("dask", 2, progress="none")
    print(ex.run(abs, [-1, -2]).values)
    return ex

if __name__ == "__main__":
    KEPT = main()  # never shut down, and busy at exit: its work finishes, then it closes
    JOB = KEPT.start(time.sleep, [0.2] * 10)
    main()  # dropped at once
"""


TWO_CLUSTERS = """
import cellpool

if __name__ == "__main__":
    first = cellpool.Executor("dask", 1, progress="none")
    second = cellpool.Executor("dask", 1, progress="none")
    first.shutdown()  # the first made closes first: the second still runs
    second.shutdown()
"""


def test_local_clusters_closing_in_any_order_stay_quiet(tmp_path):
    # Each LocalCluster restored dask's log level as it closed, so the one still running
    # printed its closing lines (INFO) when the first one made closed first.
    done = run_script(tmp_path / "two_clusters.py", TWO_CLUSTERS)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_an_executor_dropped_or_left_open_exits_quietly(tmp_path):
    began = time.monotonic()
    done = run_script(tmp_path / "dropped.py", DROPPED)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[1, 2]", "[1, 2]"]
    assert done.stderr == ""
    assert time.monotonic() - began < 60


# -- a cluster started the way users start one -------------------------------------------

DASK = os.path.join(os.path.dirname(sys.executable), "dask")


WORKER_PATH = os.pathsep.join(  # where a dask worker finds cellpool and these tests
    [
        os.path.dirname(os.path.dirname(__file__)),
        os.path.dirname(os.path.dirname(cellpool.__file__)),
    ]
)


def detached(command: str, log) -> int:
    """Start ``command`` in a session of its own, not as this process's child (the
    leak checks count children): its pid, which is also its process group."""
    shell = f"PYTHONPATH={WORKER_PATH} setsid {command} >>{log} 2>&1 & echo $!"
    return int(subprocess.run(["sh", "-c", shell], capture_output=True, text=True).stdout)


def stop_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster_address(tmp_path_factory):
    """A scheduler and two workers, each launched as its own ``dask`` command on 127.0.0.1."""
    where = tmp_path_factory.mktemp("cluster")
    scheduler_file = where / "scheduler.json"
    log = where / "log"
    groups = [
        detached(
            f"{DASK} scheduler --host 127.0.0.1 --port 0 --no-dashboard "
            f"--scheduler-file {scheduler_file}",
            log,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(2):
            groups.append(
                detached(
                    f"{DASK} worker --scheduler-file {scheduler_file} --host 127.0.0.1 "
                    f"--nthreads 1 --no-dashboard",
                    log,
                )
            )
        with distributed.Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            address = client.scheduler.address
        yield address
    finally:
        for pid in groups:
            stop_group(pid)


def cellpool_keys_on(address):
    with distributed.Client(address) as client:
        return client.run_on_scheduler(
            lambda dask_scheduler: [k for k in dask_scheduler.tasks if "cellpool-" in str(k)]
        )


def test_a_real_cluster_gives_records_and_errors(cluster_address):
    with Executor("dask", address=cluster_address, progress="none") as ex:
        assert ex.workers == 2
        results = ex.run(double_or_fail, range(500))
        rows = ex.workers_info()
    assert results.values[:5] == [0, 2, 4, None, 8]
    assert results[3].status == "error" and "double_or_fail" in results[3].traceback
    # `dask worker` names a worker by its address: each gets a number
    assert sorted(row["worker"] for row in rows) == ["d0", "d1"]
    assert {r.worker for r in results} == {"d0", "d1"}
    assert all(row["address"].startswith("tcp://127.0.0.1:") for row in rows)
    assert not settle(lambda: cellpool_keys_on(cluster_address))


def test_a_real_cluster_worker_killed_mid_run_costs_no_record(cluster_address):
    with (
        distributed.Client(cluster_address) as client,
        Executor("dask", client=client, progress="none") as ex,
    ):
        job = ex.start(time.sleep, [0.05] * 200)
        while len(job.partial()) < 20:
            time.sleep(0.05)
        victim = next(iter(client.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)  # its nanny starts another
        results = job.result(timeout=120)
        client.wait_for_workers(2, timeout=60)
    assert len(results) == 200
    assert {r.status for r in results} == {"ok"}
    assert not settle(lambda: cellpool_keys_on(cluster_address))


def test_a_real_cluster_run_is_cancelled_and_leaves_no_task(cluster_address):
    with Executor("dask", address=cluster_address, progress="none") as ex:
        job = ex.start(time.sleep, [0.3] * 100)
        time.sleep(1.0)
        job.cancel()
        results = job.result(timeout=30)
        assert not settle(lambda: cellpool_keys_on(cluster_address), seconds=10)
    assert len(results) == 100
    assert {r.status for r in results} == {"ok", "cancelled"}


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def tls(tmp_path):
    """Security for a cluster that speaks TLS only, from a certificate made here."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=cellpool-test", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    files = {"tls_ca_file": str(cert), "tls_cert": str(cert), "tls_key": str(key)}
    roles = ("client", "scheduler", "worker")
    return distributed.security.Security(
        tls_ca_file=str(cert),
        require_encryption=True,
        **{
            f"tls_{role}_{what}": files[f"tls_{what}"] for role in roles for what in ("cert", "key")
        },
    )


def connect_without_security(address):
    """Try, in a process of its own (a dask client that fails to connect keeps its event
    loop), to run a task on ``address`` with no certificate."""
    code = (
        "import dask, cellpool\n"
        "with dask.config.set({'distributed.comm.timeouts.connect': '3s'}):\n"
        f"    ex = cellpool.Executor('dask', address={address!r}, progress='none')\n"
        "print('Executor made', ex.run(abs, [-1]).values)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_tls_cluster_works_through_a_client_or_security_and_refuses_plain(tls):
    with distributed.LocalCluster(
        n_workers=1, processes=True, host="127.0.0.1", dashboard_address=None, security=tls
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        with (
            distributed.Client(cluster, security=tls) as client,
            Executor("dask", client=client, progress="none") as ex,
        ):
            assert ex.run(abs, [-1, -2]).values == [1, 2]
        # one client at a time: with the first client still connected, distributed's own
        # handshake once failed its `assert len(msg) == 1` here (and leaked its loop)
        with Executor("dask", address=address, security=tls, progress="none") as ex:
            assert ex.run(abs, [-3]).values == [3]
        for plain in (address.replace("tls://", "tcp://"), address):
            refused = connect_without_security(plain)
            assert refused.returncode != 0 and "Executor made" not in refused.stdout


def test_security_is_checked():
    with pytest.raises(ValueError, match="applies to kind='dask' only"):
        Executor("thread", security=object())
    with pytest.raises(TypeError, match=r"distributed\.security\.Security"):
        Executor("dask", address="tcp://127.0.0.1:1", security="tls")
