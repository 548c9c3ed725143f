"""Getting a widget's messages handled while a cell blocks the kernel's main thread.

ipykernel handles shell messages, widget clicks among them, on the thread that runs
cells, so a cell that waits blocks every button (ipywidgets #3468). A kernel with
subshells (ipykernel 7) can route one comm's messages to a subshell, which has its own
thread: the widget stays live with nothing to pump. Older kernels get their queue
pumped from the waiting cell, by jupyter-ui-poll.
"""

from __future__ import annotations

import contextlib
import sys
import threading
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
