"""Run a call that might block forever (an open() of a FIFO) so that a regression fails, not hangs.

The call runs in a daemon thread joined with a timeout. When it is still running at the deadline, the
FIFOs it may be stuck on are opened for writing and closed, so the blocked open() returns and the
thread ends instead of outliving the test, and the test fails naming the call.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def call_bounded(fn: Callable[[], T], *, timeout: float = 10.0, fifos: Iterable[Path] = ()) -> T:
    """``fn()``'s result or exception; AssertionError when it does not return within ``timeout`` s.

    The timeout is generous (the call is expected to return at once): it only turns a hang into a
    failure, so it does not depend on how loaded the machine is.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed back to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="bounded-call")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:  # unblock a reader stuck in open(): it then reads EOF
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        raise AssertionError(f"{getattr(fn, '__name__', fn)!s} still blocked after {timeout} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
