"""The serial console log is bounded on disk while a VM writes it, and read in bounded pieces
(issue 12, finding 15)."""

import os
import threading
import tracemalloc
from pathlib import Path

import pytest

from bencher_runner.sandbox.serial import (
    HEAD_BYTES,
    PANIC_MARKER,
    TAIL_BYTES,
    SerialBound,
    bounded_serial_log,
    serial_line,
    serial_tail,
)

MIB = 1 << 20


def on_disk(path: Path) -> int:
    return path.stat().st_blocks * 512


def spam(path: Path, total: int, *, head: bytes = b"", tail: bytes = b"", chunk: int = 64 << 10) -> None:
    """Write like QEMU's -serial file: one O_TRUNC open, then sequential writes at its own offset."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, head)
        written = len(head)
        block = b"spam spam spam\n" * (chunk // 15)
        while written < total - len(tail):
            written += os.write(fd, block[: total - len(tail) - written])
        os.write(fd, tail)
    finally:
        os.close(fd)


def test_a_spamming_guest_cannot_fill_the_disk(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    head = b"[    0.000000] Linux version 6.1\n"
    tail = b"[   12.345678] Kernel panic - not syncing: sysrq triggered crash\n"
    with bounded_serial_log(log, interval=0.01):
        spam(log, 40 * MIB, head=head, tail=tail)
    assert log.stat().st_size == 40 * MIB  # the writer's offsets are untouched
    assert on_disk(log) <= HEAD_BYTES + TAIL_BYTES + 2 * 4096
    assert log.open("rb").read(len(head)) == head
    assert serial_line(log, PANIC_MARKER) == "Kernel panic - not syncing: sysrq triggered crash"
    assert serial_line(log, "Linux version") == "Linux version 6.1"
    assert serial_tail(log).endswith("sysrq triggered crash")


def test_the_bound_holds_while_the_writer_runs(tmp_path: Path) -> None:
    """Trimmed in steps: the disk use never grows with what the guest writes, only with one step."""
    log = tmp_path / "serial.log"
    bound = SerialBound(log, head=64 << 10, tail=64 << 10)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(100):
            os.write(fd, b"x" * MIB)
            bound.trim()
            assert on_disk(log) <= (64 << 10) * 2 + 4096
    finally:
        os.close(fd)
    assert log.stat().st_size == 100 * MIB


def test_a_small_log_is_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    with bounded_serial_log(log, interval=0.01):
        spam(log, HEAD_BYTES + TAIL_BYTES, head=b"first\n", tail=b"last\n")
    assert b"\0" not in log.read_bytes()
    assert serial_tail(log).endswith("last")


def test_a_log_written_again_from_the_start_is_trimmed_again(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    bound = SerialBound(log, head=4096, tail=4096)
    spam(log, 4 * MIB)
    bound.trim()
    spam(log, 4 * MIB)  # O_TRUNC: a new VM on the same path
    bound.trim()
    assert on_disk(log) <= 3 * 4096


def test_no_log_at_all(tmp_path: Path) -> None:
    with bounded_serial_log(tmp_path / "never-written.log", interval=0.01):
        pass
    assert serial_tail(tmp_path / "never-written.log") == "(no serial log)"
    assert serial_line(tmp_path / "never-written.log", PANIC_MARKER) is None


def test_an_empty_log(tmp_path: Path) -> None:
    (tmp_path / "s.log").touch()
    assert serial_tail(tmp_path / "s.log") == "(serial log is empty)"


def test_the_readers_read_only_head_and_tail_of_a_huge_log(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    with log.open("wb") as f:
        f.write(b"[ 1.0] boot\n")
        f.truncate(256 * MIB)  # a log the old readers loaded whole (read_text)
        f.seek(256 * MIB)
        f.write(b"[ 9.0] Kernel panic - at the end\n[ 9.1] ---[ end Kernel panic ]---\n")
    tracemalloc.start()
    try:
        assert serial_tail(log).splitlines()[-1] == "[ 9.1] ---[ end Kernel panic ]---"
        assert serial_line(log, PANIC_MARKER) == "Kernel panic - at the end"
        assert serial_line(log, "boot") == "boot"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB


def test_a_line_only_in_the_dropped_middle_is_not_found(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    with log.open("wb") as f:
        f.write(b"x" * (HEAD_BYTES + 10))
        f.write(b"\n[ 5.0] Out of memory: Killed process 1\n")
        f.write(b"y" * (TAIL_BYTES + 10))
    assert serial_line(log, "Out of memory") is None


def test_trimming_runs_in_the_background(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    done = threading.Event()
    with bounded_serial_log(log, head=4096, tail=4096, interval=0.01) as bound:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"z" * (8 * MIB))
        for _ in range(500):  # up to 5 s; the trim is due after 0.01 s
            if bound.trims:
                done.set()
                break
            threading.Event().wait(0.01)
        os.close(fd)
    assert done.is_set()


@pytest.mark.parametrize("size", [0, 100, TAIL_BYTES * 3])
def test_serial_tail_keeps_at_most_25_lines(tmp_path: Path, size: int) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"p" * size + b"".join(b"line %d\n" % i for i in range(100)))
    lines = serial_tail(log).splitlines()
    assert lines == [f"line {i}" for i in range(75, 100)]
