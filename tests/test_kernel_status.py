"""What a real kernel tells its frontend while a cell blocks on a run: its status, and
the traceback of Ctrl-C."""

from __future__ import annotations

import os
import queue
import re
import time

import pytest
from jupyter_client.manager import start_new_kernel
from jupyter_server.services.kernels.kernelmanager import MappingKernelManager

from .conftest import iopub_messages, settle

LIVE_RUN = (
    "import time, cellpool\n"
    "r = cellpool.run(time.sleep, [0.4] * 6, workers=2, progress='widget')\n"
    "r.counts()"
)
# The requests whose status JupyterLab leaves out of the kernel's status: the server
# hands it this list (its page config's untracked_message_types).
UNTRACKED = set(MappingKernelManager.class_traits()["untracked_message_types"].default())


@pytest.fixture
def kernel(kernel_clients):
    manager, client = start_new_kernel(kernel_name="python3", env=dict(os.environ))
    yield manager, client
    client.stop_channels()
    manager.shutdown_kernel(now=True)
    settle(lambda: manager.is_alive())


def displayed_status(statuses: list[dict]) -> list[str]:
    """The kernel's status as JupyterLab shows it after each status message: the state
    of the last one, unless it answers an untracked request type."""
    shown, states = "idle", []
    for msg in statuses:
        if msg["parent_header"].get("msg_type") not in UNTRACKED:
            shown = msg["content"]["execution_state"]
        states.append(shown)
    return states


def run_as_jupyterlab(client, code: str, ask_late: bool = False) -> tuple[list[dict], dict]:
    """Execute ``code`` as JupyterLab would: the first widget comm of the kernel makes
    it ask for a subshell for widget comms (its ``commsOverSubshells`` default). Asked
    at once, or with ``ask_late`` once the view updates (in a browser, the request comes
    a few tenths of a second after the comm). The status messages from the cell's
    ``busy`` to its ``idle``, and the ``execute_reply``."""
    msg_id = client.execute(code)
    statuses: list[dict] = []
    subshell_asked = None
    opened = view_shown = False
    for msg in iopub_messages(client):
        kind, content = msg["msg_type"], msg["content"]
        opened = opened or (kind == "comm_open" and content["target_name"] == "jupyter.widget")
        view_shown = view_shown or kind == "display_data"
        due = view_shown and kind == "comm_msg" if ask_late else opened
        if due and subshell_asked is None:
            request = client.session.msg("create_subshell_request", {})
            client.control_channel.send(request)
            subshell_asked = request["header"]["msg_id"]
        if kind == "status" and (statuses or msg["parent_header"].get("msg_id") == msg_id):
            statuses.append(msg)
            ended = content["execution_state"] == "idle"
            if ended and msg["parent_header"].get("msg_id") == msg_id:
                break
    assert subshell_asked is not None
    reply = client.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    created = client.get_control_msg(timeout=10)
    assert created["msg_type"] == "create_subshell_reply"
    assert created["content"]["status"] == "ok"
    # The frontend's request itself got its idle: its future waits for it.
    answered = [m for m in statuses if m["parent_header"].get("msg_id") == subshell_asked]
    assert [m["content"]["execution_state"] for m in answered] == ["busy", "idle"]
    return statuses, reply


def assert_busy_until_the_cell_ends(statuses: list[dict]) -> None:
    """Busy after every status message but the cell's last, its own idle. The idle of
    a request handled on another thread must be undone by the very next status message,
    a busy for the cell: JupyterLab handles both in one go."""
    shown = displayed_status(statuses)
    states = [
        (m["parent_header"].get("msg_type"), m["content"]["execution_state"]) for m in statuses
    ]
    assert shown[-1] == "idle"
    for i, state in enumerate(shown[:-1]):
        if state == "idle":
            assert shown[i + 1] == "busy", states
            assert statuses[i + 1]["parent_header"] == statuses[0]["parent_header"], states


BACKGROUND_JOB_THEN_WORK = (
    "import time, cellpool\n"
    "ex = cellpool.Executor('thread', 2)\n"
    "job = ex.start(time.sleep, [0.4] * 6)\n"
    "time.sleep(1.5)\n"
    "job.result().counts()"
)


def test_the_first_live_run_in_a_kernel_keeps_it_busy_until_the_cell_ends(kernel):
    _manager, client = kernel
    statuses, reply = run_as_jupyterlab(client, LIVE_RUN)
    assert reply["content"]["status"] == "ok"
    assert_busy_until_the_cell_ends(statuses)


@pytest.mark.parametrize("code", [LIVE_RUN, BACKGROUND_JOB_THEN_WORK], ids=["run", "start"])
def test_the_kernel_stays_busy_when_the_frontend_asks_for_its_subshell_late(kernel, code):
    _manager, client = kernel
    statuses, reply = run_as_jupyterlab(client, code, ask_late=True)
    assert reply["content"]["status"] == "ok"
    assert_busy_until_the_cell_ends(statuses)


def test_a_later_request_gets_no_stray_busy(kernel):
    """Once the cell has ended, an idle for another request is left alone."""
    _manager, client = kernel
    statuses, _reply = run_as_jupyterlab(client, LIVE_RUN)
    first = statuses[0]["parent_header"]["msg_id"]
    request = client.session.msg("create_subshell_request", {})
    client.control_channel.send(request)
    asked = request["header"]["msg_id"]
    seen: list[tuple[str, str]] = []
    while ("idle", asked) not in seen:
        msg = client.get_iopub_msg(timeout=10)
        if msg["msg_type"] == "status":
            seen.append((msg["content"]["execution_state"], msg["parent_header"].get("msg_id")))
    assert client.get_control_msg(timeout=10)["content"]["status"] == "ok"
    with pytest.raises(queue.Empty):
        while True:
            msg = client.get_iopub_msg(timeout=0.5)
            assert msg["parent_header"].get("msg_id") != first


ANSI = re.compile(r"\x1b\[[0-9;]*m")
CELLPOOL_FILES = os.path.dirname(os.path.abspath(__import__("cellpool").__file__))


def interrupt_during(manager, client, code: str) -> tuple[dict, dict]:
    """Execute ``code``, interrupt the kernel once the run is under way (its live view
    shows, half a second in); the ``error`` message and the ``execute_reply``."""
    msg_id = client.execute(code)
    error = None
    interrupted = False
    while True:
        msg = client.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "display_data" and not interrupted:
            manager.interrupt_kernel()
            interrupted = True
        if msg["msg_type"] == "error":
            error = msg["content"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    reply = client.get_shell_msg(timeout=10)
    assert error is not None
    return error, reply


def evaluate(client, expression: str) -> str:
    msg_id = client.execute(expression)
    while True:
        msg = client.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_result":
            client.get_shell_msg(timeout=10)
            return msg["content"]["data"]["text/plain"]


def assert_a_plain_interrupt(error: dict, *users_lines: str) -> None:
    text = ANSI.sub("", "\n".join(error["traceback"]))
    assert error["ename"] == "KeyboardInterrupt"
    assert CELLPOOL_FILES not in text, text
    assert "File " not in text, text  # no frame of any module, the cell's alone
    assert "During handling" not in text and "skipping hidden" not in text, text
    for line in users_lines:
        assert line in text, text
    assert text.count("Cell In[") == (1 if users_lines else 0), text  # the cell alone


def test_ctrl_c_during_a_run_shows_a_plain_keyboard_interrupt(kernel):
    manager, client = kernel
    evaluate(client, "import time, cellpool\ndone = []\n1")
    code = (
        "def slow(x):\n"
        "    time.sleep(0.5)\n"
        "    done.append(x)\n"
        "res = cellpool.run(slow, range(20), workers=2)"
    )
    started = time.monotonic()
    error, reply = interrupt_during(manager, client, code)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert_a_plain_interrupt(error, "Cell In[2], line 4", "res = cellpool.run(")
    # The run was cancelled, as before: by the time it would have ended (5 s), the
    # tasks not started when Ctrl-C came have not run.
    time.sleep(max(0.0, 6 - (time.monotonic() - started)))
    assert int(evaluate(client, "len(done)")) < 12
    assert evaluate(client, "'res' in dir()") == "False"


def test_ctrl_c_in_a_parallel_cell_shows_a_plain_keyboard_interrupt(kernel):
    manager, client = kernel
    evaluate(client, "%load_ext cellpool\nimport time\n1")
    code = "%%parallel x in range(20) -w 2 -o part\ntime.sleep(0.5)\nx"
    error, reply = interrupt_during(manager, client, code)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert_a_plain_interrupt(error)
    assert "magics" not in ANSI.sub("", "\n".join(error["traceback"]))
    counts = eval(evaluate(client, "len(part), part.counts()"))
    assert counts[0] == 20
    assert counts[1].get("cancelled", 0) >= 10
