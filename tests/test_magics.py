"""%%parallel, %parallel and %parallel_config, in an IPython shell and in a real kernel."""

from __future__ import annotations

import os
import signal
import threading

import nbformat
import pytest
from IPython.core.interactiveshell import InteractiveShell

import cellpool


@pytest.fixture(scope="session")
def ipython():
    """The shell lives for the session (its history database holds fds open)."""
    return InteractiveShell.instance()


@pytest.fixture
def shell(ipython):
    ip = ipython
    ip.run_line_magic("load_ext", "cellpool")
    magics = ip.magics_manager.registry["ParallelMagics"]
    magics.defaults = {"kind": "thread"}
    yield ip
    magics.close()
    ip.user_ns.pop("big", None)


def run(ip, source):
    """Run a cell; return its value, raising what it raised."""
    outcome = ip.run_cell(source)
    outcome.raise_error()
    return outcome.result


def test_a_process_cell_uses_classes_functions_and_globals_from_earlier_cells(shell):
    run(
        shell,
        "class Scaler:\n"
        "    def __init__(self, k):\n"
        "        self.k = k\n"
        "    def apply(self, x):\n"
        "        return self.k * x\n"
        "def helper(x):\n"
        "    return x + 1\n"
        "offset = 100\n",
    )
    results = run(
        shell,
        "%%parallel x in range(-3, 3) -k process -w 2 -o res\n"
        "import os\n"
        "y = helper(x)\n"
        "Scaler(3).apply(y) + offset, os.getpid()\n",
    )
    assert isinstance(results, cellpool.Results)
    assert shell.user_ns["res"] is results
    assert [value for value, _ in results.values] == [94, 97, 100, 103, 106, 109]
    assert os.getpid() not in {pid for _, pid in results.values}


def test_any_for_loop_target_works(shell):
    results = run(
        shell,
        "%%parallel i, (a, b) in enumerate(zip('xy', [10, 20]))\nf'{i}{a}{b}'\n",
    )
    assert results.values == ["0x10", "1y20"]


def test_statements_run_as_written_and_the_last_expression_is_the_value(shell):
    results = run(
        shell,
        "%%parallel x in range(3)\ntotal = 0\nfor k in range(x + 1):\n    total += k\ntotal\n",
    )
    assert results.values == [0, 1, 3]
    assert run(shell, "%%parallel x in range(2)\ny = x * 2\n").values == [None, None]


def test_threads_see_the_live_namespace(shell):
    run(shell, "factor = 7")
    assert run(shell, "%%parallel x in [1, 2]\nx * factor\n").values == [7, 14]


def test_errors_are_records_whose_traceback_points_at_the_cell_body(shell):
    results = run(shell, "%%parallel x in range(4)\ny = x - 2\n1 / y\n")
    failed = results.errors
    assert [r.index for r in failed] == [2]
    assert failed[0].error_type == "ZeroDivisionError"
    assert "line 2, in cell" in failed[0].traceback
    assert "1 / y" in failed[0].traceback
    assert "cellpool" not in failed[0].traceback


def test_the_line_form_runs_an_existing_function(shell):
    run(shell, "def square(v):\n    return v * v\n")
    assert run(shell, "%parallel square range(4) -w 2").values == [0, 1, 4, 9]


def test_background_stores_a_job_and_returns_at_once(shell):
    run(shell, "import threading\ngate = threading.Event()")
    value = run(shell, "%%parallel x in range(3) --background -o job\ngate.wait(10) and x\n")
    assert value is None
    job = shell.user_ns["job"]
    assert isinstance(job, cellpool.Job)
    assert not job.done()
    shell.user_ns["gate"].set()
    assert job.result(timeout=10).values == [0, 1, 2]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("%%parallel x range(3)", "expected 'TARGET in ITERABLE [options]'"),
        ("%%parallel x in range(3) --colour red", "unrecognized arguments: --colour red"),
        ("%%parallel x in range(3) -w zero", "invalid int value: 'zero'"),
        ("%%parallel x in range(3) -w 0", "workers must be an integer >= 1"),
        ("%%parallel x in range(3) -k gpu", "invalid choice: 'gpu'"),
        ("%%parallel x in range(3) --timeout", "expected one argument"),
        ("%%parallel x in undefined_name", "%%parallel: name 'undefined_name' is not defined"),
        ("%%parallel x in 5", "%%parallel: the iterable 5 is an int, not iterable"),
        ("%parallel abs 5", "%parallel: the iterable 5 is an int, not iterable"),
        ("%parallel no_such_fn range(3)", "%parallel: name 'no_such_fn' is not defined"),
        ("%parallel 7 range(3)", "%parallel: the function 7 is an int, not callable"),
    ],
)
def test_malformed_lines_are_one_line_usage_errors(shell, line, words):
    outcome = shell.run_cell(f"{line}\nx\n")
    error = outcome.error_in_exec
    assert type(error).__name__ == "UsageError"
    assert words in str(error)
    assert "\n" not in str(error)


def test_a_label_names_the_run_in_its_view_and_summary(shell):
    run(shell, "import threading\ngate = threading.Event()\ndef square(v):\n    return v * v\n")
    run(
        shell,
        "%%parallel x in range(3) -w 2 --label 'first pass' --background -o job\n"
        "gate.wait(10) and x\n",
    )
    run(shell, "%parallel square range(3) -w 2 --background -o job2 --label squares")
    job, job2 = shell.user_ns["job"], shell.user_ns["job2"]
    assert job._label == "first pass [thread x2]"
    assert job2._label == "squares [thread x2]"
    shell.user_ns["gate"].set()
    assert job.result(timeout=10).values == [0, 1, 2]
    assert job2.result(timeout=10).values == [0, 1, 4]
    # Without a label, the run is named after the cell or the function, as before.
    run(shell, "%%parallel x in range(2) -w 2 --background -o job3\nx")
    assert shell.user_ns["job3"]._label == "%%parallel [thread x2]"
    shell.user_ns["job3"].result(timeout=10)


def test_a_label_is_for_one_run_so_parallel_config_rejects_it(shell):
    error = shell.run_cell("%parallel_config -w 2 --label nightly").error_in_exec
    assert type(error).__name__ == "UsageError"
    assert "unrecognized arguments: --label nightly" in str(error)
    assert run(shell, "%parallel_config") == {"kind": "thread"}  # unchanged
    error = shell.run_cell("%%parallel x in range(2) --label\nx").error_in_exec
    assert type(error).__name__ == "UsageError"
    assert "--label: expected one argument" in str(error)
    assert "--label TEXT" in shell.find_cell_magic("parallel").__doc__


def test_the_line_form_reports_a_malformed_line(shell):
    error = shell.run_cell("%parallel square").error_in_exec
    assert type(error).__name__ == "UsageError"
    assert "expected 'FN ITERABLE [options]'" in str(error)


def test_parallel_config_sets_and_shows_the_session_defaults(shell):
    assert run(shell, "%parallel_config") == {"kind": "thread"}
    run(shell, "%parallel_config -k process -w 2 --retries 1")
    assert run(shell, "%parallel_config") == {"kind": "process", "workers": 2, "retries": 1}
    first = run(shell, "%%parallel x in range(4)\nimport os\nos.getpid()\n").values
    second = run(shell, "%%parallel x in range(4)\nimport os\nos.getpid()\n").values
    executors = list(shell.magics_manager.registry["ParallelMagics"]._executors.values())
    assert len(executors) == 1  # one warm pool serves both cells
    assert executors[0].kind == "process" and executors[0].workers == 2
    workers = {row["pid"] for row in executors[0].workers_info()}
    assert set(first) | set(second) <= workers
    assert os.getpid() not in workers


def test_an_unrelated_large_object_is_not_shipped_to_process_workers(shell):
    shell.user_ns["big"] = bytearray(200 * 2**20)
    shell.user_ns["small"] = 5
    results = run(
        shell,
        "%%parallel x in range(2) -k process -w 1\n"
        "import psutil\n"
        "'big' in globals(), small + x, psutil.Process().memory_info().rss\n",
    )
    for has_big, _, rss in results.values:
        assert has_big is False
        assert rss < 100 * 2**20
    assert [value for _, value, _ in results.values] == [5, 6]


def test_an_interrupt_stores_the_partial_results_before_propagating(shell):
    run(shell, "import threading\ngate = threading.Event()")
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    outcome = shell.run_cell("%%parallel x in range(6) -w 2 -o partial\ngate.wait(20) and x\n")
    shell.user_ns["gate"].set()
    assert isinstance(outcome.error_in_exec, KeyboardInterrupt)
    # What IPython shows for it: no frame of cellpool's or of the magic machinery.
    shown = "\n".join(outcome.error_in_exec._render_traceback_())
    assert "KeyboardInterrupt" in shown
    assert os.path.dirname(cellpool.__file__) not in shown and "File " not in shown
    partial = shell.user_ns["partial"]
    assert isinstance(partial, cellpool.Results)
    assert len(partial) == 6
    assert {r.status for r in partial} == {"cancelled"}


def test_cells_in_a_real_kernel(kernel_clients):
    cells = [
        "%load_ext cellpool",
        "class Box:\n    def __init__(self, v):\n        self.v = v\n"
        "def unbox(b):\n    return b.v\nbase = 10",
        "%%parallel i, c in enumerate('abc') -k process -w 2 -o res\nunbox(Box(base)) + i",
        "res.values",
        "%%parallel x in range(3) -w 2 --background -o job\nx * 2",
        "job.result(timeout=30).values",
        "%%parallel x in range(3) --bogus\nx",
        "%%parallel x in range(3) -w 2 --background --label 'first pass' -o job2\nx * 3",
        "job2.result(timeout=30).values",
    ]
    outputs = kernel_clients(cells)

    def result(i, mime="text/plain"):
        (out,) = [o for o in outputs[i] if o["output_type"] == "execute_result"]
        return out["data"][mime]

    def shown(i):
        return [o["data"]["text/plain"] for o in outputs[i] if o["output_type"] == "display_data"]

    assert "3 tasks: 3 ok" in result(2)
    assert "cellpool" in result(2, "text/html")
    assert shown(2) == []  # it ended before the live view is due
    assert result(3) == "[10, 11, 12]"
    # A background job shows its view at once, and room for its summary and timeline
    # (their updates are checked in test_live_view: nbclient keeps only some of them).
    view, summary, _picture = shown(4)
    assert view == "cellpool live view: %%parallel [thread x2]"
    assert summary.startswith("%%parallel [thread x2]")
    assert result(5) == "[0, 2, 4]"
    assert outputs[6] == [
        nbformat.NotebookNode(
            output_type="stream",
            name="stderr",
            text="UsageError: %%parallel: unrecognized arguments: --bogus\n",
        )
    ]
    view, summary, _picture = shown(7)  # the label names the run in both
    assert view == "cellpool live view: first pass [thread x2]"
    assert summary.startswith("first pass [thread x2]")
    assert result(8) == "[0, 3, 6]"


def test_a_journaled_cell_run_again_restores_what_was_done(shell, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default journal is under the working directory
    run(shell, "ran = []")
    body = "%%parallel x in range(6) --journal squares -o first --no-progress\nran.append(x)\nx * x"
    first = run(shell, body)
    assert first.values == [0, 1, 4, 9, 16, 25]
    assert sorted(shell.user_ns["ran"]) == list(range(6))
    again = run(shell, body.replace("first", "second").replace("range(6)", "range(8)"))
    assert again.values == [x * x for x in range(8)]
    assert sorted(shell.user_ns["ran"]) == [*range(6), 6, 7]  # only the two new inputs ran
    assert sum(record.restored for record in again) == 6
    runs = run(shell, "%parallel_journal")
    assert list(runs["name"]) == ["squares"] and list(runs["ok"]) == [8]
    assert len(run(shell, "%parallel_journal --forget squares")) == 0
    refused = shell.run_cell("%parallel_config --journal squares").error_in_exec
    assert type(refused).__name__ == "UsageError"  # a journal names one run, not a session
