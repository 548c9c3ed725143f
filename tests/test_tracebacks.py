"""Tracebacks from worker processes and dask workers name the task's own files and lines.

cloudpickle ships notebook functions by value (from 3.1 on, with ``co_filename =
"<dynamic-code>"``), and a cell's source lives only in the notebook's ``linecache``:
``cellpool.shipping.ship`` carries both across.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import linecache
import os.path
import pickle
import subprocess
import sys
import threading
import uuid

import cloudpickle
import pytest

from cellpool import Executor
from cellpool.shipping import Shipped, pack, ship, unpack

# fn(0) fails in helper (line 5), called from task (line 10)
SOURCE = """\
import math


def helper(x):
    return math.sqrt(x)


def task(x):
    y = x - 2
    return helper(y) + 1


class Model:
    def predict(self, x):
        return task(x)
"""
HELPER_LINE = (5, "return math.sqrt(x)")
TASK_LINE = (10, "return helper(y) + 1")


def frame(filename: str, line: tuple[int, str], name: str) -> str:
    """A traceback's lines for one frame, source line included."""
    number, text = line
    return f'  File "{filename}", line {number}, in {name}\n    {text}\n'


def assert_points_at_source(traceback: str, filename: str) -> None:
    assert frame(filename, TASK_LINE, "task") in traceback, traceback
    assert frame(filename, HELPER_LINE, "helper") in traceback, traceback
    assert "<dynamic-code>" not in traceback


@pytest.fixture
def cell(tmp_path):
    """``SOURCE`` run as a notebook cell would be: compiled under a file name that
    exists only in this process's linecache, in a ``__main__`` namespace."""
    filename = str(tmp_path / "ipykernel_4242" / "1234567.py")  # never written
    linecache.cache[filename] = (len(SOURCE), None, SOURCE.splitlines(True), filename)
    namespace = {"__name__": "__main__"}
    exec(compile(SOURCE, filename, "exec"), namespace)
    yield namespace, filename
    linecache.cache.pop(filename, None)


@pytest.fixture
def module(tmp_path):
    """``SOURCE`` as a module file loaded by path and registered to pickle by value."""
    name = f"cellpool_shipped_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(SOURCE)
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    cloudpickle.register_pickle_by_value(loaded)
    yield vars(loaded), str(path)
    cloudpickle.unregister_pickle_by_value(loaded)
    del sys.modules[name]


@pytest.fixture(params=["cell", "module"])
def source(request):
    return request.getfixturevalue(request.param)


FRESH_INTERPRETER = """
import pickle, sys, traceback
data = sys.stdin.buffer.read()
if sys.argv[1:] == ["packed"]:
    from cellpool.shipping import unpack
    fn = unpack(data)
else:
    fn = pickle.loads(data)
try:
    fn(0)
except Exception:
    print(traceback.format_exc())
print(sorted(name for name in sys.modules if name.startswith("cellpool")))
"""


def in_fresh_interpreter(payload: bytes, *how: str) -> str:
    """Unpickle ``payload`` in a new interpreter (``unpack`` it if ``"packed"``), call it
    with 0: the traceback, then the cellpool modules that loading imported."""
    done = subprocess.run(
        [sys.executable, "-c", FRESH_INTERPRETER, *how],
        input=payload,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda ns: ns["task"],
        lambda ns: functools.partial(ns["task"]),
        lambda ns: ns["Model"]().predict,
    ],
    ids=["function", "partial", "bound-method"],
)
def test_a_shipped_function_keeps_its_file_and_lines_in_a_fresh_interpreter(source, wrap):
    namespace, filename = source
    shipped = ship(wrap(namespace))
    assert isinstance(shipped, Shipped)
    out = in_fresh_interpreter(cloudpickle.dumps(shipped))
    assert_points_at_source(out, filename)
    assert "ValueError: math domain error" in out
    # loading imports the one small module, not the executor
    assert out.rstrip().endswith("['cellpool', 'cellpool.shipping']")


def test_packed_bytes_unpack_with_the_file_and_lines_in_a_fresh_interpreter(source):
    namespace, filename = source
    out = in_fresh_interpreter(pack(namespace["Model"]().predict), "packed")
    assert_points_at_source(out, filename)
    assert frame(filename, (15, "return task(x)"), "predict") in out


def test_without_it_a_cell_loses_its_source_lines(cell):
    namespace, _ = cell
    out = in_fresh_interpreter(cloudpickle.dumps(namespace["task"]))
    assert "line 10, in task" in out
    assert "return helper(y) + 1" not in out  # what ship is for


def test_a_shipped_function_unpickles_as_the_function_itself(cell):
    namespace, _ = cell
    fn = pickle.loads(cloudpickle.dumps(ship(namespace["task"])))
    assert type(fn).__name__ == "function" and fn(6) == 3.0
    assert ship(namespace["task"])(11) == 4.0  # and calls through before it travels
    assert unpack(pack(namespace["task"]))(6) == 3.0
    assert unpack(pack(len)) is len


def test_functions_pickled_by_reference_are_left_alone():
    join = functools.partial(os.path.join, "a")
    assert ship(len) is len
    assert ship(json.dumps) is json.dumps
    assert ship(join) is join
    assert ship(frame) is frame  # a test module: importable by the worker


def test_a_function_that_cannot_be_pickled_fails_as_it_would_unshipped():
    lock = threading.Lock()

    def locked(x):
        with lock:
            return x

    with pytest.raises(TypeError, match="lock"):
        cloudpickle.dumps(ship(locked))


def run_and_fail(executor: Executor, fn) -> str:
    results = executor.run(fn, [3, 0])
    assert results[0].status == "ok"
    assert results[1].status == "error" and results[1].error_type == "ValueError"
    return results[1].traceback


def test_process_worker_tracebacks_name_cells_and_modules(cell, module):
    with Executor("process", 1, progress="none") as ex:
        for namespace, filename in (cell, module):
            assert_points_at_source(run_and_fail(ex, namespace["task"]), filename)


def test_dask_worker_tracebacks_name_cells_and_modules(cell, module):
    pytest.importorskip("distributed")
    with Executor("dask", 1, progress="none") as ex:
        for namespace, filename in (cell, module):
            assert_points_at_source(run_and_fail(ex, namespace["task"]), filename)
            assert_points_at_source(run_and_fail(ex, namespace["Model"]().predict), filename)


# %%parallel: the shell is made once per session, as in test_magics.py (its history
# database holds fds open)
@pytest.fixture(scope="session")
def ipython():
    from IPython.core.interactiveshell import InteractiveShell

    return InteractiveShell.instance()


@pytest.fixture
def shell(ipython):
    ipython.run_line_magic("load_ext", "cellpool")
    magics = ipython.magics_manager.registry["ParallelMagics"]
    magics.defaults = {"kind": "thread"}
    yield ipython
    magics.close()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_parallel_cell_tracebacks_name_the_body_and_earlier_cells(shell, kind):
    shell.run_cell("def shrink(v):\n    return 10 // v\n").raise_error()
    helper_file = shell.user_ns["shrink"].__code__.co_filename
    outcome = shell.run_cell(f"%%parallel x in range(3) -k {kind} -w 1\ny = x - 1\nshrink(y)\n")
    outcome.raise_error()
    (failed,) = outcome.result.errors
    assert failed.index == 1 and failed.error_type == "ZeroDivisionError"
    assert ", line 2, in cell\n    shrink(y)\n" in failed.traceback
    assert f'  File "{helper_file}", line 2, in shrink\n    return 10 // v\n' in failed.traceback
    assert "<dynamic-code>" not in failed.traceback
