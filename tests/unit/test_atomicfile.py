"""The one atomic file write (issue 14: it replaced eight copies of "temp, fsync, rename")."""

import os
from pathlib import Path

import pytest

from bencher_runner.atomicfile import write_atomic


def test_writes_bytes_and_text_with_the_mode_asked(tmp_path: Path) -> None:
    old = os.umask(0o077)  # the mode is the one given, whatever the umask
    try:
        write_atomic(tmp_path / "a.bin", b"\x00\xff", mode=0o644)
        write_atomic(tmp_path / "b.txt", "é\n", mode=0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "b.txt").read_bytes() == "é\n".encode()
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt"]


def test_replaces_an_existing_file_and_an_empty_payload(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    inode = target.stat().st_ino
    write_atomic(target, "")
    assert target.read_text() == "" and target.stat().st_ino != inode  # a new file renamed over it


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "link").symlink_to(victim)
    write_atomic(tmp_path / "link", "new")
    assert victim.read_text() == "keep"
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link").read_text() == "new"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "outbox.json"
    target.write_text("whole")

    def no_space(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, b"x" * 10)
    monkeypatch.undo()
    assert target.read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["outbox.json"]


def test_a_missing_directory_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "such" / "file", "x")


@pytest.mark.parametrize(("durable", "syncs"), [(True, 2), (False, 0)])
def test_durable_fsyncs_the_file_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, syncs: int
) -> None:
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(tmp_path / "f", b"data", durable=durable)
    assert len(synced) == syncs
    assert (tmp_path / "f").read_bytes() == b"data"


def test_a_large_payload_is_written_whole(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    write_atomic(tmp_path / "vmlinux", data)
    assert (tmp_path / "vmlinux").read_bytes() == data
