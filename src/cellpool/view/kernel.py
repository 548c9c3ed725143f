"""What a cell that blocks on a run needs from the kernel it runs in.

Widget messages. ipykernel handles shell messages, widget clicks among them, on the
thread that runs cells, so a cell that waits blocks every button (ipywidgets #3468). A
kernel with subshells (ipykernel 7) can route one comm's messages to a subshell, which
has its own thread: the widget stays live with nothing to pump. Older kernels get their
queue pumped from the waiting cell, by jupyter-ui-poll.

The kernel's status. A frontend shows the state of the last ``status`` message on
IOPub, whatever request it answers (JupyterLab skips only a few request types, such as
``kernel_info_request``). While a cell blocks, other requests still get handled and
each ends with ``idle``: JupyterLab's own ``create_subshell_request``, sent when the
first widget of a kernel appears (its ``commsOverSubshells`` setting), a click handled
on a subshell, an event pumped by jupyter-ui-poll. Once a cell shows a live view,
``keep_busy_until_the_cell_ends`` follows each such ``idle`` with a ``busy`` for the
cell, so the kernel reads busy until the cell ends.

Ctrl-C. ``interrupted`` makes the ``KeyboardInterrupt`` a cell shows: the frames of
cellpool and of IPython's magic machinery are left out, as a plain cell's would be.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

_subshells: dict[int, str] = {}  # kernel id -> the subshell cellpool's widgets use
_subshell_lock = threading.Lock()


def current_kernel() -> Any:
    """The running ipykernel, or ``None`` outside one."""
    ipython = sys.modules.get("IPython")  # a kernel has it loaded; elsewhere, do not load it
    return None if ipython is None else getattr(ipython.get_ipython(), "kernel", None)


def _create_subshell(kernel: Any) -> str | None:
    """Ask the kernel for a subshell, as a ``create_subshell_request`` would: on its
    control thread, which owns the channel to the subshell manager."""
    created = threading.Event()
    reply: dict[str, Any] = {}

    def create() -> None:
        try:
            channel = kernel.shell_channel_thread.manager.control_to_shell_channel.from_socket
            channel.send_json({"type": "create"})
            reply.update(channel.recv_json())
        finally:
            created.set()

    kernel.control_thread.io_loop.add_callback(create)
    if not created.wait(5):
        return None
    return reply.get("subshell_id")


def route_to_subshell(widget: Any) -> bool:
    """Have ``widget``'s messages handled on a subshell; False where the kernel has none."""
    kernel = current_kernel()
    if not getattr(kernel, "_supports_kernel_subshells", False):
        return False
    with _subshell_lock:
        subshell = _subshells.get(id(kernel))
        if subshell is None:
            subshell = _create_subshell(kernel)
            if subshell is None:
                return False
            _subshells[id(kernel)] = subshell
    # The comm sends the frontend's messages for it to this subshell (ipykernel's own
    # routing for comms used from a subshell).
    widget.comm._reply_subshell_id = subshell
    return True


@contextlib.contextmanager
def no_events() -> Iterator[Callable[[], None]]:
    """For views whose events need no help: a function that does nothing."""
    yield lambda: None


@contextlib.contextmanager
def pumped_events() -> Iterator[Callable[[], None]]:
    """For kernels without subshells: a function that handles pending UI events."""
    if current_kernel() is None:
        yield lambda: None
        return
    from jupyter_ui_poll import ui_events

    with ui_events() as poll:
        yield lambda: poll(10)


_held: list[dict[str, Any]] = []  # the requests of cells holding the status, newest last
_held_lock = threading.Lock()
_installed: list[Any] = []  # the kernel's _publish_status while cells hold, ours


def keep_busy_until_the_cell_ends() -> None:
    """From now until the running cell ends, every ``idle`` the kernel publishes (for
    another request, handled on another thread) is followed by a ``busy`` for the
    cell; and one ``busy`` goes out at once, for an ``idle`` published just before."""
    kernel = current_kernel()
    publish = getattr(type(kernel), "_publish_status", None)
    shell = getattr(kernel, "shell", None)
    parent = kernel.get_parent("shell") if hasattr(kernel, "get_parent") else None
    if publish is None or shell is None or not parent:
        return  # not an ipykernel of version 6 or later
    if parent["header"].get("msg_type") != "execute_request":
        return  # not a cell (a thread of the user's, say)
    with _held_lock:
        if any(held is parent for held in _held):
            return  # this cell holds already
        if not _held:
            _installed[:] = [types.MethodType(_publishing_busy_after_idle(publish), kernel)]
            kernel._publish_status = _installed[0]
        _held.append(parent)
        publish(kernel, "busy", "shell", parent=parent)

    def release() -> None:
        shell.events.unregister("post_execute", release)
        with _held_lock:
            _held.remove(parent)
            if not _held and vars(kernel).get("_publish_status") is _installed[0]:
                del kernel._publish_status  # the class's again

    # After the cell and before the kernel publishes the cell's own idle.
    shell.events.register("post_execute", release)


def _publishing_busy_after_idle(publish: Callable[..., None]) -> Callable[..., None]:
    def publish_status(kernel: Any, status: str, *args: Any, **kwargs: Any) -> None:
        if status != "idle":
            publish(kernel, status, *args, **kwargs)
            return
        # Under the lock, the busy comes next, before any other status; and a cell that
        # stops holding has its own idle published after both.
        with _held_lock:
            publish(kernel, status, *args, **kwargs)
            if _held:
                publish(kernel, "busy", "shell", parent=_held[-1])

    return publish_status


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def interrupted() -> KeyboardInterrupt:
    """A ``KeyboardInterrupt`` to raise (``from None``) once a run has stopped on
    Ctrl-C. IPython shows it with the caller's own frames only (IPython renders an
    exception through its ``_render_traceback_``): neither cellpool's frames nor
    those of IPython's magic machinery, so a cell shows what a plain cell would."""
    error = KeyboardInterrupt()
    error._render_traceback_ = types.MethodType(_render_traceback, error)  # type: ignore[attr-defined]
    return error


def _render_traceback(error: BaseException) -> list[str]:
    from IPython import get_ipython

    try:
        return get_ipython().InteractiveTB.structured_traceback(  # type: ignore[union-attr]
            type(error), error, _users_frames(error.__traceback__), tb_offset=0
        )
    except Exception:  # never let the display of an interrupt fail
        return ["KeyboardInterrupt"]


def _users_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The frames of ``tb`` below the innermost frame of IPython (the code that ran the
    cell, or a magic), less cellpool's own, as a new traceback."""
    kept: list[types.TracebackType] = []
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if _is_ipythons(filename):
            kept.clear()
        elif not filename.startswith(_PACKAGE):
            kept.append(tb)
        tb = tb.tb_next
    users = None
    for entry in reversed(kept):
        users = types.TracebackType(users, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return users


def _is_ipythons(filename: str) -> bool:
    ipython = sys.modules.get("IPython")
    where = os.path.dirname(getattr(ipython, "__file__", None) or "/nonexistent") + os.sep
    return filename.startswith(where) or filename.startswith("<decorator-gen-")
