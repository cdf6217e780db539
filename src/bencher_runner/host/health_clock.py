"""Is the kernel's clock synchronised? `adjtimex(2)` with no modes set reads the NTP state.

The kernel sets STA_UNSYNC in `timex.status` until a time daemon (chrony, ntpd, systemd-timesyncd)
disciplines the clock, and again when its estimated error passes 16 s. Reading it needs no privilege
and no daemon-specific tool. ctypes calls libc's wrapper; `struct timex` is declared up to `status`
and padded to more than its real size, since only the leading fields are read.
"""

import ctypes
import ctypes.util
import os
from collections.abc import Callable

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


def clock_synchronised() -> bool:
    """The kernel's view: not synchronised when adjtimex reports STA_UNSYNC."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    timex = _Timex()  # modes = 0: read only
    state = libc.adjtimex(ctypes.byref(timex))
    if state < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"adjtimex: {os.strerror(err)}")
    return not (timex.status & STA_UNSYNC)
