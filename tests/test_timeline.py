"""``Results.timeline()``: a static SVG of a run, one lane per worker, a bar per task."""

from __future__ import annotations

import itertools
import random
import time
import xml.etree.ElementTree as ET

import pytest

import cellpool
from cellpool import Results, TaskResult
from cellpool.view.timeline import timeline

NS = "{http://www.w3.org/2000/svg}"
EPOCH = 1_800_000_000.0


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # raises unless the SVG is well-formed XML
    assert root.tag == NS + "svg"
    return root


def lanes(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-worker"): g for g in root.iter(NS + "g") if g.get("class") == "lane"}


def labels(root: ET.Element) -> list[str]:
    return [t.text for t in root.iter(NS + "text") if t.get("class") == "label"]


def legend(root: ET.Element) -> dict[str, int]:
    return {
        t.get("data-status"): int(t.get("data-count"))
        for t in root.iter(NS + "tspan")
        if t.get("data-status")
    }


def marks(lane: ET.Element, kind: str) -> list[ET.Element]:
    return [element for element in lane.iter() if element.get("class") == kind]


def record(index, worker, start, seconds, status="ok", attempts=1, error=None) -> TaskResult:
    """A record starting ``start`` seconds into the run; ``start=None``: never started."""
    timed = start is not None
    return TaskResult(
        index=index,
        item=index,
        status=status,
        worker=worker if timed else None,
        attempts=attempts,
        started=EPOCH + start if timed else None,
        finished=EPOCH + start + seconds if timed else None,
        error_type=None if status == "ok" else "ValueError",
        error=error,
    )


def statuses(root: ET.Element) -> dict[str, int]:
    counts = legend(root)
    return {s: n for s, n in counts.items() if s not in ("retried", "not-drawn")}


def test_a_thread_run_has_a_lane_per_worker_and_its_failures_marked():
    def task(x):
        time.sleep(0.002)
        if x % 5 == 2:
            raise ValueError(f"bad <{x}>")
        return x

    results = cellpool.run(task, range(30), kind="thread", workers=3, progress="none")
    root = parse(results.timeline().svg)

    ran = {r.worker for r in results if r.started is not None}
    assert sorted(labels(root)) == sorted(ran)
    assert set(lanes(root)) == ran
    for worker, lane in lanes(root).items():
        failed = [r for r in results if r.worker == worker and r.status == "error"]
        assert len(marks(lane, "failed")) == len(failed)
        ran_here = sum(r.worker == worker for r in results)
        assert len(marks(lane, "ok")) == ran_here - len(failed)
        tip = f"{worker}: {ran_here} task{'s' if ran_here != 1 else ''}" + (
            f", {len(failed)} failed" if failed else ""
        )
        assert lane.find(NS + "title").text == tip
    assert statuses(root) == results.counts() == {"ok": 24, "error": 6}
    assert "retried" not in legend(root)


def test_retried_tasks_are_marked_in_their_lanes(tmp_path):
    def flaky(x):
        marker = tmp_path / str(x)
        if x % 4 == 0 and not marker.exists():
            marker.touch()
            raise RuntimeError("first attempt fails")
        time.sleep(0.001)
        return x

    results = cellpool.run(flaky, range(12), kind="thread", workers=3, progress="none", retries=1)
    assert results.ok
    root = parse(results.timeline().svg)

    retried = [r for r in results if r.attempts > 1]
    assert [r.index for r in retried] == [0, 4, 8]
    assert legend(root)["retried"] == 3
    assert statuses(root) == results.counts() == {"ok": 12}
    for worker, lane in lanes(root).items():
        assert len(marks(lane, "retried")) == sum(r.worker == worker for r in retried)
        assert "failed" not in lane.find(NS + "title").text


def test_a_million_records_draw_quickly_into_a_small_svg_with_the_one_failure_visible():
    rng = random.Random(7)
    workers, n, failure = 64, 1_000_000, 612_345
    clocks = [rng.random() * 0.01 for _ in range(workers)]

    def records():
        for i in range(n):
            w = i % workers
            seconds = rng.expovariate(4000)
            start = clocks[w]
            clocks[w] += seconds + (rng.expovariate(50) if rng.random() < 0.01 else 2e-6)
            status = "error" if i == failure else "ok"
            yield record(i, f"t{w + 1}", start, seconds, status, error="one in a million")

    results = Results(records())
    started = time.perf_counter()
    svg = results.timeline().svg
    elapsed = time.perf_counter() - started

    assert elapsed < 2.0
    assert len(svg.encode()) < 100_000
    root = parse(svg)
    assert statuses(root) == results.counts() == {"ok": n - 1, "error": 1}
    assert len(lanes(root)) == workers
    lane = lanes(root)[f"t{failure % workers + 1}"]
    (mark,) = marks(lane, "failed")
    assert int(mark.get("d").rpartition("h")[2]) >= 2  # pixels wide, over the busy span
    assert list(lane).index(mark) > list(lane).index(marks(lane, "busy")[0])
    assert sum(len(marks(lane, "failed")) for lane in lanes(root).values()) == 1


def test_two_hundred_workers_fit_in_thinner_lanes():
    results = Results(
        record(i, f"p{i % 200}", (i // 200) * 0.01 * (1 + i % 3), 0.009) for i in range(40_000)
    )
    root = parse(results.timeline().svg)
    assert len(lanes(root)) == 200
    assert float(root.get("height")) <= 400
    assert labels(root)[:3] == ["p0", "p7", "p14"]  # a label every few lanes, in natural order


def test_a_few_workers_get_full_height_lanes():
    results = Results(record(i, f"t{i % 3}", i * 0.1, 0.05) for i in range(9))
    root = parse(results.timeline().svg)
    middles = [float(t.get("y")) for t in root.iter(NS + "text") if t.get("class") == "label"]
    assert [b - a for a, b in itertools.pairwise(middles)] == [14, 14]


def test_lanes_are_in_natural_order():
    results = Results(
        record(i, worker, i * 0.1, 0.1) for i, worker in enumerate(["t10", "t2", "t1", "t2"])
    )
    assert labels(parse(results.timeline().svg)) == ["t1", "t2", "t10"]


def test_worker_names_and_errors_are_escaped():
    results = Results(
        [
            record(0, "<w&1>", 0.0, 1.0),
            record(1, 'q"uote', 0.5, 1.0, "error", error="<script>alert(1)</script> & co"),
            record(2, "bell\x07", 0.2, 0.1),
        ]
    )
    svg = results.timeline().svg
    assert "<w&1>" not in svg and "<script>" not in svg
    assert "&lt;w&amp;1&gt;" in svg
    root = parse(svg)
    assert set(labels(root)) == {"<w&1>", 'q"uote', "bell\ufffd"}
    (failed,) = marks(lanes(root)['q"uote'], "failed")
    assert "<script>alert(1)</script> & co" in failed.find(NS + "title").text


def test_records_that_never_ran_are_counted_not_drawn():
    results = Results(
        [
            record(0, "t1", 0.0, 0.5),
            record(1, "t2", 0.1, 0.5, "error"),
            record(2, None, None, None, "cancelled"),
            record(3, None, None, None, "cancelled"),
        ]
    )
    root = parse(results.timeline().svg)
    assert set(lanes(root)) == {"t1", "t2"}
    assert legend(root) == {"ok": 1, "error": 1, "cancelled": 2, "not-drawn": 2}


def test_an_empty_run_is_a_tiny_picture_saying_so():
    for results, text in [
        (Results(), "no task ran"),
        (Results([record(0, None, None, None, "cancelled")]), "no task ran (1 cancelled)"),
    ]:
        svg = results.timeline().svg
        assert len(svg) < 500
        (element,) = parse(svg).iter(NS + "text")
        assert element.text == text


def test_pauses_are_shaded_behind_their_lanes():
    results = Results(record(i, f"t{i % 2 + 1}", i * 0.1, 0.1) for i in range(20))
    pauses = [
        ("t1", EPOCH + 0.3, EPOCH + 0.6, "memory at 85% of memory_limit"),
        ("t9", EPOCH + 0.5, None, "fds <90%>"),  # a worker that ran nothing gets a lane
        (None, EPOCH + 1.0, EPOCH + 1.2, "machine memory low"),
    ]
    root = parse(timeline(results, pauses).svg)
    assert labels(root) == ["t1", "t2", "t9"]
    found = lanes(root)
    (t1,) = marks(found["t1"], "paused")
    assert t1.find(NS + "title").text == "paused: memory at 85% of memory_limit"
    assert list(found["t1"]).index(t1) < list(found["t1"]).index(marks(found["t1"], "ok")[0])
    assert marks(found["t9"], "paused")[0].find(NS + "title").text == "paused: fds <90%>"
    assert not marks(found["t2"], "paused")
    (everyone,) = [el for el in root if el.get("class") == "paused"]
    assert "machine memory low" in everyone.find(NS + "title").text
    assert "retried" not in legend(root)


def test_the_jupyter_repr_and_save_give_the_same_text(tmp_path):
    results = Results(record(i, "t1", i * 0.1, 0.1) for i in range(3))
    picture = results.timeline()
    assert picture._repr_svg_() == picture.svg
    assert repr(picture) == "<cellpool timeline of 3 tasks>"  # the same whatever the times
    picture.save(tmp_path / "run.svg")
    assert (tmp_path / "run.svg").read_text(encoding="utf-8") == picture.svg


@pytest.mark.parametrize("seconds", [0.0, 0.004, 3.0, 600.0, 7200.0])
def test_the_axis_has_a_few_ticks_whatever_the_span(seconds):
    results = Results([record(0, "t1", 0.0, seconds), record(1, "t2", 0.0, seconds / 2)])
    root = parse(results.timeline().svg)
    ticks = [el.text for el in root.iter(NS + "text") if el.get("class") == "tick"]
    assert 2 <= len(ticks) <= 8
    assert ticks[0] in ("0 s", "0:00")
