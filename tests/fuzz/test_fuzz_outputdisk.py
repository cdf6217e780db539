"""Fuzz the output-disk parser and the exit watcher with what a hostile guest could write (hypothesis).

Random bytes, and random sequences of well-formed, corrupted and torn records with paths that were or
were not requested. Whatever the disk holds: only requested paths come back, every stream and file
is at most max_output bytes, the record count stays within the job's limits, the watcher agrees with
the reader, every failure is a one-line RunnerError, the result is valid Unicode on the wire, and
saving it never writes outside the output directory. Each example also has a deadline.
"""

import json
import struct
import tempfile
import zlib
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bencher_runner.run import save_outputs
from bencher_runner.sandbox.outputdisk import (
    HEADER_SIZE,
    ExitWatcher,
    RecordType,
    create_output_disk,
    encode_record,
    iteration_output,
    max_other_records,
    max_stream_records,
    read_output_disk,
)
from bencher_runner.spec.errors import RunnerError
from bencher_runner.spec.results import RunResult

FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DISK_SIZE = 1 << 20

names = st.one_of(
    st.sampled_from(["out.txt", "a", "a/b", "/abs", "..", "", "x\0y", "z" * 300, "caf\udce9", "d/../e"]),
    st.text(max_size=20),
    st.binary(max_size=20).map(lambda b: b.decode("utf-8", errors="surrogateescape")),
)
requested_lists = st.lists(names, max_size=6)


def path_bytes(path: str) -> bytes:
    return path.encode("utf-8", errors="surrogatepass")


@st.composite
def records(draw: st.DrawFn, requested: list[str]) -> bytes:
    kind = draw(st.sampled_from([*RecordType, 0, 9, 0xFFFF]))
    pick_requested = bool(requested) and draw(st.booleans())
    path = path_bytes(draw(st.sampled_from(requested)) if pick_requested else draw(names))
    small = st.integers(0, 2**31 - 1)
    payload = {
        RecordType.HELLO: lambda: struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + draw(st.binary()),
        RecordType.STDOUT: lambda: draw(st.binary(max_size=300)),
        RecordType.STDERR: lambda: draw(st.binary(max_size=300)),
        RecordType.EXIT: lambda: struct.pack("<iiQQQQ", draw(small), draw(small), 1, 2, 3, 4),
        RecordType.FILE: lambda: (
            struct.pack("<I", draw(st.sampled_from([len(path), 5000, 2**32 - 1])))
            + path
            + struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
            + draw(st.binary(max_size=300))
        ),
        RecordType.FILE_MISSING: lambda: struct.pack("<i", draw(st.integers(-(2**31), 2**31 - 1))) + path,
        RecordType.ERROR: lambda: draw(st.binary(max_size=100)),
    }.get(kind, lambda: draw(st.binary(max_size=50)))()
    record = encode_record(kind, payload)
    damage = draw(st.sampled_from(["none"] * 6 + ["flip", "torn", "bad-length"]))
    if damage == "flip":
        at = draw(st.integers(0, len(record) - 1))
        record = record[:at] + bytes([record[at] ^ 0xFF]) + record[at + 1 :]
    elif damage == "torn":
        record = record[: draw(st.integers(0, len(record) - 1))]
    elif damage == "bad-length":
        length = draw(st.integers(0, 2**32 - 1))
        record = record[:8] + struct.pack("<I", length) + record[12:]
    return record


@st.composite
def hostile_disks(draw: st.DrawFn) -> tuple[list[str], int, bytes]:
    requested = draw(requested_lists)
    max_output = draw(st.sampled_from([0, 1, 100, 1 << 20]))
    if draw(st.booleans()):
        body = draw(st.binary(max_size=4096))
    else:
        body = b"".join(draw(st.lists(records(requested), max_size=40)))
    if draw(st.booleans()):  # many copies of one small valid record: the record limits
        body += encode_record(RecordType.STDOUT, b"x") * draw(st.integers(0, 3000))
        body += encode_record(RecordType.FILE_MISSING, struct.pack("<i", 2) + b"p") * draw(
            st.integers(0, 200)
        )
    return requested, max_output, body[: DISK_SIZE - HEADER_SIZE]


def one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text and "\0" not in text


def check(requested: list[str], max_output: int, body: bytes, workdir: Path) -> None:
    path = workdir / "out.img"
    create_output_disk(path, DISK_SIZE)
    with path.open("r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(body)
    try:
        report = read_output_disk(path, max_output=max_output, requested=requested)
    except RunnerError as err:  # pragma: no cover - the header is always valid here
        assert one_line(str(err))
        return
    assert set(report.files) <= set(requested) and set(report.missing) <= set(requested)
    assert set(report.files).isdisjoint(report.missing)
    assert len(report.stdout) <= max_output and len(report.stderr) <= max_output
    assert all(len(data) <= max_output for data in report.files.values())
    assert report.records <= max_stream_records(max_output) + max_other_records(len(requested))
    assert all(one_line(text) for text in (*report.errors, *report.warnings))
    assert len(report.errors) <= 9 and len(report.warnings) <= 5

    watcher = ExitWatcher(path, requested=requested, max_output=max_output)
    for _ in range(4):
        watcher.poll()
    if report.exit is not None or report.done:
        assert watcher.exited  # it saw what the reader saw
    if watcher.exited:
        assert report.exit is not None or report.done or report.errors or report.warnings

    if report.exit is not None:
        output = iteration_output(report, requested, mark_uncollected=not report.done)
        result = RunResult(status="completed", results=[output], sandbox=None)
        json.dumps(result.to_json(), ensure_ascii=False).encode()
        json.dumps(output.to_protocol(), ensure_ascii=False).encode()
        out_dir = workdir / "saved"
        save_outputs(result, out_dir)
        for item in workdir.rglob("*"):
            assert item == path or item.resolve().is_relative_to(out_dir.resolve())


@FUZZ
@given(hostile_disks())
def test_hostile_output_disks(disk: tuple[list[str], int, bytes]) -> None:
    requested, max_output, body = disk
    with tempfile.TemporaryDirectory() as tmp:
        check(requested, max_output, body, Path(tmp))


@FUZZ
@given(requested_lists, st.binary(min_size=16, max_size=64))
def test_a_valid_looking_header_with_random_rest(requested: list[str], tail: bytes) -> None:
    """The magic, then random type, flags, length and crc and payload: the hardest case for the crc."""
    body = b"BRR1" + tail
    with tempfile.TemporaryDirectory() as tmp:
        check(requested, 100, body, Path(tmp))


def test_crc_of_the_empty_payload_is_zero() -> None:
    """Why empty stream chunks are refused: a header whose length and crc have not landed is valid."""
    assert zlib.crc32(b"") == 0
