"""The ``Results`` contract: ``TaskResult`` fields, the sequence, summaries and reprs."""

from __future__ import annotations

import dataclasses
import gc
import html
import random
import sys
import tracemalloc

import pytest
import requests

import cellpool
from cellpool import Results, TaskResult
from cellpool.results import Failure

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

CONTRACT_FIELDS = [
    "index",
    "item",
    "status",
    "value",
    "error_type",
    "error",
    "traceback",
    "worker",
    "pid",
    "attempts",
    "started",
    "finished",
    "duration",
    "restored",  # added for journaled runs: a record taken from a journal
    "stage",  # added for pipelines: the stage a record comes from
]


def traceback_text(function: str, line: int, error_type: str, message: str) -> str:
    return (
        "Traceback (most recent call last):\n"
        '  File "/work/runner.py", line 10, in call\n'
        "    return fn(item)\n"
        f'  File "/work/notebook_cell.py", line {line}, in {function}\n'
        f"    raise {error_type}({message!r})\n"
        f"{error_type}: {message}\n"
    )


def ok(index: int, value=None, item=None) -> TaskResult:
    started = 1000.0 + index
    return TaskResult(
        index=index,
        item=index if item is None else item,
        status="ok",
        value=index * 10 if value is None else value,
        worker=f"t{index % 3}",
        pid=4000 + index % 3,
        attempts=1,
        started=started,
        finished=started + 0.25,
        duration=0.25,
    )


def failed(
    index: int,
    status: str = "error",
    error_type: str = "ValueError",
    error: str | None = None,
    function: str | None = None,
) -> TaskResult:
    error = f"bad item {index}" if error is None else error
    function = f"f{index}" if function is None else function
    started = 1000.0 + index
    return TaskResult(
        index=index,
        item=index,
        status=status,
        value=None,
        error_type=error_type,
        error=error,
        traceback=traceback_text(function, 100 + index, error_type, error),
        worker="p1",
        pid=777,
        attempts=2,
        started=started,
        finished=started + 0.5,
        duration=0.5,
    )


@pytest.fixture
def mixed() -> list[TaskResult]:
    return [
        ok(0),
        failed(1),
        ok(2),
        failed(3, status="timeout", error_type="TaskTimeout", error="ran past 5 s"),
        ok(4),
        failed(5, status="crashed", error_type="WorkerCrashed", error="exit code -11"),
        failed(6, status="cancelled", error_type="TaskCancelled", error="cancelled"),
    ]


# -- TaskResult -------------------------------------------------------------------------


def test_task_result_has_the_contract_fields_in_order():
    assert [field.name for field in dataclasses.fields(TaskResult)] == CONTRACT_FIELDS


def test_task_result_defaults_and_keyword_construction():
    record = TaskResult(index=3, item="x", status="ok")
    assert record.index == 3 and record.item == "x" and record.status == "ok"
    for name in CONTRACT_FIELDS[3:]:
        expected = {"attempts": 0, "restored": False}.get(name)
        assert getattr(record, name) == expected, name


def test_task_result_is_frozen():
    record = ok(0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.value = 99  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "error"  # type: ignore[misc]
    assert record.value == 0 and record.status == "ok"


# -- the sequence -----------------------------------------------------------------------


def test_len_and_empty():
    assert len(Results()) == 0
    assert list(Results()) == []
    assert len(Results([ok(0), ok(1), failed(2)])) == 3


def test_int_indexing_including_negative(mixed):
    results = Results(mixed)
    for position, record in enumerate(mixed):
        assert results[position] == record
        assert results[position - len(mixed)] == record
    assert results[-1] == mixed[-1]
    assert results[-1].status == "cancelled"
    assert results[0].value == 0


def test_index_out_of_range_raises_index_error(mixed):
    results = Results(mixed)
    with pytest.raises(IndexError):
        results[len(mixed)]
    with pytest.raises(IndexError):
        results[-len(mixed) - 1]
    with pytest.raises(IndexError):
        Results()[0]


def test_slicing_returns_results_with_the_right_records(mixed):
    results = Results(mixed)
    for key in (slice(1, 4), slice(None, None, 2), slice(None, None, -1), slice(-3, None)):
        part = results[key]
        assert isinstance(part, Results)
        assert list(part) == mixed[key]
        assert len(part) == len(mixed[key])
    assert [record.index for record in results[2:5]] == [2, 3, 4]
    empty = results[5:2]
    assert isinstance(empty, Results) and len(empty) == 0
    # a slice keeps failures readable
    assert results[1:2][0].error == "bad item 1"
    assert results[3:6].counts() == {"ok": 1, "timeout": 1, "crashed": 1}


def test_iteration_order_is_input_order(mixed):
    results = Results(mixed)
    assert [record.index for record in results] == list(range(len(mixed)))
    assert list(results) == mixed
    assert list(reversed(results)) == mixed[::-1]


def test_equality_with_a_plain_list(mixed):
    results = Results(mixed)
    assert results == mixed
    assert mixed == results
    assert results == Results(mixed)
    assert results == tuple(mixed)
    assert (results != mixed) is False
    assert results != mixed[:-1]
    assert results != [*mixed[:-1], ok(6)]
    assert results != mixed[::-1]
    assert Results() == []


def test_records_round_trip_every_field(mixed):
    for original, read in zip(mixed, Results(mixed), strict=True):
        for name in CONTRACT_FIELDS:
            assert getattr(read, name) == getattr(original, name), name


def test_records_come_back_exactly_as_given_including_duration():
    # a list of TaskResult keeps each record as given; so must Results
    records = [
        # 0.3 - 0.1 == 0.19999999999999998, not 0.2
        TaskResult(index=0, item=0, status="ok", value=1, started=0.1, finished=0.3, duration=0.2),
        # a duration without timestamps
        TaskResult(index=1, item=1, status="ok", value=2, duration=1.5),
    ]
    results = Results(records)
    assert [record.duration for record in results] == [0.2, 1.5]
    assert results == records


def test_values_none_where_failed(mixed):
    results = Results(mixed)
    assert results.values == [0, None, 20, None, 40, None, None]
    assert results.values == [record.value for record in mixed]
    # a copy: changing it leaves the results alone
    results.values.append("x")
    assert len(results.values) == len(mixed)


def test_errors_keep_their_original_index(mixed):
    results = Results(mixed)
    errors = results.errors
    assert isinstance(errors, Results)
    assert [record.index for record in errors] == [1, 3, 5, 6]
    assert [record.status for record in errors] == ["error", "timeout", "crashed", "cancelled"]
    assert list(errors) == [mixed[1], mixed[3], mixed[5], mixed[6]]
    assert errors[0].error == "bad item 1"
    assert errors[-1].error_type == "TaskCancelled"
    assert len(Results([ok(0), ok(1)]).errors) == 0
    # the errors of the errors are themselves
    assert errors.errors == errors


def test_ok(mixed):
    assert Results([ok(0), ok(1)]).ok is True
    assert Results(mixed).ok is False
    assert Results([ok(0), failed(1, status="cancelled")]).ok is False
    assert Results(mixed).errors.ok is False
    assert Results(mixed)[4:5].ok is True


def test_counts(mixed):
    assert Results(mixed).counts() == {
        "ok": 3,
        "error": 1,
        "timeout": 1,
        "crashed": 1,
        "cancelled": 1,
    }
    assert Results([ok(0), ok(1), failed(2)]).counts() == {"ok": 2, "error": 1}
    assert Results([failed(0), failed(1)]).counts() == {"error": 2}
    assert Results().counts() == {}


def test_to_records_are_plain_dicts_with_the_field_names(mixed):
    records = Results(mixed).to_records()
    assert isinstance(records, list) and len(records) == len(mixed)
    for record, original in zip(records, mixed, strict=True):
        assert type(record) is dict
        assert list(record) == CONTRACT_FIELDS
        assert record == dataclasses.asdict(original)


def test_to_dataframe(mixed):
    pandas = pytest.importorskip("pandas")
    frame = Results(mixed).to_dataframe()
    assert isinstance(frame, pandas.DataFrame)
    assert list(frame.columns) == CONTRACT_FIELDS
    assert len(frame) == len(mixed)
    assert str(frame["pid"].dtype) == "Int64"
    assert frame["index"].tolist() == [record.index for record in mixed]
    assert frame["status"].tolist() == [record.status for record in mixed]
    assert frame["worker"].tolist() == [record.worker for record in mixed]
    assert frame["pid"].tolist() == [record.pid for record in mixed]
    assert frame["attempts"].tolist() == [record.attempts for record in mixed]
    assert frame["started"].tolist() == [record.started for record in mixed]
    assert frame["finished"].tolist() == [record.finished for record in mixed]
    assert frame["duration"].tolist() == pytest.approx([record.duration for record in mixed])
    for row, record in zip(frame.itertuples(index=False), mixed, strict=True):
        assert row.item == record.item
        if record.status == "ok":
            assert row.value == record.value
            assert pandas.isna(row.error_type) and pandas.isna(row.error)
            assert pandas.isna(row.traceback)
        else:
            assert pandas.isna(row.value)
            assert row.error_type == record.error_type
            assert row.error == record.error
            assert row.traceback == record.traceback


def test_to_dataframe_pid_is_nullable():
    pandas = pytest.importorskip("pandas")
    records = [ok(0), TaskResult(index=1, item=1, status="cancelled", error_type="X", error="y")]
    frame = Results(records).to_dataframe()
    assert str(frame["pid"].dtype) == "Int64"
    assert frame["pid"][0] == 4000
    assert frame["pid"][1] is pandas.NA
    assert frame["started"].isna().tolist() == [False, True]
    assert frame["duration"].isna().tolist() == [False, True]


def test_to_dataframe_of_empty_results():
    pytest.importorskip("pandas")
    frame = Results().to_dataframe()
    assert len(frame) == 0
    assert list(frame.columns) == CONTRACT_FIELDS


def test_pandas_dataframe_of_results_directly(mixed):
    pandas = pytest.importorskip("pandas")
    results = Results(mixed)
    frame = pandas.DataFrame(results)
    assert list(frame.columns) == CONTRACT_FIELDS
    assert list(frame.columns) == list(results.to_dataframe().columns)
    assert len(frame) == len(mixed)
    assert frame["index"].tolist() == [record.index for record in mixed]
    assert frame["status"].tolist() == [record.status for record in mixed]
    assert frame["error"].tolist()[1] == "bad item 1"


# -- raise_errors -----------------------------------------------------------------------


def test_raise_errors_does_nothing_when_all_ok():
    assert Results([ok(0), ok(1)]).raise_errors() is None
    assert Results().raise_errors() is None


def test_raise_errors_raises_a_group_with_one_exception_per_failure(mixed):
    results = Results(mixed)
    with pytest.raises(BaseExceptionGroup) as caught:
        results.raise_errors()
    group = caught.value
    assert isinstance(group, ExceptionGroup)
    assert len(group.exceptions) == 4
    timeout, crashed, cancelled = group.exceptions[1:]
    remote = group.exceptions[0]
    assert isinstance(remote, cellpool.RemoteError)
    assert remote.error_type == "ValueError"
    assert remote.message == "bad item 1"
    assert "ValueError" in str(remote) and "bad item 1" in str(remote)
    assert remote.traceback == mixed[1].traceback
    assert isinstance(timeout, cellpool.TaskTimeout)
    assert "ran past 5 s" in str(timeout)
    assert isinstance(crashed, cellpool.WorkerCrashed)
    assert "exit code -11" in str(crashed)
    assert isinstance(cancelled, cellpool.TaskCancelled)
    assert "4" in str(group) and "7" in str(group)


def test_raise_errors_matches_by_status():
    results = Results([failed(0, status="timeout"), failed(1, status="crashed"), ok(2)])
    with pytest.raises(ExceptionGroup) as caught:
        results.raise_errors()
    kinds = [type(error) for error in caught.value.exceptions]
    assert kinds == [cellpool.TaskTimeout, cellpool.WorkerCrashed]
    matched, rest = caught.value.split(cellpool.TaskTimeout)
    assert matched is not None and len(matched.exceptions) == 1
    assert rest is not None and isinstance(rest.exceptions[0], cellpool.WorkerCrashed)


def test_raise_errors_uses_the_live_exception_when_there_is_one():
    live = KeyError("missing")
    results = Results()
    results._put(0, 0, "a", "ok", 1, None, "t0", 10, 1, 1.0, 2.0)
    results._put(
        1,
        1,
        "b",
        "error",
        None,
        Failure("KeyError", "'missing'", None, live),
        "t0",
        10,
        1,
        1.0,
        2.0,
    )
    with pytest.raises(ExceptionGroup) as caught:
        results.raise_errors()
    assert caught.value.exceptions == (live,)
    # the live exception also survives .errors
    with pytest.raises(ExceptionGroup) as caught:
        results.errors.raise_errors()
    assert caught.value.exceptions == (live,)


def test_raise_errors_of_a_remote_error_without_traceback():
    record = TaskResult(index=0, item=0, status="error", error_type="OSError", error="disk")
    with pytest.raises(ExceptionGroup) as caught:
        Results([record]).raise_errors()
    (error,) = caught.value.exceptions
    assert isinstance(error, cellpool.RemoteError)
    assert (error.error_type, error.message, error.traceback) == ("OSError", "disk", None)


# -- text repr --------------------------------------------------------------------------


def test_repr_summary_and_one_line_per_failure(mixed):
    text = repr(Results(mixed))
    lines = text.splitlines()
    assert "7 tasks" in lines[0]
    for part in ("3 ok", "1 error", "1 timeout", "1 crashed", "1 cancelled"):
        assert part in lines[0]
    assert len(lines) == 1 + 4
    for line, record in zip(lines[1:], Results(mixed).errors, strict=True):
        assert f"[{record.index}]" in line
        assert record.status in line
        assert f"{record.error_type}: {record.error}" in line
        assert f"notebook_cell.py:{100 + record.index} in f{record.index}" in line
        # the innermost frame, not the outer one
        assert "runner.py" not in line
    assert "more" not in text


def test_repr_all_ok_has_only_the_summary():
    text = repr(Results([ok(0), ok(1), ok(2)]))
    assert len(text.splitlines()) == 1
    assert "3 tasks" in text and "3 ok" in text
    assert "error" not in text


def test_repr_shows_five_failures_and_counts_the_rest():
    records = [ok(0)] + [failed(i, error=f"oops number {i}") for i in range(1, 9)]
    text = repr(Results(records))
    lines = text.splitlines()
    assert "9 tasks" in lines[0] and "1 ok" in lines[0] and "8 error" in lines[0]
    failure_lines = [line for line in lines if "ValueError: oops number" in line]
    assert len(failure_lines) == 5
    for i in range(1, 6):
        assert f"oops number {i}" in text
    for i in range(6, 9):
        assert f"oops number {i}" not in text
    assert "3 more" in lines[-1]


def test_repr_six_failures_says_one_more():
    lines = repr(Results([failed(i) for i in range(6)])).splitlines()
    assert len(lines) == 1 + 5 + 1
    assert "1 more" in lines[-1]


def test_repr_exactly_five_failures_says_no_more():
    text = repr(Results([failed(i) for i in range(5)]))
    assert len(text.splitlines()) == 6
    assert "more" not in text


# -- HTML repr --------------------------------------------------------------------------


def test_repr_html_summary_and_failure_rows(mixed):
    results = Results(mixed)
    page = results._repr_html_()
    assert html.escape(results.summary()) in page
    assert "7 tasks" in page
    assert page.count("<table") == 1
    assert page.count("<tr>") == 1 + 4  # header + one per failure
    for record in results.errors:
        assert html.escape(f"{record.error_type}: {record.error}") in page
        where = f"notebook_cell.py:{100 + record.index} in f{record.index}"
        assert html.escape(where) in page
    assert "runner.py" not in page
    assert "more failures" not in page


def test_repr_html_escapes_error_text():
    message = "<script>alert('x')</script>"
    page = Results([failed(0, error=message, error_type="Bad<Type>")])._repr_html_()
    assert "<script>" not in page
    assert "</script>" not in page
    assert "&lt;script&gt;" in page
    assert "Bad&lt;Type&gt;" in page


def test_repr_html_has_at_most_twenty_rows_and_a_more_note():
    records = [failed(i, error=f"failure #{i}#") for i in range(25)] + [ok(25)]
    page = Results(records)._repr_html_()
    assert page.count("<tr>") == 1 + 20
    for i in range(20):
        assert f"failure #{i}#" in page
    for i in range(20, 25):
        assert f"failure #{i}#" not in page
    assert "5 more failures" in page


def test_repr_html_twenty_failures_has_no_more_note():
    page = Results([failed(i) for i in range(20)])._repr_html_()
    assert page.count("<tr>") == 1 + 20
    assert "more failures" not in page


def test_repr_html_no_table_when_all_ok():
    results = Results([ok(0), ok(1)])
    page = results._repr_html_()
    assert "<table" not in page and "<tr" not in page
    assert "2 tasks" in page and "2 ok" in page


# -- large results ----------------------------------------------------------------------

LARGE = 200_000


def test_large_results_filled_out_of_order_come_back_in_position_order():
    positions = list(range(LARGE))
    random.Random(1234).shuffle(positions)
    results = Results()
    failure = Failure("ValueError", "every 1000th", None)
    for position in positions:
        bad = position % 1000 == 7
        results._put(
            position,
            position,
            f"item-{position}",
            "error" if bad else "ok",
            None if bad else position * 2,
            failure if bad else None,
            f"p{position % 4}",
            100 + position % 4,
            1,
            float(position),
            float(position) + 0.5,
        )
    assert len(results) == LARGE
    assert results.counts() == {"ok": LARGE - LARGE // 1000, "error": LARGE // 1000}
    assert [record.index for record in results] == list(range(LARGE))
    assert results.values[:3] == [0, 2, 4]
    assert results.values[7] is None
    for position in (0, 1, 7, 12_345, LARGE - 1):
        record = results[position]
        assert record.index == position
        assert record.item == f"item-{position}"
        assert record.worker == f"p{position % 4}" and record.pid == 100 + position % 4
        assert record.started == pytest.approx(results[0].started + position)
        assert record.duration == 0.5
    errors = results.errors
    assert [record.index for record in errors] == list(range(7, LARGE, 1000))
    assert all(record.error == "every 1000th" for record in errors)


def test_large_results_cost_little_memory_per_record():
    # the payload exists before measuring: only the store's own cost is counted
    items = list(range(LARGE))
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        results = Results(
            TaskResult(
                index=i,
                item=items[i],
                status="ok",
                value=items[i],
                worker="t1",
                pid=4242,
                attempts=1,
                started=1.0,
                finished=2.0,
                duration=1.0,
            )
            for i in range(LARGE)
        )
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(results) == LARGE and results.ok
    assert results[LARGE - 1].item == LARGE - 1
    per_record = (after - before) / LARGE
    assert per_record < 120, f"{per_record:.1f} bytes per record"


def fetch_missing(status):
    response = requests.models.Response()
    response.status_code, response.url, response.reason = status, "http://127.0.0.1/x", "Gone"
    response.raise_for_status()  # raises inside requests: the user's line is this one


def test_where_a_task_failed_is_the_users_line_not_the_librarys():
    results = cellpool.run(fetch_missing, [404, 500], progress="none")
    line = fetch_missing.__code__.co_firstlineno + 3
    expected = f"test_results.py:{line} in fetch_missing"
    assert "requests/models.py" in results[0].traceback  # the whole traceback keeps it
    assert f"({expected})" in repr(results)
    page = results._repr_html_()
    assert f'<code style="white-space:nowrap">{expected}</code>' in page
    assert "white-space:nowrap" in page and "text-align:left" in page  # one line per row
