"""Unpacking in memory (tmpfs) when the tree surely fits, on disk otherwise, never a leftover."""

import errno
import fcntl
import os
import stat
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
    tree, passwd, _ = job.disks.unpack(work, open_layout(f"{layout}:latest"))
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


# --- finding 2: the staging parent is trusted only when it is ours, 0700, and not a symlink ---------

NOBODY = 65534


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs standing in for /dev/shm: root-owned, world-writable and sticky, as /dev/shm is."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs and chowning need root")
    mnt = tmp_path / "devshm"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(root)), p.lstat().st_uid, stat.S_IMODE(p.lstat().st_mode)) for p in root.rglob("*")
    )


def test_a_parent_made_by_another_user_is_not_used(tmp_path: Path, shm: Path) -> None:
    parent = shm / staging.STAGING_DIR
    parent.mkdir(mode=0o777)
    os.chmod(parent, 0o777)
    os.chown(parent, NOBODY, NOBODY)
    warnings: list[str] = []
    assert staging.memory_tree(tmp_path / "job-a", 0, root=shm, warn=warnings.append) is None
    assert os.listdir(parent) == []
    st = parent.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o777)  # left alone
    assert len(warnings) == 1 and f"uid {NOBODY}" in warnings[0] and str(parent) in warnings[0], warnings


@pytest.mark.parametrize("kind", ["symlink to another user's dir", "symlink to ours", "file", "fifo"])
def test_a_parent_that_is_not_a_real_directory_is_not_used(tmp_path: Path, shm: Path, kind: str) -> None:
    parent = shm / staging.STAGING_DIR
    target = shm / "elsewhere"
    target.mkdir(mode=0o700)
    if kind == "symlink to another user's dir":
        os.chmod(target, 0o777)
        os.chown(target, NOBODY, NOBODY)
    if kind.startswith("symlink"):
        parent.symlink_to(target)
    elif kind == "file":
        parent.write_text("")
    else:
        os.mkfifo(parent)
    before = _listing(shm)
    warnings: list[str] = []
    assert staging.memory_tree(tmp_path / "job-a", 0, root=shm, warn=warnings.append) is None
    assert _listing(shm) == before
    assert len(warnings) == 1 and str(parent) in warnings[0], warnings


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o777, 0o1777])
def test_our_own_parent_is_reused_and_kept_at_0700(tmp_path: Path, shm: Path, mode: int) -> None:
    parent = shm / staging.STAGING_DIR
    parent.mkdir()
    os.chmod(parent, mode)
    tree = staging.memory_tree(tmp_path / "job-a", 0, root=shm)
    assert tree == parent / "job-a" and tree.is_dir() and not tree.is_symlink()
    assert stat.S_IMODE(parent.lstat().st_mode) == 0o700
    assert parent.lstat().st_uid == os.geteuid()


def test_a_fresh_parent_is_0700_and_ours(tmp_path: Path, shm: Path) -> None:
    tree = staging.memory_tree(tmp_path / "job-a", 0, root=shm)
    assert tree is not None
    st = tree.parent.lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()


@pytest.mark.parametrize("planted", ["symlink", "dir", "fifo"])
def test_a_job_dir_already_there_is_never_used(tmp_path: Path, shm: Path, planted: str) -> None:
    """Created fresh, as mkdtemp does: whatever already has the job's name (a symlink swapped in, a
    leftover) makes the job unpack on disk instead; the symlink's target gets nothing."""
    parent = shm / staging.STAGING_DIR
    parent.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.mkdir()
    job_dir = parent / "job-a"
    if planted == "symlink":
        job_dir.symlink_to(target)
    elif planted == "dir":
        job_dir.mkdir()
    else:
        os.mkfifo(job_dir)
    assert staging.memory_tree(tmp_path / "job-a", 0, root=shm) is None
    assert os.listdir(target) == []


def test_a_job_falls_back_to_disk_when_an_attacker_owns_the_parent(
    tmp_path: Path, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "SHM", shm)
    monkeypatch.setattr(staging, "HEADROOM", 0)  # the image surely fits the 64 MiB tmpfs
    parent = shm / staging.STAGING_DIR
    parent.mkdir()
    os.chmod(parent, 0o777)
    os.chown(parent, NOBODY, NOBODY)
    layout = tmp_path / "layout"
    build_layout(
        layout, [[file("bin/su", "setuid", mode=0o4755), file("etc/passwd", "root:x:0:0::/:/bin/sh\n")]]
    )
    warnings: list[str] = []

    class Record(Reporter):
        def warn(self, text: str) -> None:
            warnings.append(text)

    job = Job(make_run_config(image=f"{layout}:latest"), cache=tmp_path / "cache", reporter=Record())
    work = tmp_path / "job-c"
    work.mkdir()
    tree, passwd, _ = job.disks.unpack(work, open_layout(f"{layout}:latest"))
    assert tree == work / "tree" and (tree / "bin" / "su").exists() and passwd is not None
    assert os.listdir(parent) == []
    assert any(f"uid {NOBODY}" in w for w in warnings), warnings


def test_the_staged_tree_is_reachable_by_root_only(tmp_path: Path, shm: Path) -> None:
    tree = staging.memory_tree(tmp_path / "job-a", 0, root=shm)
    assert tree is not None
    for p in (tree.parent, tree):
        assert stat.S_IMODE(p.lstat().st_mode) & 0o077 == 0, oct(p.lstat().st_mode)


@pytest.mark.parametrize("kind", ["symlinked parent", "another user's parent", "symlinked job dir"])
def test_stale_cleanup_never_follows_a_symlink(
    tmp_path: Path, shm: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A killed job's tree is removed through the verified parent only: a symlink at the parent or
    at the job's name is never followed, and another user's directory is never touched."""
    monkeypatch.setattr(staging, "SHM", shm)
    victim = tmp_path / "victim"
    (victim / "job-stale").mkdir(parents=True)
    (victim / "job-stale" / "precious").write_text("keep")
    parent = shm / staging.STAGING_DIR
    if kind == "symlinked parent":
        parent.symlink_to(victim)
    elif kind == "another user's parent":
        parent.mkdir()
        os.chmod(parent, 0o777)
        (parent / "job-stale").mkdir()
        (parent / "job-stale" / "theirs").write_text("theirs")
        os.chown(parent, NOBODY, NOBODY)
    else:
        parent.mkdir(mode=0o700)
        (parent / "job-stale").symlink_to(victim / "job-stale")
    root = work_root(tmp_path)
    stale = root / "job-stale"
    stale.mkdir(parents=True)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert remove_stale_work_dirs(tmp_path) == [stale]
    assert (victim / "job-stale" / "precious").read_text() == "keep"
    if kind == "another user's parent":
        assert (parent / "job-stale" / "theirs").read_text() == "theirs"
    if kind == "symlinked job dir":
        assert not os.path.lexists(parent / "job-stale")  # the link itself goes
