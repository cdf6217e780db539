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

What the host accepts (a hostile guest can write anything on this disk, so nothing here is assumed):
FILE and FILE_MISSING only for paths the job requested, each path once (others are ignored with a
warning in the report); the first HELLO and the first EXIT; a few ERROR messages; no empty stream
chunk or ERROR (the agent writes none). Reading is bounded by what was requested: it never goes past
``output_disk_size`` bytes, stops (with a warning) after ``max_stream_records`` stream chunks or
``max_other_records`` other records, and keeps at most ``max_output`` bytes per stream and per file,
so parse time and host memory do not depend on what the guest writes. ``ExitWatcher`` walks the
records with the same rules (``_Parser``), so it is never out of step with the final read.
"""

import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO

from bencher_runner.spec.errors import SandboxError
from bencher_runner.spec.results import IterationOutput
from bencher_runner.spec.units import MIB

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
FILE_HEAD_MAX = FILE_PATH_LEN.size + PATH_MAX + FILE_SIZE.size
# Room on the disk besides the streams' and files' contents: HELLO, EXIT, ERROR, DONE and the
# headers of the (at most 64 KiB) stream chunks.
DISK_SLACK = 4 * MIB
# A FILE record's u32 length holds its path and its content: the largest cap the format can carry.
MAX_OUTPUT_LIMIT = 2**32 - MIB
# Records a job's agent writes besides its stream chunks and one per requested file: HELLO, EXIT, a
# few ERRORs, DONE, with room to spare.
FIXED_RECORDS = 64
# Stream chunks carry at least one byte each, so a stream never needs more records than max_output;
# past this many the walk costs seconds, so it stops there (the agent would need a million separate
# reads of a trickling pipe to get near it).
MAX_STREAM_RECORDS = 1 << 20
MAX_ERRORS = 8
EXAMPLES = 3
POLL_RECORDS = 1 << 16  # ExitWatcher: records walked per poll, so a poll stays cheap
POLL_BYTES = 64 * MIB


class RecordType(IntEnum):
    HELLO = 1
    STDOUT = 2
    STDERR = 3
    EXIT = 4
    FILE = 5
    FILE_MISSING = 6
    ERROR = 7
    DONE = 8


STREAMS = (RecordType.STDOUT, RecordType.STDERR)
# The shortest payload of each type the agent writes. An empty stream chunk or ERROR is never written:
# refusing them means a header whose length and crc have not landed yet is never taken for a record.
MIN_PAYLOAD: dict[int, int] = {
    RecordType.HELLO: HELLO_HEAD.size,
    RecordType.STDOUT: 1,
    RecordType.STDERR: 1,
    RecordType.EXIT: EXIT_PAYLOAD.size,
    RecordType.FILE: FILE_PATH_LEN.size,
    RecordType.FILE_MISSING: FILE_MISSING_HEAD.size,
    RecordType.ERROR: 1,
    RecordType.DONE: 0,
}


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
    files: dict[str, bytes]  # keyed by the requested path, exactly as requested
    file_sizes: dict[str, int]
    missing: dict[str, int]  # requested path -> errno
    errors: list[str]  # the agent's ERROR messages, and malformed records (one line each)
    done: bool
    warnings: list[str] = field(default_factory=list)  # what the host ignored, and why (one line each)
    records: int = 0  # valid records read


def output_disk_size(file_count: int, max_output: int) -> int:
    """The output disk a job with ``file_count`` requested files and this cap needs (and may fill)."""
    return (2 + file_count) * max_output + file_count * (RECORD_HEADER.size + FILE_HEAD_MAX) + DISK_SLACK


def max_stream_records(max_output: int) -> int:
    """The most stdout/stderr chunks a job's agent writes: each carries at least one kept byte."""
    return min(2 * max_output, MAX_STREAM_RECORDS)


def max_other_records(file_count: int) -> int:
    """The most other records: HELLO, EXIT, a few ERRORs, DONE, one FILE or FILE_MISSING per file."""
    return FIXED_RECORDS + 2 * file_count


def create_output_disk(path: Path, size_bytes: int) -> None:
    """A sparse raw disk of ``size_bytes`` (at least 1 MiB) holding only the header block."""
    header = DISK_MAGIC + struct.pack("<I", DISK_VERSION)
    with path.open("wb") as disk:
        disk.write(header.ljust(HEADER_SIZE, b"\0"))
        disk.truncate(max(size_bytes, MIN_DISK_SIZE))


def encode_record(record_type: int, payload: bytes, *, flags: int = 0) -> bytes:
    """One record as the agent writes it (the decoder's tests use this)."""
    return RECORD_HEADER.pack(RECORD_MAGIC, record_type, flags, len(payload), zlib.crc32(payload)) + payload


def _text(data: bytes) -> str:
    """Guest bytes as one line of valid Unicode (undecodable bytes and control characters replaced)."""
    text = data.decode("utf-8", errors="replace")
    return text if text.isprintable() else "".join(c if c.isprintable() else " " for c in text)


def _example(path: bytes) -> str:
    text = _text(path)
    return repr(text if len(text) <= 80 else text[:80] + "…")


def wire_name(path: str) -> str:
    """``path`` as valid Unicode, for JSON and logs: a byte that was not UTF-8 in the guest (kept as a
    surrogate escape) becomes ``\\xNN``, any other lone surrogate ``\\uNNNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        pass
    out = []
    for c in path:
        code = ord(c)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(c)
    return "".join(out)


def _requested_names(requested: Sequence[str]) -> dict[bytes, str]:
    """The bytes the agent writes for each requested path (agentconfig encodes them the same way)."""
    names: dict[bytes, str] = {}
    for path in requested:
        try:
            names.setdefault(path.encode("utf-8", errors="surrogateescape"), path)
        except UnicodeEncodeError:
            continue  # the agent config cannot carry it, so the guest was never asked for it
    return names


def _malformed(record_type: int, length: int, payload: memoryview) -> str | None:
    """Why a record with a valid crc is still not one the agent writes, or None."""
    if record_type == RecordType.FILE and len(payload) >= FILE_PATH_LEN.size:
        (path_len,) = FILE_PATH_LEN.unpack_from(payload)
        if path_len > PATH_MAX or len(payload) < FILE_PATH_LEN.size + path_len + FILE_SIZE.size:
            return f"malformed FILE record (path length {path_len})"
        return None
    minimum = MIN_PAYLOAD.get(record_type)
    if minimum is None or length < minimum:
        return f"unknown or malformed record (type {record_type})"
    return None


class _Parser:
    """The record walk that read_output_disk and ExitWatcher share, so they agree on every record.

    ``feed`` walks valid records from ``offset`` and stops at the first one that is incomplete or
    invalid: after the VM is gone that is the end (a torn tail); while it runs, the record may still be
    being written, so the watcher feeds again from there later. ``stopped``: nothing after ``offset``
    will ever count (DONE, a malformed record, the record limit). ``keep_data=False`` (the watcher)
    checks everything the same way but keeps no stream or file bytes.
    """

    def __init__(self, *, requested: Sequence[str], max_output: int, keep_data: bool) -> None:
        self.names = _requested_names(requested)
        self.max_output = max_output
        self.keep_data = keep_data
        self.limit = output_disk_size(len(requested), max_output)
        self.max_streams = max_stream_records(max_output)
        self.max_others = max_other_records(len(requested))
        self.offset = HEADER_SIZE
        self.records = 0
        self.stream_records = 0
        self.stopped = False
        self.agent_version: str | None = None
        self.agent_start_ns: int | None = None
        self.streams: dict[int, bytearray] = {kind: bytearray() for kind in STREAMS}
        self.streamed: dict[int, int] = dict.fromkeys(STREAMS, 0)  # totals if no EXIT record arrives
        self.exit: ExitInfo | None = None
        self.totals: tuple[int, int] | None = None
        self.files: dict[str, bytes] = {}
        self.file_sizes: dict[str, int] = {}
        self.missing: dict[str, int] = {}
        self.errors: list[str] = []
        self.agent_failed = False
        self.done = False
        self.warnings: list[str] = []
        self.unrequested: list[bytes] = []  # examples, and the count in unrequested_count
        self.unrequested_count = 0
        self.repeated: list[bytes] = []
        self.repeated_count = 0
        self.extra_exits = 0
        self.dropped_errors = 0

    @property
    def finished(self) -> bool:
        """The command's exit (or the agent's failure) is recorded, or nothing more will count."""
        return self.exit is not None or self.agent_failed or self.stopped

    def feed(  # long: the walk over every record is one hot loop, its stream records inlined for speed
        self, disk: BinaryIO, disk_size: int, *, max_records: int = -1, max_bytes: int = -1
    ) -> None:
        """Walk records from ``offset``; ``max_records``/``max_bytes``: a poll's share (-1: no limit).

        The disk is read in windows of READ_CHUNK bytes, so small records cost no system call each, and
        a record larger than that is read in bounded chunks: a hostile length never makes the host
        allocate it."""
        end = min(disk_size, self.limit)
        header_size = RECORD_HEADER.size
        window = memoryview(b"")
        window_at = start = self.offset
        walked = 0
        while not self.stopped and self.offset + header_size <= end:
            if walked == max_records or (max_bytes >= 0 and walked and self.offset - start >= max_bytes):
                return  # the watcher's share for this poll
            at = self.offset - window_at
            if at + header_size > len(window):
                disk.seek(self.offset)
                window = memoryview(disk.read(min(READ_CHUNK, end - self.offset)))
                window_at, at = self.offset, 0
                if len(window) < header_size:
                    return
            magic, record_type, _flags, length, crc = RECORD_HEADER.unpack_from(window, at)
            record_end = self.offset + header_size + length
            if magic != RECORD_MAGIC or record_end > end:
                return
            stream = self.streams.get(record_type)
            if stream is not None and self.stream_records >= self.max_streams:
                return self._stop_warning(
                    f"more than {self.max_streams} stdout and stderr chunks on the output disk (the host "
                    f"reads one per byte of --max-output-size at most, and {MAX_STREAM_RECORDS} in all)"
                )
            if stream is None and self.records - self.stream_records >= self.max_others:
                return self._stop_warning(
                    f"more than {self.max_others} records besides stdout and stderr on the output disk "
                    "(the agent writes HELLO, EXIT, DONE, an ERROR and one per requested file)"
                )
            body = at + header_size
            keep = self._keep(record_type, stream)
            if body + length <= len(window):
                if zlib.crc32(window[body : body + length]) != crc:
                    return
                payload = window[body : body + min(length, keep)]
            else:
                disk.seek(self.offset + header_size)
                read = self._payload(disk, length, keep, crc)
                if read is None:
                    return
                payload = memoryview(read)
            if stream is not None and length:  # the bulk of the records: inline, for speed
                self.records += 1
                self.stream_records += 1
                walked += 1
                self.offset = record_end
                self.streamed[record_type] += length
                stream += payload
                continue
            problem = _malformed(record_type, length, payload)
            if problem is not None:
                # After the VM is gone this is the end. While it runs it may be a header whose halves
                # landed apart (a page boundary), so the watcher looks again later instead of stopping.
                if self.keep_data:
                    self._stop_error(f"{problem} on the output disk")
                return
            self.records += 1
            walked += 1
            self.offset = record_end
            self._apply(record_type, length, bytes(payload))

    def _keep(self, record_type: int, stream: bytearray | None) -> int:
        """How much of a record's payload to keep."""
        if stream is not None:
            return self.max_output - len(stream) if self.keep_data else 0
        if record_type == RecordType.FILE:
            return FILE_HEAD_MAX + (self.max_output if self.keep_data else 0)
        return SMALL_PAYLOAD_KEEP

    def _payload(self, disk: BinaryIO, length: int, keep: int, crc: int) -> bytes | None:
        """The first ``keep`` bytes of the payload (read from ``disk``'s position) if the whole
        payload matches ``crc``, else None."""
        kept = disk.read(min(length, keep))
        actual = zlib.crc32(kept)
        remaining = length - len(kept)
        while remaining > 0:
            chunk = disk.read(min(remaining, READ_CHUNK))
            if not chunk:
                return None
            actual = zlib.crc32(chunk, actual)
            remaining -= len(chunk)
        return kept if actual == crc else None

    def _apply(self, record_type: int, length: int, payload: bytes) -> None:
        """Take one valid, well-formed record (``_malformed`` said so)."""
        if record_type == RecordType.HELLO:
            if self.agent_start_ns is None:
                (self.agent_start_ns,) = HELLO_HEAD.unpack_from(payload)
                self.agent_version = _text(payload[HELLO_HEAD.size :])
        elif record_type == RecordType.EXIT:
            if self.exit is not None:
                self.extra_exits += 1
                return
            code, signal, start, end, out_total, err_total = EXIT_PAYLOAD.unpack_from(payload)
            self.exit = ExitInfo(exit_code=code, term_signal=signal, start_ns=start, end_ns=end)
            self.totals = (out_total, err_total)
        elif record_type == RecordType.FILE:
            (path_len,) = FILE_PATH_LEN.unpack_from(payload)
            content_at = FILE_PATH_LEN.size + path_len + FILE_SIZE.size
            name = self._accept(payload[FILE_PATH_LEN.size : FILE_PATH_LEN.size + path_len])
            if name is not None:
                (self.file_sizes[name],) = FILE_SIZE.unpack_from(payload, content_at - FILE_SIZE.size)
                self.files[name] = payload[content_at : content_at + self.max_output]
        elif record_type == RecordType.FILE_MISSING:
            name = self._accept(payload[FILE_MISSING_HEAD.size :])
            if name is not None:
                (self.missing[name],) = FILE_MISSING_HEAD.unpack_from(payload)
        elif record_type == RecordType.ERROR:
            self.agent_failed = True
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(_text(payload))
            else:
                self.dropped_errors += 1
        else:  # DONE
            self.done = self.stopped = True

    def _accept(self, path: bytes) -> str | None:
        """The requested path these bytes name, once; None (counted for a warning) for any other."""
        name = self.names.get(path)
        if name is None:
            self.unrequested_count += 1
            if len(self.unrequested) < EXAMPLES:
                self.unrequested.append(path)
        elif name in self.files or name in self.missing:
            self.repeated_count += 1
            if len(self.repeated) < EXAMPLES:
                self.repeated.append(path)
        else:
            return name
        return None

    def _stop_error(self, text: str) -> None:
        self.errors.append(text)
        self.stopped = True

    def _stop_warning(self, what: str) -> None:
        self.warnings.append(f"the guest wrote {what}; the rest was ignored")
        self.stopped = True

    def report(self) -> GuestReport:
        warnings = list(self.warnings)
        if self.unrequested_count:
            warnings.append(
                f"the guest wrote {self.unrequested_count} output file record(s) for paths the job did "
                f"not request (e.g. {', '.join(map(_example, self.unrequested))}); they were ignored"
            )
        if self.repeated_count:
            warnings.append(
                f"the guest wrote {self.repeated_count} more record(s) for output files it had already "
                f"reported (e.g. {', '.join(map(_example, self.repeated))}); only the first counts"
            )
        if self.extra_exits:
            warnings.append(f"the guest wrote {self.extra_exits} more EXIT record(s); the first counts")
        if self.dropped_errors:
            warnings.append(f"{self.dropped_errors} more ERROR message(s) from the guest were not kept")
        totals = self.totals or (self.streamed[RecordType.STDOUT], self.streamed[RecordType.STDERR])
        return GuestReport(
            agent_version=self.agent_version,
            agent_start_ns=self.agent_start_ns,
            stdout=bytes(self.streams[RecordType.STDOUT]),
            stderr=bytes(self.streams[RecordType.STDERR]),
            stdout_total=totals[0],
            stderr_total=totals[1],
            exit=self.exit,
            files=self.files,
            file_sizes=self.file_sizes,
            missing=self.missing,
            errors=self.errors,
            done=self.done,
            warnings=warnings,
            records=self.records,
        )


def read_output_disk(path: Path, *, max_output: int, requested: Sequence[str]) -> GuestReport:
    """Decode what the agent wrote, for a job that requested the output files ``requested``.

    Keeps at most ``max_output`` bytes of each stream and file, and files only for requested paths."""
    parser = _Parser(requested=requested, max_output=max_output, keep_data=True)
    with path.open("rb", buffering=READ_CHUNK) as disk:
        if disk.read(len(DISK_MAGIC)) != DISK_MAGIC:
            raise SandboxError(f"{path} is not a bencher output disk (bad magic); it was overwritten")
        parser.feed(disk, os.fstat(disk.fileno()).st_size)
    return parser.report()


def iteration_output(
    report: GuestReport, requested: Sequence[str], *, mark_uncollected: bool
) -> IterationOutput:
    """The iteration's result from a report that has an EXIT record, with every path as valid Unicode.

    ``mark_uncollected``: requested files the report says nothing about are listed as "not collected".
    """
    assert report.exit is not None
    truncated = [
        name
        for name, total, kept in (
            ("stdout", report.stdout_total, len(report.stdout)),
            ("stderr", report.stderr_total, len(report.stderr)),
        )
        if total > kept
    ]
    truncated += [wire_name(p) for p, data in report.files.items() if report.file_sizes.get(p, 0) > len(data)]
    missing = {wire_name(p): os.strerror(err) for p, err in report.missing.items()}
    if mark_uncollected:
        missing.update(
            {
                wire_name(p): "not collected"
                for p in requested
                if p not in report.files and p not in report.missing
            }
        )
    return IterationOutput(
        exit_code=report.exit.exit_code,
        stdout=report.stdout,
        stderr=report.stderr,
        output={wire_name(p): data for p, data in report.files.items()},
        missing=missing,
        truncated=tuple(truncated),
    )


class ExitWatcher:
    """Tells, while the VM runs, whether the agent has recorded the command's exit yet.

    The host reads the disk file QEMU writes (guest flushes reach it at once), walking the records
    incrementally with the same rules as read_output_disk (CRCs checked, so a header whose payload has
    not landed yet is read again at the next poll, never skipped over) but keeping no output. Enough
    to start the grace period, never trusted for results (read_output_disk does that after the VM is
    gone). Each poll walks at most POLL_RECORDS records and about POLL_BYTES bytes.
    """

    def __init__(self, path: Path, *, requested: Sequence[str], max_output: int) -> None:
        self.path = path
        self._parser = _Parser(requested=requested, max_output=max_output, keep_data=False)
        self.exited = False

    @property
    def offset(self) -> int:
        return self._parser.offset

    def poll(self) -> bool:
        if self.exited:
            return True
        try:
            with self.path.open("rb") as disk:
                size = os.fstat(disk.fileno()).st_size
                self._parser.feed(disk, size, max_records=POLL_RECORDS, max_bytes=POLL_BYTES)
        except OSError:
            pass
        self.exited = self._parser.finished
        return self.exited
