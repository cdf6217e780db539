"""A retry budget with exponential backoff whose wait ends at once when the work is canceled.

Used by the registry client's four retry loops (a request, a token fetch, a manifest read, a blob's
resumes). Not tenacity or stamina: those loops carry state across attempts that a decorator does not
see (a 401 answered by one authentication round that costs no retry, a last 5xx response handed back
to the caller instead of an exception, a blob's resume offset, a ``Retry-After`` header), so they would
need a custom wait, sleep and give-up callback each, on a new runtime dependency, to do what these
lines do; and the part that matters, a backoff that a cancel cuts short, is one ``Event.wait``.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """``retries`` retries after the first attempt; the n-th waits ``min(base * 2**n, cap)`` seconds
    (or the server's ``Retry-After`` seconds, capped), and ``on_cancel`` raises as soon as ``cancel``
    is set, during the wait or before it."""

    retries: int
    base: float
    cap: float
    cancel: threading.Event = field(default_factory=threading.Event)
    on_cancel: Callable[[], None] = lambda: None
    used: int = 0  # retries taken so far

    @property
    def spent(self) -> bool:
        """No retry left: the caller reports its failure (after ``used + 1`` attempts)."""
        return self.used >= self.retries

    def delay(self, retry_after: str = "") -> float:
        """Seconds before the next attempt; a ``Retry-After`` of whole seconds wins, capped."""
        if retry_after.isascii() and retry_after.isdigit():
            return min(float(retry_after), self.cap)
        return min(self.base * 2.0**self.used, self.cap)

    def wait(self, retry_after: str = "") -> None:
        """Take one retry: wait its delay, cut short (by ``on_cancel``) when the work is canceled."""
        delay = self.delay(retry_after)
        self.used += 1
        self.cancel.wait(delay)
        if self.cancel.is_set():
            self.on_cancel()
