"""The retry budget and its cancel-aware backoff (issue 14: one mechanism for the registry's loops)."""

import threading
import time

import pytest

from bencher_runner.retry import Backoff


class Canceled(Exception):
    pass


def _raise() -> None:
    raise Canceled


def test_delays_double_up_to_the_cap_and_the_budget_runs_out() -> None:
    backoff = Backoff(retries=4, base=0.001, cap=0.004)
    delays = []
    while not backoff.spent:
        delays.append(backoff.delay())
        backoff.wait()
    assert delays == [0.001, 0.002, 0.004, 0.004] and backoff.used == 4


@pytest.mark.parametrize(
    ("header", "expected"), [("3", 3.0), ("100", 20.0), ("0", 0.0), ("", 0.5), ("1.5", 0.5)]
)
def test_retry_after_in_whole_seconds_wins_capped(header: str, expected: float) -> None:
    assert Backoff(retries=1, base=0.5, cap=20.0).delay(header) == expected


@pytest.mark.parametrize("header", ["soon", "Wed, 21 Oct 2015 07:28:00 GMT", "-1", "٣"])  # Arabic-Indic 3
def test_a_retry_after_that_is_not_whole_seconds_is_ignored(header: str) -> None:
    assert Backoff(retries=1, base=0.5, cap=20.0).delay(header) == 0.5


def test_no_retries_is_spent_at_once() -> None:
    assert Backoff(retries=0, base=1, cap=1).spent


def test_a_cancel_during_the_wait_ends_it_at_once() -> None:
    cancel = threading.Event()
    backoff = Backoff(retries=1, base=30.0, cap=30.0, cancel=cancel, on_cancel=_raise)
    threading.Timer(0.1, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(Canceled):
        backoff.wait()
    assert time.monotonic() - t0 < 5  # not the 30 s backoff


def test_a_cancel_before_the_wait_raises_without_waiting() -> None:
    cancel = threading.Event()
    cancel.set()
    t0 = time.monotonic()
    with pytest.raises(Canceled):
        Backoff(retries=1, base=30.0, cap=30.0, cancel=cancel, on_cancel=_raise).wait()
    assert time.monotonic() - t0 < 5
