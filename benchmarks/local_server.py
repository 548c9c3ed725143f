"""A slow local HTTP/1.1 server for the benchmarks, in a subprocess of its own.

An ``asyncio`` streams server with keep-alive on a free port of 127.0.0.1. It parses
each request's head (and skips its body), and hands the request's target to the
benchmark's ``respond``: a coroutine that waits as long as the benchmark wants and
gives the body and its content type. ``on_connect``, if given, is called for every
connection accepted. The server runs in a subprocess so that it takes no GIL from the
clients: the benchmark script runs itself with ``--serve`` (its ``main`` then calls
``serve_until_stdin_closes``), and ``started_server`` starts that subprocess, reads
the port it prints and stops it at the end. ``child_env`` is the environment for
that subprocess and for the benchmark's variants: without any ``*_proxy`` variable,
so that no request leaves 127.0.0.1.

The benchmarks run as scripts (``python benchmarks/pipelines.py``), so this module is
imported as ``local_server``, found in the script's own directory; it uses only the
standard library, so that a worker process that re-imports the script pays little.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

SERVER_START_TIMEOUT = 10.0  # seconds for the server to say which port it listens on
SERVER_STOP_TIMEOUT = 5.0  # seconds for the server to exit once told to
SERVER_LIFETIME = 3600.0  # the server exits after this long whatever happens
IDLE_TIMEOUT = 60.0  # the server closes a connection idle this long

# (target, first request on its connection) -> (body, content type)
Respond = Callable[[str, bool], Awaitable[tuple[bytes, str]]]


def response(body: bytes, content_type: str, close: bool) -> bytes:
    """A 200 response with ``body``, closing the connection if ``close``."""
    lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def answer(
    respond: Respond, on_connect: Callable[[], None] | None, reader: Any, writer: Any
) -> None:
    """Serve one connection: requests one after the other until the client closes it,
    asks to, or leaves it idle for ``IDLE_TIMEOUT`` seconds."""
    if on_connect is not None:
        on_connect()
    served = 0
    try:
        while True:  # ends at the client's EOF, its "Connection: close" or a timeout
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                return
            except asyncio.TimeoutError:
                return
            request_line, *lines = head.decode("latin-1").split("\r\n")
            _, target, version = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if int(headers.get("content-length") or 0):
                await reader.readexactly(int(headers["content-length"]))
            close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            body, content_type = await respond(target, served == 0)
            served += 1
            writer.write(response(body, content_type, close))
            await writer.drain()
            if close:
                return
    except OSError:
        return
    finally:
        writer.close()


async def serve_until_stdin_closes(
    respond: Respond, on_connect: Callable[[], None] | None = None
) -> None:
    """Listen on a free port of 127.0.0.1, print it, and serve until stdin closes (the
    benchmark ends or dies) or ``SERVER_LIFETIME`` passes."""
    server = await asyncio.start_server(
        lambda reader, writer: answer(respond, on_connect, reader, writer),
        "127.0.0.1",
        0,
        backlog=1024,
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF
        loop.call_soon_threadsafe(stdin_closed.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    async with server:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stdin_closed.wait(), SERVER_LIFETIME)


def child_env() -> dict[str, str]:
    """This environment without proxies, so that every request goes to 127.0.0.1."""
    return {name: value for name, value in os.environ.items() if not name.lower().endswith("proxy")}


@contextlib.contextmanager
def started_server(script: str, env: dict[str, str]) -> Iterator[int]:
    """Start ``python script --serve`` in a subprocess; yield the port it prints; stop it."""
    command = [sys.executable, script, "--serve"]
    server = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        ready, _, _ = select.select([server.stdout], [], [], SERVER_START_TIMEOUT)
        line = server.stdout.readline() if ready else ""  # type: ignore[union-attr]
        if not line.strip().isdigit():
            raise RuntimeError(f"the server did not start within {SERVER_START_TIMEOUT:.0f} s")
        yield int(line)
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        try:
            server.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
