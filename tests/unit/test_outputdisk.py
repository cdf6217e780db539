import errno
import json
import os
import struct
import tracemalloc
from pathlib import Path

import pytest

from bencher_runner.sandbox.outputdisk import (
    DISK_SLACK,
    FIXED_RECORDS,
    HEADER_SIZE,
    MAX_ERRORS,
    MAX_STREAM_RECORDS,
    MIN_DISK_SIZE,
    PATH_MAX,
    POLL_RECORDS,
    ExitInfo,
    ExitWatcher,
    RecordType,
    create_output_disk,
    encode_record,
    iteration_output,
    max_other_records,
    max_stream_records,
    output_disk_size,
    read_output_disk,
    wire_name,
)
from bencher_runner.spec.errors import SandboxError
from bencher_runner.spec.results import RunResult

CAP = 1000


def hello(start_ns: int = 1_500_000_000, version: str = "bencher-agent 1") -> bytes:
    return encode_record(RecordType.HELLO, struct.pack("<Q", start_ns) + version.encode())


def stream(kind: RecordType, data: bytes) -> bytes:
    return encode_record(kind, data)


def exit_record(
    code: int, signal: int = 0, *, start: int = 10, end: int = 20, out: int = 0, err: int = 0
) -> bytes:
    return encode_record(RecordType.EXIT, struct.pack("<iiQQQQ", code, signal, start, end, out, err))


def file_record(path: bytes, content: bytes, size: int | None = None) -> bytes:
    size = len(content) if size is None else size
    payload = struct.pack("<I", len(path)) + path + struct.pack("<Q", size) + content
    return encode_record(RecordType.FILE, payload)


def missing_record(path: bytes, err: int) -> bytes:
    return encode_record(RecordType.FILE_MISSING, struct.pack("<i", err) + path)


DONE = encode_record(RecordType.DONE, b"")


def disk(tmp_path: Path, *records: bytes, size: int = MIN_DISK_SIZE) -> Path:
    path = tmp_path / "out.img"
    create_output_disk(path, size)
    with path.open("r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(b"".join(records))
    return path


def test_create_writes_header_and_is_sparse(tmp_path: Path) -> None:
    path = tmp_path / "out.img"
    create_output_disk(path, 256 << 20)
    assert path.stat().st_size == 256 << 20
    assert path.stat().st_blocks * 512 < 1 << 20  # sparse
    with path.open("rb") as f:
        assert f.read(HEADER_SIZE) == b"BRUNOUT1" + struct.pack("<I", 1) + bytes(HEADER_SIZE - 12)


def test_create_rounds_tiny_sizes_up_to_the_minimum(tmp_path: Path) -> None:
    path = tmp_path / "out.img"
    create_output_disk(path, 10)
    assert path.stat().st_size == MIN_DISK_SIZE


def test_record_framing() -> None:
    rec = encode_record(RecordType.STDOUT, b"abc")
    assert rec[:4] == b"BRR1"
    assert struct.unpack("<HHII", rec[4:16]) == (2, 0, 3, 0x352441C2)  # zlib.crc32(b"abc")
    assert rec[16:] == b"abc"


def test_full_report(tmp_path: Path) -> None:
    path = disk(
        tmp_path,
        hello(),
        stream(RecordType.STDOUT, b"hello "),
        stream(RecordType.STDERR, b"warn\n"),
        stream(RecordType.STDOUT, b"world\n"),
        exit_record(3, start=100, end=250, out=12, err=5),
        file_record(b"result.json", b'{"a": 1}'),
        missing_record(b"/gone.txt", errno.ENOENT),
        missing_record(b"adir", errno.EISDIR),
        DONE,
    )
    report = read_output_disk(path, max_output=CAP, requested=("result.json", "/gone.txt", "adir"))
    assert report.agent_version == "bencher-agent 1"
    assert report.agent_start_ns == 1_500_000_000
    assert report.stdout == b"hello world\n"
    assert report.stderr == b"warn\n"
    assert (report.stdout_total, report.stderr_total) == (12, 5)
    assert report.exit == ExitInfo(exit_code=3, term_signal=0, start_ns=100, end_ns=250)
    assert report.files == {"result.json": b'{"a": 1}'}
    assert report.file_sizes == {"result.json": 8}
    assert report.missing == {"/gone.txt": errno.ENOENT, "adir": errno.EISDIR}
    assert report.errors == []
    assert report.done


def test_killed_by_signal(tmp_path: Path) -> None:
    report = read_output_disk(
        disk(tmp_path, hello(), exit_record(137, 9), DONE), max_output=CAP, requested=()
    )
    assert report.exit is not None
    assert (report.exit.exit_code, report.exit.term_signal) == (137, 9)


def test_empty_disk_reports_nothing(tmp_path: Path) -> None:
    report = read_output_disk(disk(tmp_path), max_output=CAP, requested=())
    assert report.agent_version is None
    assert report.exit is None
    assert not report.done
    assert report.stdout == b""


def test_error_record(tmp_path: Path) -> None:
    error = encode_record(RecordType.ERROR, b"mount /dev/vda on /newroot: No such device")
    report = read_output_disk(disk(tmp_path, hello(), error, DONE), max_output=CAP, requested=())
    assert report.errors == ["mount /dev/vda on /newroot: No such device"]
    assert report.done
    assert report.exit is None


def test_missing_done_keeps_what_arrived(tmp_path: Path) -> None:
    path = disk(tmp_path, hello(), stream(RecordType.STDOUT, b"partial"), stream(RecordType.STDERR, b"e"))
    report = read_output_disk(path, max_output=CAP, requested=())
    assert not report.done
    assert report.exit is None
    assert report.stdout == b"partial"
    assert (report.stdout_total, report.stderr_total) == (7, 1)  # from the records, as EXIT never came


def test_torn_tail_stops_before_the_torn_record(tmp_path: Path) -> None:
    torn = stream(RecordType.STDOUT, b"second chunk")[:-4]
    report = read_output_disk(
        disk(tmp_path, hello(), stream(RecordType.STDOUT, b"first "), torn), max_output=CAP, requested=()
    )
    assert report.stdout == b"first "
    assert not report.done


def test_record_running_past_the_disk_end_is_ignored(tmp_path: Path) -> None:
    path = disk(tmp_path, hello())
    size = path.stat().st_size
    last = stream(RecordType.STDOUT, b"x" * 100)
    with path.open("r+b") as f:
        f.seek(size - 50)
        f.write(last[:50])
    with path.open("r+b") as f:  # also a header claiming more than the disk holds
        f.seek(HEADER_SIZE + len(hello()))
        f.write(b"BRR1" + struct.pack("<HHII", 2, 0, 1 << 30, 0))
    report = read_output_disk(path, max_output=CAP, requested=())
    assert report.agent_version is not None
    assert report.stdout == b""


def test_bad_crc_stops_reading(tmp_path: Path) -> None:
    bad = bytearray(stream(RecordType.STDOUT, b"tampered"))
    bad[-1] ^= 0xFF
    path = disk(tmp_path, hello(), stream(RecordType.STDOUT, b"ok "), bytes(bad), exit_record(0), DONE)
    report = read_output_disk(path, max_output=CAP, requested=())
    assert report.stdout == b"ok "
    assert report.exit is None
    assert not report.done


def test_garbage_after_header(tmp_path: Path) -> None:
    report = read_output_disk(disk(tmp_path, b"\xde\xad\xbe\xef" * 64), max_output=CAP, requested=())
    assert report.agent_version is None
    assert not report.done


def test_nothing_after_done_is_read(tmp_path: Path) -> None:
    path = disk(tmp_path, hello(), DONE, stream(RecordType.STDOUT, b"late"), exit_record(1))
    report = read_output_disk(path, max_output=CAP, requested=())
    assert report.done
    assert report.stdout == b""
    assert report.exit is None


def test_unknown_record_type_is_reported_and_stops(tmp_path: Path) -> None:
    path = disk(tmp_path, hello(), encode_record(99, b"?"), exit_record(0), DONE)
    report = read_output_disk(path, max_output=CAP, requested=())
    assert report.errors == ["unknown or malformed record (type 99) on the output disk"]
    assert report.exit is None


def test_streams_over_the_cap_are_cut_on_the_host_too(tmp_path: Path) -> None:
    chunks = [stream(RecordType.STDOUT, bytes([65 + i]) * 400) for i in range(4)]
    huge = stream(RecordType.STDERR, b"e" * (3 << 20))  # one record bigger than the read chunk
    path = disk(tmp_path, hello(), *chunks, huge, exit_record(0, out=1600, err=3 << 20), DONE, size=8 << 20)
    report = read_output_disk(path, max_output=CAP, requested=())
    assert report.stdout == b"A" * 400 + b"B" * 400 + b"C" * 200
    assert report.stderr == b"e" * CAP
    assert (report.stdout_total, report.stderr_total) == (1600, 3 << 20)
    assert report.done


def test_files_over_the_cap_are_cut_and_keep_their_size(tmp_path: Path) -> None:
    path = disk(tmp_path, file_record(b"big.bin", b"z" * 5000, size=123456), DONE)
    report = read_output_disk(path, max_output=CAP, requested=("big.bin",))
    assert report.files == {"big.bin": b"z" * CAP}
    assert report.file_sizes == {"big.bin": 123456}


def test_file_paths_keep_undecodable_bytes(tmp_path: Path) -> None:
    path = disk(tmp_path, file_record(b"caf\xe9", b"1"), missing_record(b"n\xff", errno.ENOENT), DONE)
    requested = (b"caf\xe9".decode(errors="surrogateescape"), b"n\xff".decode(errors="surrogateescape"))
    report = read_output_disk(path, max_output=CAP, requested=requested)
    assert list(report.files) == [b"caf\xe9".decode("utf-8", errors="surrogateescape")]
    assert [p.encode("utf-8", errors="surrogateescape") for p in report.missing] == [b"n\xff"]


def test_malformed_file_record_is_reported(tmp_path: Path) -> None:
    bad = encode_record(RecordType.FILE, struct.pack("<I", 50) + b"short")
    report = read_output_disk(disk(tmp_path, bad, DONE), max_output=CAP, requested=())
    assert report.errors == ["malformed FILE record (path length 50) on the output disk"]
    assert not report.done


def test_not_an_output_disk(tmp_path: Path) -> None:
    path = tmp_path / "root.img"
    path.write_bytes(bytes(MIN_DISK_SIZE))
    with pytest.raises(SandboxError, match="not a bencher output disk"):
        read_output_disk(path, max_output=CAP, requested=())


# --- a hostile guest writing the output disk (issue 12, finding 10) --------------------------------


def exit_and_done() -> tuple[bytes, bytes]:
    return exit_record(0), DONE


def test_only_requested_files_are_accepted(tmp_path: Path) -> None:
    path = disk(
        tmp_path,
        hello(),
        exit_record(0),
        file_record(b"result.json", b"ok"),
        file_record(b"/etc/shadow", b"root:x"),
        file_record(b"../../escape", b"x"),
        missing_record(b"other", errno.ENOENT),
        DONE,
    )
    report = read_output_disk(path, max_output=CAP, requested=("result.json",))
    assert report.files == {"result.json": b"ok"}
    assert report.file_sizes == {"result.json": 2}
    assert report.missing == {}
    assert report.done
    [warning] = report.warnings
    assert "3 output file record(s) for paths the job did not request" in warning
    assert "'/etc/shadow'" in warning


@pytest.mark.parametrize(
    "name",
    [b"a", b"a/b", b"x\0y", b"..", b"", b"z" * 300, b"/", b"caf\xe9", b"new\nline"],
    ids=["a", "a/b", "nul", "dotdot", "empty", "300-byte", "slash", "latin1", "newline"],
)
def test_hostile_names_nobody_requested_are_never_returned(tmp_path: Path, name: bytes) -> None:
    path = disk(tmp_path, exit_record(0), file_record(name, b"evil"), missing_record(name, 2), DONE)
    report = read_output_disk(path, max_output=CAP, requested=("wanted.txt",))
    assert report.files == {}
    assert report.missing == {}
    assert report.exit is not None and report.done
    assert "2 output file record(s)" in report.warnings[0]
    assert "\n" not in report.warnings[0] and "\0" not in report.warnings[0]


def test_a_requested_path_counts_once(tmp_path: Path) -> None:
    path = disk(
        tmp_path,
        exit_record(0),
        file_record(b"out", b"first"),
        file_record(b"out", b"second"),
        missing_record(b"out", errno.ENOENT),
        missing_record(b"gone", errno.ENOENT),
        file_record(b"gone", b"late"),
        DONE,
    )
    report = read_output_disk(path, max_output=CAP, requested=("out", "gone"))
    assert report.files == {"out": b"first"}
    assert report.missing == {"gone": errno.ENOENT}
    assert "3 more record(s) for output files it had already reported" in report.warnings[0]


def test_only_the_first_exit_counts(tmp_path: Path) -> None:
    path = disk(tmp_path, exit_record(0), exit_record(1), exit_record(2), DONE)
    report = read_output_disk(path, max_output=CAP, requested=())
    assert report.exit is not None and report.exit.exit_code == 0
    assert report.warnings == ["the guest wrote 2 more EXIT record(s); the first counts"]


ONE_BYTE = stream(RecordType.STDOUT, b"x")


@pytest.mark.parametrize(
    ("record", "limit"),
    [
        (ONE_BYTE, max_stream_records(CAP)),
        (stream(RecordType.STDERR, b"e" * 10), max_stream_records(CAP)),
        (missing_record(b"p", errno.ENOENT), max_other_records(1)),
        (hello(), max_other_records(1)),
        (encode_record(RecordType.ERROR, b"e"), max_other_records(1)),
    ],
    ids=["1-byte-stdout", "10-byte-stderr", "unrequested-missing", "hello", "error"],
)
def test_record_count_is_bounded_by_what_was_requested(tmp_path: Path, record: bytes, limit: int) -> None:
    assert max_stream_records(CAP) == 2 * CAP and max_other_records(1) == FIXED_RECORDS + 2
    path = disk(tmp_path, *[record] * (limit + 500), exit_record(0), DONE, size=4 << 20)
    report = read_output_disk(path, max_output=CAP, requested=("wanted",))
    assert report.records == limit
    assert report.exit is None and not report.done  # the EXIT record lies past the limit
    assert f"the guest wrote more than {limit} " in report.warnings[0]


def test_stream_and_other_records_have_their_own_limits(tmp_path: Path) -> None:
    others = [missing_record(b"p", errno.ENOENT)] * (max_other_records(0) - 2)
    streams = [ONE_BYTE] * max_stream_records(CAP)
    path = disk(tmp_path, *others, *streams, exit_record(0), DONE, size=4 << 20)
    report = read_output_disk(path, max_output=CAP, requested=())
    assert report.exit is not None and report.done  # EXIT and DONE are the last ones allowed


def test_error_records_are_bounded(tmp_path: Path) -> None:
    errors = [encode_record(RecordType.ERROR, b"err %d\nwith a second line" % i) for i in range(50)]
    report = read_output_disk(disk(tmp_path, *errors, DONE), max_output=CAP, requested=())
    assert len(report.errors) == MAX_ERRORS
    assert report.errors[0] == "err 0 with a second line"  # one line each
    assert report.warnings == [f"{50 - MAX_ERRORS} more ERROR message(s) from the guest were not kept"]


def test_many_unrequested_records_use_little_memory(tmp_path: Path) -> None:
    records = [missing_record(b"p%d" % i, errno.ENOENT) for i in range(20_000)]
    requested = tuple(f"wanted{i}" for i in range(10_000))  # a limit of 20064 other records
    path = disk(tmp_path, *records, size=8 << 20)
    tracemalloc.start()
    try:
        report = read_output_disk(path, max_output=1 << 20, requested=requested)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.records == 20_000
    assert report.missing == {}
    assert peak < 3 << 20  # the requested names and a read window; the old parser kept every record


def test_the_default_cap_bounds_six_million_tiny_records(tmp_path: Path) -> None:
    max_output = 25 << 20
    limit = max_stream_records(max_output)
    assert limit == MAX_STREAM_RECORDS  # not 2 * 25 Mi records
    path = tmp_path / "out.img"
    create_output_disk(path, output_disk_size(0, max_output))
    with path.open("r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(ONE_BYTE * (limit + 1000) + exit_record(0) + DONE)
    report = read_output_disk(path, max_output=max_output, requested=())
    assert report.records == limit
    assert report.exit is None


def test_nothing_past_the_requested_disk_size_is_read(tmp_path: Path) -> None:
    max_output = 10
    big = stream(RecordType.STDOUT, b"x" * (DISK_SLACK + 100))  # ends past output_disk_size(0, 10)
    path = disk(tmp_path, hello(), big, exit_record(0), DONE, size=16 << 20)
    report = read_output_disk(path, max_output=max_output, requested=())
    assert report.agent_version is not None
    assert report.stdout == b"" and report.exit is None


def test_output_disk_size_has_room_for_every_requested_file() -> None:
    size = output_disk_size(3, 1000)
    assert size >= 5 * 1000 + 3 * (16 + 4 + PATH_MAX + 8) + DISK_SLACK - 1


# --- undecodable names stay valid Unicode on the wire (issue 12, finding 7) ------------------------


def test_undecodable_output_names_are_escaped_on_the_wire(tmp_path: Path) -> None:
    cafe, gone, cut = (b.decode(errors="surrogateescape") for b in (b"caf\xe9", b"n\xff", b"c\xfe"))
    path = disk(
        tmp_path,
        exit_record(0),
        file_record(b"caf\xe9", b"1"),
        missing_record(b"n\xff", errno.ENOENT),
        file_record(b"c\xfe", b"xx", size=5000),
    )
    report = read_output_disk(path, max_output=CAP, requested=(cafe, gone, cut, "later\udcff"))
    assert set(report.files) == {cafe, cut}  # the report keeps the requested paths exactly
    output = iteration_output(report, (cafe, gone, cut, "later\udcff"), mark_uncollected=True)
    assert output.output == {"caf\\xe9": b"1", "c\\xfe": b"xx"}
    assert output.missing == {"n\\xff": os.strerror(errno.ENOENT), "later\\xff": "not collected"}
    assert output.truncated == ("c\\xfe",)
    result = RunResult(status="completed", results=[output], sandbox=None)
    for doc in (result.to_json(), output.to_protocol()):
        json.dumps(doc, ensure_ascii=False).encode()  # no lone surrogate left anywhere


def test_wire_name() -> None:
    assert wire_name("plain/path.txt") == "plain/path.txt"
    assert wire_name("é ✓") == "é ✓"
    assert wire_name(b"a\xff\xfeb".decode(errors="surrogateescape")) == "a\\xff\\xfeb"
    assert wire_name("x\ud800y") == "x\\ud800y"


def test_a_requested_path_the_guest_cannot_be_given_is_skipped(tmp_path: Path) -> None:
    path = disk(tmp_path, exit_record(0), file_record(b"ok", b"1"), DONE)
    report = read_output_disk(path, max_output=CAP, requested=("ok", "\ud800"))  # not encodable
    assert report.files == {"ok": b"1"}


# --- the exit watcher stays in step with the reader -----------------------------------------------


def write_at(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def watcher_for(path: Path, requested: tuple[str, ...] = ()) -> ExitWatcher:
    return ExitWatcher(path, requested=requested, max_output=CAP)


def test_watcher_sees_the_exit(tmp_path: Path) -> None:
    path = disk(tmp_path, hello(), stream(RecordType.STDOUT, b"x"))
    watcher = watcher_for(path)
    assert not watcher.poll()
    write_at(path, HEADER_SIZE + len(hello()) + 17, exit_record(0))
    assert watcher.poll()
    assert watcher.poll()  # stays exited


def test_watcher_does_not_skip_a_half_written_header(tmp_path: Path) -> None:
    """A header that straddles two sectors may land in halves: the length must not be read as 0."""
    path = disk(tmp_path, hello())
    record = stream(RecordType.STDOUT, b"some output")
    at = HEADER_SIZE + len(hello())
    write_at(path, at, record[:6])  # magic and type, the length not yet
    watcher = watcher_for(path)
    assert not watcher.poll()
    assert watcher.offset == at  # did not step over a 16-byte "empty" record
    write_at(path, at, record + exit_record(0))
    assert watcher.poll()


def test_watcher_waits_for_a_payload_still_being_written(tmp_path: Path) -> None:
    path = disk(tmp_path, hello())
    at = HEADER_SIZE + len(hello())
    record = stream(RecordType.STDOUT, b"p" * 5000)
    write_at(path, at, record[:16])  # header first, payload not yet
    watcher = watcher_for(path)
    assert not watcher.poll()
    assert watcher.offset == at
    write_at(path, at, record + exit_record(0))
    assert watcher.poll()


@pytest.mark.parametrize(
    "records",
    [
        [encode_record(RecordType.EXIT, b"\0" * 40)[:-1] + b"\1"],  # EXIT whose payload fails the crc
        [bytes(16), exit_record(0)],  # zeros where a record should start
        [b"\xde\xad\xbe\xef" * 1000],
        [stream(RecordType.STDOUT, b"x" * 100)[:60]],  # torn
    ],
    ids=["bad-crc-exit", "zeros", "garbage", "torn"],
)
def test_watcher_is_not_fooled_by_garbage(tmp_path: Path, records: list[bytes]) -> None:
    path = disk(tmp_path, hello(), *records)
    assert not watcher_for(path).poll()
    assert read_output_disk(path, max_output=CAP, requested=()).exit is None  # they agree


def test_watcher_stops_where_the_reader_stops(tmp_path: Path) -> None:
    limit = max_stream_records(CAP)
    path = disk(tmp_path, *[ONE_BYTE] * (limit + 1), size=4 << 20)
    watcher = watcher_for(path)
    assert watcher.poll()  # past the limit nothing counts: the grace period may start
    assert watcher.offset == HEADER_SIZE + limit * len(ONE_BYTE)
    assert read_output_disk(path, max_output=CAP, requested=()).records == limit


def test_watcher_and_reader_agree_on_a_malformed_record(tmp_path: Path) -> None:
    bad = encode_record(RecordType.FILE, struct.pack("<I", 50) + b"short")
    path = disk(tmp_path, file_record(b"x", b"1"), bad, exit_record(0), DONE)
    assert not watcher_for(path, ("y",)).poll()  # it may still be being written: not past it
    report = read_output_disk(path, max_output=CAP, requested=("y",))
    assert report.exit is None and report.errors


def test_each_watcher_poll_walks_a_bounded_number_of_records(tmp_path: Path) -> None:
    count = 2 * POLL_RECORDS + 10
    path = disk(tmp_path, *[stream(RecordType.STDOUT, b"x")] * count, exit_record(0), size=8 << 20)
    watcher = ExitWatcher(path, requested=(), max_output=10 << 20)
    polls = 1
    while not watcher.poll():
        polls += 1
        assert watcher.offset - HEADER_SIZE <= polls * POLL_RECORDS * 17
    assert polls == 3


@pytest.mark.parametrize("kind", [RecordType.HELLO, RecordType.STDOUT, RecordType.EXIT, RecordType.FILE])
def test_watcher_does_not_stop_at_a_header_whose_length_has_not_landed(
    tmp_path: Path, kind: RecordType
) -> None:
    """Its magic and type are there, its length and crc still zero: for a moment it looks like an empty
    (malformed) record. The watcher must neither step over it nor give up (which would start the grace
    period while the command still runs)."""
    full = {
        RecordType.HELLO: hello(),
        RecordType.STDOUT: stream(RecordType.STDOUT, b"out"),
        RecordType.EXIT: exit_record(0),
        RecordType.FILE: file_record(b"f", b"1"),
    }[kind]
    path = disk(tmp_path)
    write_at(path, HEADER_SIZE, full[:8])
    watcher = watcher_for(path, ("f",))
    assert not watcher.poll()
    assert watcher.offset == HEADER_SIZE
    write_at(path, HEADER_SIZE, full)
    assert watcher.poll() == (kind == RecordType.EXIT)
    write_at(path, HEADER_SIZE + len(full), exit_record(0))
    assert watcher.poll()


@pytest.mark.parametrize("kind", [RecordType.STDOUT, RecordType.STDERR, RecordType.ERROR])
def test_empty_chunks_the_agent_never_writes_end_the_read(tmp_path: Path, kind: RecordType) -> None:
    path = disk(tmp_path, hello(), encode_record(kind, b""), exit_record(0), DONE)
    report = read_output_disk(path, max_output=CAP, requested=())
    assert report.errors == [f"unknown or malformed record (type {int(kind)}) on the output disk"]
    assert report.exit is None
