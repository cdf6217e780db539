"""The output disk: how the guest agent hands the command's results back to the host.

A raw virtio-blk disk rather than the serial console or a socket: the agent appends self-checking
records with pwrite + fdatasync, so whatever reached the disk before the host killed the VM (timeout)
is still readable afterwards, a torn last record is detected, and no guest output ever shares a
channel with kernel messages. The host trusts nothing on it: every record is CRC-checked and every
stream and file is capped at ``max_output`` here too, reading the (sparse, possibly large) file in
bounded chunks.

Format (guest/agent.c documents the same). All integers little-endian.

Header block, written by the host, 4096 bytes: ``b"BRUNOUT1"``, u32 format version = 1, zeros.
The agent recognises the output disk by these 8 magic bytes.

Records from offset 4096, back to back, no padding. Each is a 16-byte header
``magic b"BRR1", u16 type, u16 flags (0), u32 length (of the payload), u32 crc32 (zlib.crc32 of the
payload)`` followed by the payload. Reading stops at a DONE record or at the first record whose
magic, length or crc is invalid or that runs past the end of the disk (a torn tail). Types:

1 HELLO         u64 boottime_ns (CLOCK_BOOTTIME when the agent started) + UTF-8 agent version
2 STDOUT        a chunk of the command's stdout (at most 64 KiB per record)
3 STDERR        a chunk of the command's stderr (at most 64 KiB per record)
4 EXIT          i32 exit_code, i32 term_signal (0 unless killed), u64 start_ns, u64 end_ns
                (CLOCK_BOOTTIME before fork / after waitpid), u64 stdout_total, u64 stderr_total
                (bytes produced, including those dropped over the cap)
5 FILE          u32 path_len, path bytes, u64 size_total, content (at most max_output bytes)
6 FILE_MISSING  i32 errno, path bytes
7 ERROR         UTF-8 message: the agent could not do its job; followed by DONE
8 DONE          empty; written last, then fdatasync
"""

import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO

from bencher_runner.spec.errors import SandboxError

DISK_MAGIC = b"BRUNOUT1"
DISK_VERSION = 1
HEADER_SIZE = 4096
MIN_DISK_SIZE = 1 << 20
RECORD_MAGIC = b"BRR1"
RECORD_HEADER = struct.Struct("<4sHHII")
HELLO_HEAD = struct.Struct("<Q")
EXIT_PAYLOAD = struct.Struct("<iiQQQQ")
FILE_PATH_LEN = struct.Struct("<I")
FILE_SIZE = struct.Struct("<Q")
FILE_MISSING_HEAD = struct.Struct("<i")
PATH_MAX = 4096
SMALL_PAYLOAD_KEEP = 2 * PATH_MAX  # HELLO, EXIT, FILE_MISSING, ERROR: anything longer is truncated
READ_CHUNK = 1 << 20


class RecordType(IntEnum):
    HELLO = 1
    STDOUT = 2
    STDERR = 3
    EXIT = 4
    FILE = 5
    FILE_MISSING = 6
    ERROR = 7
    DONE = 8


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int  # WEXITSTATUS, or 128 + signal
    term_signal: int  # 0 if the command exited normally
    start_ns: int  # CLOCK_BOOTTIME in the guest
    end_ns: int


@dataclass(frozen=True)
class GuestReport:
    agent_version: str | None
    agent_start_ns: int | None
    stdout: bytes
    stderr: bytes
    stdout_total: int  # from EXIT; without one, the bytes that reached the disk
    stderr_total: int
    exit: ExitInfo | None
    files: dict[str, bytes]
    file_sizes: dict[str, int]
    missing: dict[str, int]  # path -> errno
    errors: list[str]
    done: bool


def create_output_disk(path: Path, size_bytes: int) -> None:
    """A sparse raw disk of ``size_bytes`` (at least 1 MiB) holding only the header block."""
    header = DISK_MAGIC + struct.pack("<I", DISK_VERSION)
    with path.open("wb") as disk:
        disk.write(header.ljust(HEADER_SIZE, b"\0"))
        disk.truncate(max(size_bytes, MIN_DISK_SIZE))


def encode_record(record_type: int, payload: bytes, *, flags: int = 0) -> bytes:
    """One record as the agent writes it (the decoder's tests use this)."""
    return RECORD_HEADER.pack(RECORD_MAGIC, record_type, flags, len(payload), zlib.crc32(payload)) + payload


def _records(disk: BinaryIO, disk_size: int, keep: Callable[[int], int]) -> Iterator[tuple[int, int, bytes]]:
    """Valid records as (type, length, first ``keep(type)`` payload bytes), up to the first invalid one.

    The payload is read in bounded chunks, so a hostile length cannot make the host allocate it.
    """
    offset = HEADER_SIZE
    while offset + RECORD_HEADER.size <= disk_size:
        disk.seek(offset)
        magic, record_type, _flags, length, crc = RECORD_HEADER.unpack(disk.read(RECORD_HEADER.size))
        end = offset + RECORD_HEADER.size + length
        if magic != RECORD_MAGIC or end > disk_size:
            return
        limit = keep(record_type)
        kept = bytearray()
        actual_crc = 0
        remaining = length
        while remaining:
            chunk = disk.read(min(remaining, READ_CHUNK))
            if not chunk:
                return
            actual_crc = zlib.crc32(chunk, actual_crc)
            if len(kept) < limit:
                kept += chunk[: limit - len(kept)]
            remaining -= len(chunk)
        if actual_crc != crc:
            return
        yield record_type, length, bytes(kept)
        offset = end


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _path(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def read_output_disk(path: Path, *, max_output: int) -> GuestReport:
    """Decode what the agent wrote; keeps at most ``max_output`` bytes of each stream and file."""
    streams = {RecordType.STDOUT: bytearray(), RecordType.STDERR: bytearray()}
    agent_version: str | None = None
    agent_start_ns: int | None = None
    streamed = {RecordType.STDOUT: 0, RecordType.STDERR: 0}  # totals if no EXIT record arrives
    exit_info: ExitInfo | None = None
    files: dict[str, bytes] = {}
    file_sizes: dict[str, int] = {}
    missing: dict[str, int] = {}
    errors: list[str] = []
    done = False

    def keep(record_type: int) -> int:
        if record_type in streams:
            return max_output - len(streams[RecordType(record_type)])
        if record_type == RecordType.FILE:
            return FILE_PATH_LEN.size + PATH_MAX + FILE_SIZE.size + max_output
        return SMALL_PAYLOAD_KEEP

    with path.open("rb") as disk:
        disk_size = os.fstat(disk.fileno()).st_size
        if disk.read(len(DISK_MAGIC)) != DISK_MAGIC:
            raise SandboxError(f"{path} is not a bencher output disk (bad magic); it was overwritten")
        for record_type, length, payload in _records(disk, disk_size, keep):
            if record_type == RecordType.HELLO and len(payload) >= HELLO_HEAD.size:
                (agent_start_ns,) = HELLO_HEAD.unpack_from(payload)
                agent_version = _text(payload[HELLO_HEAD.size :])
            elif record_type in streams:
                streams[RecordType(record_type)] += payload
                streamed[RecordType(record_type)] += length
            elif record_type == RecordType.EXIT and len(payload) >= EXIT_PAYLOAD.size:
                code, signal, start, end, *totals = EXIT_PAYLOAD.unpack_from(payload)
                exit_info = ExitInfo(exit_code=code, term_signal=signal, start_ns=start, end_ns=end)
                streamed = dict(zip((RecordType.STDOUT, RecordType.STDERR), totals, strict=True))
            elif record_type == RecordType.FILE and len(payload) >= FILE_PATH_LEN.size:
                (path_len,) = FILE_PATH_LEN.unpack_from(payload)
                content_at = FILE_PATH_LEN.size + path_len + FILE_SIZE.size
                if path_len > PATH_MAX or len(payload) < content_at:
                    errors.append(f"malformed FILE record (path length {path_len}) on the output disk")
                    break
                name = _path(payload[FILE_PATH_LEN.size : FILE_PATH_LEN.size + path_len])
                (file_sizes[name],) = FILE_SIZE.unpack_from(payload, content_at - FILE_SIZE.size)
                files[name] = payload[content_at : content_at + max_output]
            elif record_type == RecordType.FILE_MISSING and len(payload) >= FILE_MISSING_HEAD.size:
                (missing[_path(payload[FILE_MISSING_HEAD.size :])],) = FILE_MISSING_HEAD.unpack_from(payload)
            elif record_type == RecordType.ERROR:
                errors.append(_text(payload))
            elif record_type == RecordType.DONE:
                done = True
                break
            else:
                errors.append(f"unknown or malformed record (type {record_type}) on the output disk")
                break

    return GuestReport(
        agent_version=agent_version,
        agent_start_ns=agent_start_ns,
        stdout=bytes(streams[RecordType.STDOUT]),
        stderr=bytes(streams[RecordType.STDERR]),
        stdout_total=streamed[RecordType.STDOUT],
        stderr_total=streamed[RecordType.STDERR],
        exit=exit_info,
        files=files,
        file_sizes=file_sizes,
        missing=missing,
        errors=errors,
        done=done,
    )


class ExitWatcher:
    """Tells, while the VM runs, whether the agent has recorded the command's exit yet.

    The host reads the disk file QEMU writes (guest flushes reach it at once), walking record headers
    incrementally without checking payloads: enough to start the grace period, never trusted for
    results (read_output_disk does that after the VM is gone).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = HEADER_SIZE
        self.exited = False

    def poll(self) -> bool:
        if self.exited:
            return True
        try:
            with self.path.open("rb") as disk:
                size = os.fstat(disk.fileno()).st_size
                while self.offset + RECORD_HEADER.size <= size:
                    disk.seek(self.offset)
                    magic, rtype, _flags, length, _crc = RECORD_HEADER.unpack(disk.read(RECORD_HEADER.size))
                    if magic != RECORD_MAGIC or self.offset + RECORD_HEADER.size + length > size:
                        break
                    if rtype in (RecordType.EXIT, RecordType.DONE, RecordType.ERROR):
                        self.exited = True
                        break
                    self.offset += RECORD_HEADER.size + length
        except OSError:
            pass
        return self.exited
