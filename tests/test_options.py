"""Bad options are one-line errors naming the option and the value, before any worker starts."""

from __future__ import annotations

import math

import pytest

from cellpool import Executor, options

NAN, INF = math.nan, math.inf


def one_line_error(error_type, call, *args, match, **kwargs):
    """The message of the error ``call`` must raise: one line matching ``match``."""
    with pytest.raises(error_type, match=match) as caught:
        made = call(*args, **kwargs)
        if isinstance(made, Executor):  # it should have raised: stop its workers
            made.shutdown()
    assert "\n" not in str(caught.value)
    return str(caught.value)


# -- byte sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (2_000_000_000, 2_000_000_000),
        (2e9, 2_000_000_000),
        ("1", 1),
        ("1B", 1),
        ("1.5e3 b", 1500),
        ("512MB", 512 * 10**6),
        (" 2 GiB ", 2 * 2**30),
        ("1.5KiB", 1536),
        (".5kb", 500),
        ("0.1GiB", 107374182),  # a size in a unit above bytes is rounded down
        (options.MAX_BYTES, options.MAX_BYTES),
        (None, None),
    ],
)
def test_good_sizes(value, expected):
    assert options.byte_size("memory_limit", value) == expected
    assert type(options.byte_size("memory_limit", value)) is type(expected)


@pytest.mark.parametrize(
    "value",
    [0.5, "0.5", "0.5B", "0.0001KB", 0, "0", -5, "-5", 1.5, "1.5B", NAN, INF, -INF,
     "nan", "inf", "lots", "2XB", "", "GB", "1 2GB"],
)  # fmt: skip
def test_sizes_must_be_whole_bytes_of_at_least_one(value):
    message = one_line_error(
        ValueError, options.byte_size, "memory_limit", value, match="^memory_limit must be "
    )
    assert message.endswith(f"got {value!r}")
    assert "whole number of bytes >= 1" in message


@pytest.mark.parametrize(
    "value", ["1e400", "1e999999999", 10**400, 1e300, "8388608TiB", "10000000TB"]
)
def test_sizes_beyond_any_machine_are_an_error_not_an_overflow(value):
    one_line_error(
        ValueError,
        options.byte_size,
        "memory_limit",
        value,
        match=r"must be at most \d+ bytes \(8 EiB\); got ",
    )


@pytest.mark.parametrize("value", [True, False, [1], b"1GB", 1j])
def test_a_size_of_the_wrong_type_is_a_type_error(value):
    one_line_error(TypeError, options.byte_size, "memory_limit", value, match="^memory_limit ")


@pytest.mark.parametrize("value", [0.5, "0.5B", "1e400", NAN, INF, -1, True])
def test_executor_rejects_a_bad_memory_limit(value):
    one_line_error(
        (ValueError, TypeError), Executor, "thread", 1, memory_limit=value, match="memory_limit"
    )


# -- min_available_memory ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (0.0, 0.0),
        (0.1, 0.1),
        (0.999, 0.999),
        (1, 1),
        (1.0, 1),  # a whole float of 1 or more is bytes
        (2e9, 2_000_000_000),
        (2_000_000_000, 2_000_000_000),
        ("2GB", 2_000_000_000),
    ],
)
def test_min_available_memory_is_a_fraction_under_one_or_bytes(value, expected):
    got = options.fraction_or_bytes("min_available_memory", value)
    assert got == expected
    assert type(got) is type(expected)  # the admission check tells them apart by type


def test_a_float_over_one_that_is_not_whole_is_ambiguous():
    message = one_line_error(
        ValueError,
        Executor,
        "thread",
        1,
        min_available_memory=1.5,
        match=r"^min_available_memory=1\.5 is ambiguous",
    )
    assert "'1.5GB'" in message


@pytest.mark.parametrize("value", [NAN, INF, -0.1, -1, "0.5B", "-1GB", "lots"])
def test_bad_min_available_memory(value):
    message = one_line_error(
        ValueError,
        options.fraction_or_bytes,
        "min_available_memory",
        value,
        match="^min_available_memory must be a fraction of total memory in",
    )
    assert message.endswith(f"got {value!r}")


@pytest.mark.parametrize("value", [True, None, [0.1]])
def test_min_available_memory_of_the_wrong_type(value):
    one_line_error(
        TypeError, Executor, "thread", 1, min_available_memory=value, match="min_available_memory"
    )


# -- fractions, counts, seconds --------------------------------------------------------


@pytest.mark.parametrize("name", ["memory_pause", "fd_pause"])
@pytest.mark.parametrize("value", [NAN, 0, 0.0, -0.5, 1.01, INF])
def test_pauses_are_fractions_in_zero_one(name, value):
    message = one_line_error(
        ValueError, Executor, "thread", 1, **{name: value}, match=rf"^{name} must be a fraction"
    )
    assert message.endswith(f"got {value!r}")


def test_good_fractions():
    assert options.fraction("memory_pause", 1) == 1.0
    assert options.fraction("memory_pause", 0.5) == 0.5
    one_line_error(TypeError, options.fraction, "fd_pause", "0.5", match="^fd_pause ")


@pytest.mark.parametrize("name", ["workers", "max_pending", "concurrency", "fd_limit"])
@pytest.mark.parametrize("value", [0, -1])
def test_counts_must_be_at_least_one(name, value):
    kwargs = {"workers": 1, name: value}
    one_line_error(
        ValueError,
        Executor,
        "thread",
        **kwargs,
        match=rf"^{name} must be an integer >= 1; got {value}$",
    )


@pytest.mark.parametrize("name", ["workers", "max_pending", "concurrency", "retries"])
@pytest.mark.parametrize("value", [2.0, "2", True])
def test_counts_must_be_integers(name, value):
    kwargs = {"workers": 1, name: value}
    one_line_error(TypeError, Executor, "thread", **kwargs, match=rf"^{name} must be an integer")


def test_max_pending_and_concurrency_zero_are_errors_in_the_options_module_too():
    # The executor passes the given value (not ``value or default``) to these checks.
    for name in ("max_pending", "concurrency"):
        one_line_error(
            ValueError, options.positive_int, name, 0, match=rf"^{name} must be an integer >= 1"
        )


def test_counts_accept_integer_like_values():
    class Index:
        def __index__(self):
            return 3

    import numbers

    numbers.Integral.register(Index)  # as numpy does for its integers
    assert options.positive_int("workers", 3) == 3
    assert options.non_negative_int("retries", 0) == 0
    one_line_error(ValueError, options.non_negative_int, "retries", -1, match="^retries must be")


@pytest.mark.parametrize("value", [NAN, INF, -INF, 0, -1.0])
def test_timeouts_are_finite_and_positive(value):
    message = one_line_error(
        ValueError, Executor, "thread", 1, timeout=value, match="^timeout must be a finite number"
    )
    assert message.endswith(f"got {value!r}")


def test_good_timeouts():
    assert options.optional_seconds("timeout", None) is None
    assert options.optional_seconds("timeout", 2) == 2.0
    assert type(options.optional_seconds("timeout", 2)) is float
    one_line_error(TypeError, options.optional_seconds, "timeout", "5", match="^timeout ")
    one_line_error(TypeError, options.optional_seconds, "timeout", True, match="^timeout ")


# -- chunksize -------------------------------------------------------------------------


def test_chunksize_is_checked_as_the_standard_library_does():
    assert options.chunksize(1) == 1
    assert options.chunksize(100) == 100
    for value in (0, -3):
        with pytest.raises(ValueError) as caught:
            options.chunksize(value)
        assert str(caught.value) == "chunksize must be >= 1."
    for value in (1.5, "2", None, True):
        one_line_error(TypeError, options.chunksize, value, match="^chunksize must be an integer")


# -- the executor as a whole ----------------------------------------------------------


def test_good_options_build_an_executor():
    with Executor(
        "thread",
        1,
        memory_limit="2GiB",
        min_available_memory=0,
        max_pending=1,
        concurrency=1,
        timeout=5,
        memory_pause=1,
    ) as executor:
        assert executor.concurrency == 1
        assert executor.workers == 1


@pytest.mark.parametrize("value", [NAN, 0, 1.5])
def test_process_options_are_checked_before_any_worker_starts(value):
    with pytest.raises((ValueError, TypeError), match="memory_limit"):
        Executor("process", 1, memory_limit=value)


def test_run_and_map_options_give_the_same_errors():
    with Executor("thread", 1) as executor:
        for name in ("max_pending",):
            one_line_error(
                ValueError,
                executor.run,
                abs,
                [1],
                **{name: 0},
                match=rf"^{name} must be an integer >= 1; got 0$",
            )
        one_line_error(
            ValueError, executor.start, abs, [1], timeout=NAN, match="^timeout must be a finite"
        )
        one_line_error(TypeError, executor.run, abs, [1], retries=1.0, match="^retries must be")
        with pytest.raises(ValueError) as caught:
            executor.map(abs, [1], chunksize=0)
        assert str(caught.value) == "chunksize must be >= 1."
        assert list(executor.map(abs, [-1], chunksize=5)) == [1]
