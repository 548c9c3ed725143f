"""kind="dask" against plain dask on the same LocalCluster (2 worker processes).

Two workloads: 20,000 tiny tasks (``x + 1``), where dask pays about a millisecond per
task and cellpool sends batches; and 200 tasks of 10 ms CPU each, where batching cannot
help and the question is what cellpool's records and window cost. Plain dask is
``client.map`` then ``client.gather``. Both share one cluster, started first (its start
is timed for neither); each variant runs once. Run it from the repository root::

    python benchmarks/dask_cluster.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import distributed

import cellpool

TINY = 20_000
CPU_TASKS = 200
CPU_SECONDS = 0.010


def inc(x: int) -> int:
    return x + 1


def spin(x: int) -> int:
    end = time.perf_counter() + CPU_SECONDS
    while time.perf_counter() < end:
        pass
    return x


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.gather(client.map(inc, range(10)))  # both sides start warm
        with cellpool.Executor("dask", client=client, progress="none") as executor:
            executor.run(inc, range(10))
            rows = []
            for name, fn, n in (("tiny x + 1", inc, TINY), ("10 ms CPU", spin, CPU_TASKS)):
                plain = timed(
                    lambda fn=fn, n=n: client.gather(client.map(fn, range(n), pure=False))
                )
                mine = timed(lambda fn=fn, n=n: executor.run(fn, range(n)))
                rows.append((name, n, plain, mine))
    print("| workload | tasks | client.map + gather s | cellpool kind=dask s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, n, plain, mine in rows:
        print(f"| {name} | {n:,} | {plain:.3f} | {mine:.3f} | {mine / plain:.3f}x |")
    tiny, cpu = rows
    print(
        f"target: tiny tasks at least 10x faster: {'PASS' if tiny[2] / tiny[3] >= 10 else 'FAIL'}"
        f" ({tiny[2] / tiny[3]:.0f}x)"
    )
    print(
        f"target: CPU tasks within 1.2x: {'PASS' if cpu[3] / cpu[2] <= 1.2 else 'FAIL'}"
        f" ({cpu[3] / cpu[2]:.2f}x)"
    )


if __name__ == "__main__":
    main()
