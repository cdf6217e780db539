"""The guest's serial console log: bounded on the host disk while the VM runs, read in bounded pieces.

QEMU's ``-serial file:`` and Firecracker's stdout write a plain file with no size limit, so a guest
spamming its console could fill the host's disk. Neither has a capped file backend (a ring-buffer
chardev lives in QEMU's memory and dies with it, and a pipe with a reader thread would turn the log
into a FIFO that live readers block on). The simplest robust bound: while the VM runs, a thread
punches a hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)``) over everything between the first HEAD_BYTES
(the boot log) and the last TAIL_BYTES (where a panic or the last messages are), every
CHECK_INTERVAL_S and once more when the VM is gone. The writer keeps its offset, the file stays a
plain file anyone may read, and the disk it occupies stays about HEAD_BYTES + TAIL_BYTES plus what
a guest writes in one interval. The hole reads as zeros, which the readers below skip; they read
at most the head and the tail, never the whole (apparent) file.
"""

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from pathlib import Path

HEAD_BYTES = 1 << 20
TAIL_BYTES = 1 << 20
CHECK_INTERVAL_S = 0.2
PAGE = 4096
SERIAL_TAIL_LINES = 25
TAIL_READ = 64 << 10  # enough for the last SERIAL_TAIL_LINES lines
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

OOM_MARKER = "Out of memory: Killed process"  # the guest OOM killer fired
PANIC_MARKER = "Kernel panic"


class _Libc:
    fallocate = None

    @classmethod
    def punch(cls, fd: int, offset: int, length: int) -> bool:
        if cls.fallocate is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            cls.fallocate = libc.fallocate
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        return bool(cls.fallocate(fd, mode, offset, length) == 0)


class SerialBound:
    """Keeps ``path`` to its head and tail on disk (see the module docstring)."""

    def __init__(self, path: Path, *, head: int = HEAD_BYTES, tail: int = TAIL_BYTES) -> None:
        self.path = path
        self.start = -(-head // PAGE) * PAGE  # the hole starts on a page boundary after the head
        self.tail = tail
        self.trims = 0  # holes punched so far
        self.supported = True

    def trim(self) -> None:
        """Punch the part between head and tail when more than head and tail is on disk: one fstat
        when nothing needs doing. Going by what is allocated, not by offsets, also covers a log the VM
        truncated and wrote again."""
        if not self.supported:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return  # not there yet, or gone
        try:
            st = os.fstat(fd)
            end = (st.st_size - self.tail) // PAGE * PAGE
            if st.st_blocks * 512 <= self.start + self.tail + 2 * PAGE or end <= self.start:
                return
            if _Libc.punch(fd, self.start, end - self.start):
                self.trims += 1
            else:
                self.supported = False  # the filesystem cannot punch holes: leave the log alone
        finally:
            os.close(fd)


@contextlib.contextmanager
def bounded_serial_log(
    path: Path, *, head: int = HEAD_BYTES, tail: int = TAIL_BYTES, interval: float = CHECK_INTERVAL_S
) -> Iterator[SerialBound]:
    """While the block runs (the VM writing ``path``), keep the log to its head and tail on disk."""
    bound = SerialBound(path, head=head, tail=tail)
    stop = threading.Event()

    def keep_trimming() -> None:
        while not stop.wait(interval):
            bound.trim()

    thread = threading.Thread(target=keep_trimming, name="serial-bound", daemon=True)
    thread.start()
    try:
        yield bound
    finally:
        stop.set()
        thread.join()
        bound.trim()  # what the VM wrote in its last interval


def _read_at(serial: Path, offset: int, length: int) -> bytes:
    with serial.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def _text(data: bytes) -> str:
    return data.replace(b"\0", b"").decode("utf-8", errors="replace")


def serial_tail(serial: Path, lines: int = SERIAL_TAIL_LINES) -> str:
    """The last ``lines`` lines of the serial log (only its last TAIL_READ bytes are read)."""
    try:
        size = serial.stat().st_size
        text = _text(_read_at(serial, max(0, size - TAIL_READ), TAIL_READ))
    except OSError:
        return "(no serial log)"
    kept = text.strip().splitlines()
    if size > TAIL_READ and kept:
        kept = kept[1:]  # the first line read may be a part of one
    return "\n".join(kept[-lines:]) or "(serial log is empty)"


def serial_line(serial: Path, marker: str, *, head: int = HEAD_BYTES, tail: int = TAIL_BYTES) -> str | None:
    """The first kernel message in the serial log's head or tail containing ``marker``, without its
    timestamp. Reads at most ``head + tail`` bytes, whatever the log's size."""
    try:
        size = serial.stat().st_size
        if size <= head + tail:
            text = _text(_read_at(serial, 0, size))
        else:
            text = _text(_read_at(serial, 0, head)) + "\n" + _text(_read_at(serial, size - tail, tail))
    except OSError:
        return None
    for line in text.splitlines():
        if marker in line:
            return line.split("]", 1)[-1].strip()
    return None
