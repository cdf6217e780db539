"""Unpacking in memory (tmpfs) when the tree surely fits, on disk otherwise, never a leftover."""

import errno
import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bencher_runner import staging
from bencher_runner.job import Job, Reporter
from bencher_runner.oci.layout import open_layout
from bencher_runner.paths import work_root
from bencher_runner.recovery import LOCK_NAME, remove_stale_work_dirs
from bencher_runner.spec.config import make_run_config
from bencher_runner.spec.errors import ImageError
from tests.support.oci_builder import build_layout, file


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs standing in for /dev/shm."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "shm"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_tree_goes_to_tmpfs_only_when_it_surely_fits(tmp_path: Path, small_tmpfs: Path) -> None:
    work = tmp_path / "job-a"
    assert staging.memory_tree(work, 1 << 20, root=tmp_path) is None  # not a tmpfs
    assert staging.memory_tree(work, 1 << 20, root=small_tmpfs) is None  # 5 MiB + headroom > 1 MiB
    tree = staging.memory_tree(work, 0, root=Path("/dev/shm"))
    try:
        assert tree == Path("/dev/shm") / staging.STAGING_DIR / "job-a" and tree.is_dir()
    finally:
        if tree is not None:
            tree.rmdir()


def test_out_of_space_is_found_through_the_cause_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise ImageError("layer 1/1: cannot write x") from e
    except ImageError as err:
        assert staging.out_of_space(err)
    assert not staging.out_of_space(ImageError("corrupt"))


def test_an_image_larger_than_the_estimate_falls_back_to_disk(
    tmp_path: Path, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "SHM", small_tmpfs)
    monkeypatch.setattr(staging, "EXPANSION", 0)  # the estimate says it fits; 2 MiB of files do not
    monkeypatch.setattr(staging, "HEADROOM", 0)
    layout = tmp_path / "layout"
    build_layout(
        layout, [[file("big.bin", os.urandom(2 << 20)), file("etc/passwd", "root:x:0:0::/:/bin/sh\n")]]
    )
    warnings: list[str] = []

    class Record(Reporter):
        def warn(self, text: str) -> None:
            warnings.append(text)

    job = Job(make_run_config(image=f"{layout}:latest"), cache=tmp_path / "cache", reporter=Record())
    work = tmp_path / "job-b"
    work.mkdir()
    tree, passwd, _ = job._unpack(work, open_layout(f"{layout}:latest"))
    assert tree == work / "tree" and (tree / "big.bin").stat().st_size == 2 << 20
    assert passwd is not None and passwd.startswith("root:")
    assert any("did not fit" in w for w in warnings), warnings
    assert list((small_tmpfs / staging.STAGING_DIR).iterdir()) == []  # the partial tree is gone


def test_a_killed_runners_memory_tree_is_removed_with_its_work_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shm = tmp_path / "shm"
    monkeypatch.setattr(staging, "SHM", shm)
    root = work_root(tmp_path)
    stale, live = root / "job-stale", root / "job-live"
    for work in (stale, live):
        work.mkdir(parents=True)
        (work / LOCK_NAME).touch()
        (shm / staging.STAGING_DIR / work.name / "etc").mkdir(parents=True)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    lock = os.open(live / LOCK_NAME, os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        assert remove_stale_work_dirs(tmp_path) == [stale]
    finally:
        os.close(lock)
    assert not (shm / staging.STAGING_DIR / "job-stale").exists()
    assert (shm / staging.STAGING_DIR / "job-live" / "etc").is_dir()
