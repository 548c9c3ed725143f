"""The worker's stdout/stderr stand-in: whole lines to the parent, a real fd for the rest."""

from __future__ import annotations

import faulthandler
import io
import logging
import subprocess
import sys
import threading
import traceback

import pytest

from cellpool.streams import PENDING_MAX, ForwardedStream


@pytest.fixture
def sent():
    return []


@pytest.fixture
def stream(sent):
    stream = ForwardedStream(sent.append, "stdout", 1)
    yield stream
    stream.close()


def texts(sent):
    assert all(kind == "out" and name == "stdout" for kind, name, _ in sent)
    return [text for _, _, text in sent]


def test_it_is_a_write_only_text_stream(stream):
    assert isinstance(stream, io.TextIOBase)
    assert isinstance(stream, io.IOBase)
    assert isinstance(stream.buffer, io.BufferedIOBase)
    assert (stream.readable(), stream.writable(), stream.seekable()) == (False, True, False)
    assert (stream.buffer.readable(), stream.buffer.writable()) == (False, True)
    assert stream.isatty() is False and stream.buffer.isatty() is False
    assert stream.encoding == "utf-8"
    assert stream.errors == "backslashreplace"
    assert stream.name == "<stdout>"
    assert stream.fileno() == 1 and stream.buffer.fileno() == 1
    with pytest.raises(io.UnsupportedOperation):
        stream.read()
    with pytest.raises(io.UnsupportedOperation):
        stream.buffer.read()


def test_whole_lines_are_sent_and_a_partial_line_waits(stream, sent):
    assert stream.write("a") == 1
    assert stream.write("b\nc") == 3
    assert texts(sent) == ["ab\n"]
    stream.write("d\ne\nf")
    assert texts(sent) == ["ab\n", "cd\ne\n"]
    stream.flush()
    assert texts(sent) == ["ab\n", "cd\ne\n", "f"]
    stream.flush()  # nothing pending: nothing sent
    assert len(sent) == 3


def test_print_sends_one_message_per_line(stream, sent):
    print("hello", "world", file=stream)
    print("é ✓", file=stream)
    assert texts(sent) == ["hello world\n", "é ✓\n"]


def test_a_long_line_is_sent_once_it_passes_the_limit(stream, sent):
    for _ in range(PENDING_MAX):
        stream.write(".")
    assert sent == []
    stream.write(".")
    assert texts(sent) == ["." * (PENDING_MAX + 1)]


def test_writelines_sends_the_lines_together(stream, sent):
    stream.writelines(["one\n", "two\n", "thr"])
    stream.writelines(iter(["ee\n"]))
    assert texts(sent) == ["one\ntwo\n", "three\n"]
    with pytest.raises(TypeError):
        stream.writelines([b"bytes\n"])


def test_write_takes_text_only(stream):
    with pytest.raises(TypeError, match="must be str, not bytes"):
        stream.write(b"x")


def test_buffer_bytes_are_decoded_even_split_inside_a_character(stream, sent):
    data = "né ✓\n".encode()
    assert stream.buffer.write(data[:2]) == 2  # "n" and half of "é"
    assert stream.buffer.write(data[2:5]) == 3  # the rest of "é", " ", half of "✓"
    assert sent == []
    assert stream.buffer.write(memoryview(data[5:])) == len(data) - 5
    assert texts(sent) == ["né ✓\n"]


def test_buffer_and_text_writes_keep_their_order(stream, sent):
    stream.write("text ")
    stream.buffer.write(b"bytes ")
    stream.write("text\n")
    stream.buffer.write(bytearray(b"more\n"))
    assert texts(sent) == ["text bytes text\n", "more\n"]
    with pytest.raises(TypeError):
        stream.buffer.write("str")


def test_bad_bytes_and_lone_surrogates_are_escaped(stream, sent):
    stream.buffer.write(b"\xff\xfe ok\n")
    stream.write("\udcff\n")
    assert texts(sent) == ["\\xff\\xfe ok\n", "\\udcff\n"]


def test_close_flushes_then_refuses_writes_but_leaves_the_fd_open(sent):
    stream = ForwardedStream(sent.append, "stderr", 2)
    stream.write("last words")
    stream.buffer.write("✓".encode()[:2])  # an unfinished character
    assert not stream.closed and not stream.buffer.closed
    stream.close()
    assert stream.closed and stream.buffer.closed
    assert sent == [("out", "stderr", "last words\\xe2\\x9c")]
    with pytest.raises(ValueError, match="closed file"):
        stream.write("x")
    with pytest.raises(ValueError, match="closed file"):
        print("x", file=stream)
    with pytest.raises(ValueError, match="closed file"):
        stream.buffer.write(b"x")
    with pytest.raises(ValueError, match="closed file"):
        stream.fileno()
    stream.flush()  # a no-op: the worker flushes after every batch
    stream.close()  # again: nothing more
    assert len(sent) == 1
    sys.stderr.flush()  # fd 2 itself is still open
    assert sys.__stderr__.fileno() == 2


def test_closing_the_buffer_closes_the_stream(stream, sent):
    stream.write("pending")
    stream.buffer.close()
    assert stream.closed
    assert texts(sent) == ["pending"]


def test_as_a_context_manager_it_closes(sent):
    with ForwardedStream(sent.append, "stdout", 1) as stream:
        stream.write("x")
    assert stream.closed
    assert texts(sent) == ["x"]


def test_a_subprocess_writes_to_the_fd_directly(stream, sent, capfd):
    subprocess.run(["echo", "hi"], stdout=stream, check=True)
    subprocess.run(["echo", "bytes"], stdout=stream.buffer, check=True)
    assert capfd.readouterr().out == "hi\nbytes\n"
    assert sent == []


def test_faulthandler_writes_to_the_fd(capfd):
    stream = ForwardedStream([].append, "stderr", 2)
    faulthandler.dump_traceback(file=stream, all_threads=False)
    assert "test_faulthandler_writes_to_the_fd" in capfd.readouterr().err
    stream.close()


def test_faulthandler_can_be_enabled_on_it():
    # In a child: enabling replaces whatever faulthandler pytest set up in this process.
    code = (
        "import faulthandler, sys\n"
        "from cellpool.streams import ForwardedStream\n"
        "sent = []\n"
        "sys.stderr = ForwardedStream(sent.append, 'stderr', 2)\n"
        "faulthandler.enable()\n"
        "assert faulthandler.is_enabled()\n"
        "faulthandler.dump_traceback()\n"
        "print('fine', file=sys.stderr)\n"
        "sys.stderr.flush()\n"
        "assert sent == [('out', 'stderr', 'fine\\n')], sent\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert child.returncode == 0, child.stderr
    assert "Current thread" in child.stderr  # the dump went to fd 2, not through send
    assert "fine" not in child.stderr


def test_logging_and_tracebacks_can_use_it(stream, sent):
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("cellpool-test-streams")
    logger.addHandler(handler)
    try:
        logger.warning("careful")
    finally:
        logger.removeHandler(handler)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        traceback.print_exc(file=stream)
    assert texts(sent)[0] == "careful\n"
    assert "ZeroDivisionError" in "".join(texts(sent)[1:])


def test_lines_written_from_threads_arrive_whole(stream, sent):
    def chatter(n):
        for i in range(200):
            stream.write(f"thread {n} line {i}\n")

    threads = [threading.Thread(target=chatter, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = "".join(texts(sent)).splitlines()
    assert sorted(lines) == sorted(f"thread {n} line {i}" for n in range(4) for i in range(200))
    for n in range(4):
        mine = [line for line in lines if line.startswith(f"thread {n} ")]
        assert mine == [f"thread {n} line {i}" for i in range(200)]
