import errno
import struct
from pathlib import Path

import pytest

from bencher_runner.sandbox.outputdisk import (
    HEADER_SIZE,
    MIN_DISK_SIZE,
    ExitInfo,
    RecordType,
    create_output_disk,
    encode_record,
    read_output_disk,
)
from bencher_runner.spec.errors import SandboxError

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
    report = read_output_disk(path, max_output=CAP)
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
    report = read_output_disk(disk(tmp_path, hello(), exit_record(137, 9), DONE), max_output=CAP)
    assert report.exit is not None
    assert (report.exit.exit_code, report.exit.term_signal) == (137, 9)


def test_empty_disk_reports_nothing(tmp_path: Path) -> None:
    report = read_output_disk(disk(tmp_path), max_output=CAP)
    assert report.agent_version is None
    assert report.exit is None
    assert not report.done
    assert report.stdout == b""


def test_error_record(tmp_path: Path) -> None:
    error = encode_record(RecordType.ERROR, b"mount /dev/vda on /newroot: No such device")
    report = read_output_disk(disk(tmp_path, hello(), error, DONE), max_output=CAP)
    assert report.errors == ["mount /dev/vda on /newroot: No such device"]
    assert report.done
    assert report.exit is None


def test_missing_done_keeps_what_arrived(tmp_path: Path) -> None:
    path = disk(tmp_path, hello(), stream(RecordType.STDOUT, b"partial"), stream(RecordType.STDERR, b"e"))
    report = read_output_disk(path, max_output=CAP)
    assert not report.done
    assert report.exit is None
    assert report.stdout == b"partial"
    assert (report.stdout_total, report.stderr_total) == (7, 1)  # from the records, as EXIT never came


def test_torn_tail_stops_before_the_torn_record(tmp_path: Path) -> None:
    torn = stream(RecordType.STDOUT, b"second chunk")[:-4]
    report = read_output_disk(
        disk(tmp_path, hello(), stream(RecordType.STDOUT, b"first "), torn), max_output=CAP
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
    report = read_output_disk(path, max_output=CAP)
    assert report.agent_version is not None
    assert report.stdout == b""


def test_bad_crc_stops_reading(tmp_path: Path) -> None:
    bad = bytearray(stream(RecordType.STDOUT, b"tampered"))
    bad[-1] ^= 0xFF
    path = disk(tmp_path, hello(), stream(RecordType.STDOUT, b"ok "), bytes(bad), exit_record(0), DONE)
    report = read_output_disk(path, max_output=CAP)
    assert report.stdout == b"ok "
    assert report.exit is None
    assert not report.done


def test_garbage_after_header(tmp_path: Path) -> None:
    report = read_output_disk(disk(tmp_path, b"\xde\xad\xbe\xef" * 64), max_output=CAP)
    assert report.agent_version is None
    assert not report.done


def test_nothing_after_done_is_read(tmp_path: Path) -> None:
    path = disk(tmp_path, hello(), DONE, stream(RecordType.STDOUT, b"late"), exit_record(1))
    report = read_output_disk(path, max_output=CAP)
    assert report.done
    assert report.stdout == b""
    assert report.exit is None


def test_unknown_record_type_is_reported_and_stops(tmp_path: Path) -> None:
    path = disk(tmp_path, hello(), encode_record(99, b"?"), exit_record(0), DONE)
    report = read_output_disk(path, max_output=CAP)
    assert report.errors == ["unknown or malformed record (type 99) on the output disk"]
    assert report.exit is None


def test_streams_over_the_cap_are_cut_on_the_host_too(tmp_path: Path) -> None:
    chunks = [stream(RecordType.STDOUT, bytes([65 + i]) * 400) for i in range(4)]
    huge = stream(RecordType.STDERR, b"e" * (3 << 20))  # one record bigger than the read chunk
    path = disk(tmp_path, hello(), *chunks, huge, exit_record(0, out=1600, err=3 << 20), DONE, size=8 << 20)
    report = read_output_disk(path, max_output=CAP)
    assert report.stdout == b"A" * 400 + b"B" * 400 + b"C" * 200
    assert report.stderr == b"e" * CAP
    assert (report.stdout_total, report.stderr_total) == (1600, 3 << 20)
    assert report.done


def test_files_over_the_cap_are_cut_and_keep_their_size(tmp_path: Path) -> None:
    path = disk(tmp_path, file_record(b"big.bin", b"z" * 5000, size=123456), DONE)
    report = read_output_disk(path, max_output=CAP)
    assert report.files == {"big.bin": b"z" * CAP}
    assert report.file_sizes == {"big.bin": 123456}


def test_file_paths_keep_undecodable_bytes(tmp_path: Path) -> None:
    path = disk(tmp_path, file_record(b"caf\xe9", b"1"), missing_record(b"n\xff", errno.ENOENT), DONE)
    report = read_output_disk(path, max_output=CAP)
    assert list(report.files) == [b"caf\xe9".decode("utf-8", errors="surrogateescape")]
    assert [p.encode("utf-8", errors="surrogateescape") for p in report.missing] == [b"n\xff"]


def test_malformed_file_record_is_reported(tmp_path: Path) -> None:
    bad = encode_record(RecordType.FILE, struct.pack("<I", 50) + b"short")
    report = read_output_disk(disk(tmp_path, bad, DONE), max_output=CAP)
    assert report.errors == ["malformed FILE record (path length 50) on the output disk"]
    assert not report.done


def test_not_an_output_disk(tmp_path: Path) -> None:
    path = tmp_path / "root.img"
    path.write_bytes(bytes(MIN_DISK_SIZE))
    with pytest.raises(SandboxError, match="not a bencher output disk"):
        read_output_disk(path, max_output=CAP)
