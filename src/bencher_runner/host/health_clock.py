"""Is the kernel's clock synchronised? `adjtimex(2)` with no modes set reads the NTP state.

The kernel sets STA_UNSYNC in `timex.status` until a time daemon (chrony, ntpd, systemd-timesyncd)
disciplines the clock, and again when its estimated error passes 16 s. Reading it needs no privilege
and no daemon-specific tool. ctypes calls libc's wrapper (looked up once); `struct timex` is declared
up to `status` and padded to more than its real size, since only the leading fields are read.
"""

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any

STA_UNSYNC = 0x0040
TIME_ERROR = 5  # adjtimex's return value when the clock is not synchronised


class _Timex(ctypes.Structure):
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),  # the real struct is 208 bytes on x86_64
    ]


# () -> True when synchronised, False when not; raises OSError when the state cannot be read.
ClockReader = Callable[[], bool]


@functools.cache
def _adjtimex() -> Any:
    # The process's own symbols include libc's: no ctypes.util.find_library, which spawns ldconfig
    # (2 ms a probe).
    function = ctypes.CDLL(None, use_errno=True).adjtimex
    function.argtypes = [ctypes.POINTER(_Timex)]
    function.restype = ctypes.c_int
    return function


def clock_synchronised() -> bool:
    """The kernel's view: not synchronised when adjtimex reports STA_UNSYNC."""
    timex = _Timex()  # modes = 0: read only
    state = _adjtimex()(ctypes.byref(timex))
    if state < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"adjtimex: {os.strerror(err)}")
    return not (timex.status & STA_UNSYNC)
