"""The guest's root disk: an ext4 image of exactly the requested size, filled from the unpacked tree.

`mkfs.ext4 -d` (e2fsprogs) formats and populates in one step with no mount and no loop device, and
keeps ownership, modes and xattrs from the tree. The image is then fully allocated (fallocate) so a
guest can never over-commit the host's disk.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bencher_runner.spec.errors import CanceledError, RootfsError
from bencher_runner.spec.units import MIB, bytes_to_mib

MKFS_FLAGS = ["-q", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
# ext4's own metadata (inode tables, journal, group descriptors) on top of the files' blocks.
OVERHEAD_FRACTION = 0.08
OVERHEAD_MIN_MIB = 8


def tree_usage(tree: Path) -> tuple[int, int]:
    """Bytes the tree's files occupy (allocated blocks) and the inodes they need, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += max(st.st_blocks * 512, 4096 if name in dirnames else 0)
    return total, len(seen) + 1  # and the root directory


def min_disk_mib(content_bytes: int) -> int:
    content = bytes_to_mib(content_bytes)
    return content + max(OVERHEAD_MIN_MIB, int(content * OVERHEAD_FRACTION) + 1)


def build_rootfs(
    tree: Path,
    image: Path,
    disk_mib: int,
    *,
    allocate: bool = True,
    cancel: threading.Event | None = None,
) -> None:
    """Format ``image`` as ext4 of ``disk_mib`` MiB holding ``tree``; RootfsError when it cannot.

    ``allocate=False`` leaves it sparse: a cached template, whose per-job copies get allocated.
    ``cancel``: set it to stop mkfs within 0.1 s (CanceledError), so a canceled job frees its worker.
    On any failure (mkfs, cancel, a full host filesystem, an exception) ``image`` is removed.
    """
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        raise RootfsError("mkfs.ext4 is not installed; install it with `apt-get install e2fsprogs`")
    content, inodes = tree_usage(tree)
    needed = min_disk_mib(content)
    if needed > disk_mib:
        raise RootfsError(
            f"the image's files take {bytes_to_mib(content)} MiB and need a disk of at least {needed} MiB, "
            f"but the disk is {disk_mib} MiB; pass --disk {needed} or more"
        )
    os.chmod(tree, 0o755)  # becomes the guest's `/`
    try:
        with image.open("wb") as f:
            f.truncate(disk_mib * MIB)
        capacity = _inode_capacity(mkfs, image, disk_mib, cancel)
        # `inodes` counts the root directory, which is one of ext4's reserved inodes (inode 2)
        if capacity is not None and inodes - 1 + RESERVED_INODES > capacity:
            raise _too_many_inodes(mkfs, image, disk_mib, inodes, capacity, needed, cancel)
        proc = _run_cancellable([mkfs, *MKFS_FLAGS, "-d", str(tree), str(image)], cancel)
        if proc.returncode != 0:
            raise _mkfs_error(proc, mkfs, image, disk_mib, content, inodes, needed, cancel)
        if allocate:
            allocate_disk(image, disk_mib)
    except BaseException:
        image.unlink(missing_ok=True)  # a partial disk costs host space and is never used
        raise


RESERVED_INODES = 11  # ext4's first non-reserved inode; lost+found takes one more


def _inode_capacity(mkfs: str, image: Path, disk_mib: int, cancel: threading.Event | None) -> int | None:
    """The inodes mkfs.ext4 makes for a disk of ``disk_mib`` MiB, asked of mkfs itself (-n: nothing is
    written), so its own configuration decides; None if it does not say."""
    argv = [mkfs, "-n", *MKFS_FLAGS[1:], str(image), f"{disk_mib}M"]
    proc = _run_cancellable(argv, cancel, timeout=30)
    found = re.search(r" and (\d+) inodes", proc.stdout + proc.stderr)
    return int(found.group(1)) if found else None


def _disk_for_inodes(
    mkfs: str, image: Path, disk_mib: int, inodes: int, cancel: threading.Event | None
) -> int | None:
    """The smallest disk (MiB, a multiple of 64) at least ``disk_mib`` whose ext4 has room for
    ``inodes`` files and a quarter more for the benchmark's own."""
    wanted = inodes * 5 // 4 + RESERVED_INODES + 1

    def enough(mib: int) -> bool:
        capacity = _inode_capacity(mkfs, image, mib, cancel)
        return capacity is not None and capacity >= wanted

    low, high = disk_mib, max(64, disk_mib)
    while not enough(high):
        low, high = high, high * 2
        if high > 1 << 24:  # 16 TiB: no suggestion
            return None
    while high - low > 64:
        middle = (low + high) // 2
        if enough(middle):
            high = middle
        else:
            low = middle
    return -(-high // 64) * 64


def _too_many_inodes(
    mkfs: str,
    image: Path,
    disk_mib: int,
    inodes: int,
    capacity: int,
    needed_mib: int,
    cancel: threading.Event | None,
) -> RootfsError:
    suggest = _disk_for_inodes(mkfs, image, max(disk_mib, needed_mib), inodes, cancel)
    fix = f"pass --disk {suggest} or more" if suggest else "pass a much larger --disk"
    return RootfsError(
        f"the image has {inodes} files and directories but a {disk_mib} MiB ext4 disk has only {capacity} "
        f"inodes (mkfs.ext4 makes one per 4 KiB of disk below 512 MiB and one per 16 KiB from 512 MiB); "
        f"{fix} (spec.disk for a job)"
    )


def _mkfs_error(
    proc: subprocess.CompletedProcess[str],
    mkfs: str,
    image: Path,
    disk_mib: int,
    content: int,
    inodes: int,
    needed_mib: int,
    cancel: threading.Event | None,
) -> RootfsError:
    """What a failed mkfs means: the host filesystem is full, the disk's inodes ran out, or the files
    do not fit in the disk. mkfs.ext4 says "No space left on device"/"short write" for the first (a
    write to the image file failed) and "Could not allocate inode/block in ext2 filesystem" inside."""
    message = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()
    last = message[-1]
    text = " ".join(message)
    free, mount = free_bytes(image.parent)
    if "No space left on device" in text or "short write" in text or (free is not None and free < MIB):
        shown = f"{free // MIB} MiB free" if free is not None else "full"
        return RootfsError(
            f"the host filesystem at {mount} is full ({shown}) while mkfs.ext4 wrote the {disk_mib} MiB "
            f"root disk under {image.parent}; free space there or point --cache-dir at a larger "
            f"filesystem (mkfs.ext4: {last})"
        )
    if "Could not allocate inode" in text:
        capacity = _inode_capacity(mkfs, image, disk_mib, cancel) or 0
        return _too_many_inodes(mkfs, image, disk_mib, inodes, capacity, needed_mib, cancel)
    if "Could not allocate" in text or "too small" in text:
        return RootfsError(
            f"the image's files ({bytes_to_mib(content)} MiB) do not fit in a {disk_mib} MiB disk; "
            f"pass a larger --disk (mkfs.ext4: {last})"
        )
    return RootfsError(f"mkfs.ext4 failed building the root disk ({disk_mib} MiB): {'; '.join(message)}")


def _run_cancellable(
    argv: list[str], cancel: threading.Event | None, *, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    deadline = None if timeout is None else time.monotonic() + timeout
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=0.1)  # retrying loses no output
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    proc.kill()
                    proc.communicate()
                    raise CanceledError("the job was canceled while its root disk was built") from None
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    stdout, stderr = proc.communicate()
                    return subprocess.CompletedProcess(argv, -9, stdout, stderr)
                continue
            return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def allocate_disk(image: Path, disk_mib: int) -> None:
    """Reserve every block: a guest filling its disk can never over-commit the host's."""
    fd = os.open(image, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, disk_mib * MIB)
    except OSError as err:
        raise _no_room(image, disk_mib, err) from None
    finally:
        os.close(fd)


def _no_room(disk: Path, disk_mib: int, err: OSError) -> RootfsError:
    free, mount = free_bytes(disk.parent)
    shown = f"{free // MIB} MiB" if free is not None else "too little"
    return RootfsError(
        f"cannot reserve {disk_mib} MiB for the root disk at {disk}: {err.strerror}; the filesystem at "
        f"{mount} has {shown} free: free space there, ask for a smaller disk (--disk, spec.disk), or "
        "point --cache-dir at a larger filesystem"
    )


def copy_disk(src: Path, dest: Path) -> None:
    """A job's own root disk from a (sparse) template: ``dest`` is fully allocated first, then only the
    template's data extents are copied, in the kernel (copy_file_range: no user-space buffer, and on
    filesystems that can, e.g. XFS or btrfs, shared blocks). ``dest`` is removed if this fails."""
    size = src.stat().st_size
    try:
        with src.open("rb") as s, dest.open("wb") as d:
            fd_in, fd_out = s.fileno(), d.fileno()
            try:
                os.posix_fallocate(fd_out, 0, size)  # the guest can never over-commit the host's disk
            except OSError as err:
                raise _no_room(dest, bytes_to_mib(size), err) from None
            copy_extents(fd_in, fd_out, size)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def copy_extents(fd_in: int, fd_out: int, size: int) -> None:
    """Copy the data extents of the first ``size`` bytes of ``fd_in`` to the same offsets of ``fd_out``
    (in the kernel: copy_file_range); holes are skipped, so a sparse source stays sparse."""
    for offset, length in _data_extents(fd_in, size):
        _copy_range(fd_in, fd_out, offset, length)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        offset = end


def _copy_range(fd_in: int, fd_out: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        at = offset + done
        try:
            n = os.copy_file_range(fd_in, fd_out, length - done, at, at)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = os.pwrite(fd_out, os.pread(fd_in, min(length - done, 8 << 20), at), at)
        if n == 0:
            raise RootfsError(f"copying the root disk template stopped early at byte {at}")
        done += n


def free_bytes(path: Path) -> tuple[int | None, Path]:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem (``path`` need not exist
    yet: its nearest existing parent is asked), and that filesystem's mount point."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        st = os.statvfs(existing)
    except OSError:
        return None, existing
    return st.f_bavail * st.f_frsize, mount_point(existing)


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path`` (which exists)."""
    path = path.resolve()
    try:
        dev = path.stat().st_dev
        while path != path.parent and path.parent.stat().st_dev == dev:
            path = path.parent
    except OSError:
        pass
    return path


# --- template cache -------------------------------------------------------------------------------
# A root disk depends only on the image (layers, WorkingDir) and the disk size: the guest agent and the
# job's config live in the initramfs, not on the disk. So a warm job copies a cached template (sparse
# or reflink) instead of unpacking and formatting again. Bump the version when unpack or mkfs change.
TEMPLATE_VERSION = 1
MAX_TEMPLATES = 8
RECENT_USE_S = 600  # never prune a template used this recently (a job may be copying it)


@dataclass(frozen=True)
class Template:
    disk: Path
    passwd: str | None  # the image's /etc/passwd and /etc/group, for resolving its User at job time
    group: str | None
    key: str  # template_key(): the image and the disk size it was built for


def template_key(manifest_digest: str, disk_mib: int) -> str:
    algorithm, _, hexpart = manifest_digest.partition(":")
    return f"{algorithm}-{hexpart}-{disk_mib}M-v{TEMPLATE_VERSION}"


class TemplateCache:
    def __init__(self, cache: Path) -> None:
        self.root = cache / "rootfs"

    def get(self, key: str) -> Template | None:
        disk, meta = self.root / f"{key}.ext4", self.root / f"{key}.json"
        try:
            doc = json.loads(meta.read_text())
            os.utime(disk)  # LRU: last use
        except (OSError, ValueError):
            return None
        return Template(disk, doc.get("passwd"), doc.get("group"), key)

    def put(self, key: str, built: Path, passwd: str | None, group: str | None) -> Template:
        """Move a freshly built (sparse, unallocated) disk into the cache, atomically; on failure
        nothing of it is left in the cache."""
        self.root.mkdir(parents=True, exist_ok=True)
        disk, meta = self.root / f"{key}.ext4", self.root / f"{key}.json"
        tmp = self.root / f".{key}.{os.getpid()}.json"
        try:
            tmp.write_text(json.dumps({"passwd": passwd, "group": group}))
            os.replace(built, disk)
            os.replace(tmp, meta)  # the metadata lands last: get() sees a template only when it is whole
        except BaseException:
            tmp.unlink(missing_ok=True)
            if not meta.exists():
                disk.unlink(missing_ok=True)
            raise
        self.prune()
        return Template(disk, passwd, group, key)

    def prune(self, keep: int = MAX_TEMPLATES) -> None:
        disks = sorted(self.root.glob("*.ext4"), key=lambda p: p.stat().st_mtime, reverse=True)
        now = time.time()
        for disk in disks[keep:]:
            if now - disk.stat().st_mtime > RECENT_USE_S:
                disk.with_suffix(".json").unlink(missing_ok=True)
                disk.unlink(missing_ok=True)


# --- inode count ------------------------------------------------------------------------------------
# What `mkfs.ext4` with MKFS_FLAGS gives a disk, so that unpacking can refuse an image with more files
# than its disk can hold while it extracts, not after a tree of millions of files is built. The
# figures are e2fsprogs' defaults (mke2fs.conf usage types by size: floppy < 3 MiB, small < 512 MiB,
# big >= 4 TiB, huge >= 16 TiB; 256-byte inodes) and its rounding in ext2fs_initialize(); a unit test
# checks them against the real mkfs.ext4.
_EXT4_TYPES = ((3, 1024, 8192), (512, 1024, 4096), (4 << 20, 4096, 16384), (16 << 20, 4096, 32768))
_EXT4_HUGE = (4096, 65536)
_EXT4_INODE_SIZE = 256
_EXT4_DESC_SIZE = 64  # the 64bit feature is on in mke2fs.conf's ext4 features
EXT4_RESERVED_INODES = 11  # 1-10 are reserved (the root is 2), 11 is lost+found; the rest: the tree's


def ext4_inode_count(disk_mib: int) -> int:
    """How many inodes `mkfs.ext4` (MKFS_FLAGS, stock mke2fs.conf) makes on a disk of ``disk_mib`` MiB."""
    blocksize, ratio = next(((b, r) for limit, b, r in _EXT4_TYPES if disk_mib < limit), _EXT4_HUGE)
    blocks = requested = disk_mib * MIB // blocksize
    first_data_block = 1 if blocksize == 1024 else 0
    per_group = blocksize * 8
    desc_per_block = blocksize // _EXT4_DESC_SIZE
    wanted = max(requested * blocksize // ratio, 12)
    while True:
        groups = _ceil(blocks - first_data_block, per_group)
        desc_blocks = _ceil(groups, desc_per_block)
        table_blocks = _ceil(_ceil(wanted, groups) * _EXT4_INODE_SIZE, blocksize)
        inodes_per_group = (table_blocks * blocksize // _EXT4_INODE_SIZE) & ~7  # whole blocks, then /8
        table_blocks = _ceil(inodes_per_group * _EXT4_INODE_SIZE, blocksize)
        # A last group too small for its own metadata (+50 blocks) is dropped and the sums redone.
        growth = blocks * 1024 if blocks < 0xFFFFFFFF // 1024 else 0xFFFFFFFF
        reserved_gdt = _ceil(_ceil(growth - first_data_block, per_group), desc_per_block) - desc_blocks
        last_overhead = 2 + table_blocks
        if _has_super_backup(groups - 1):
            last_overhead += 1 + desc_blocks + min(reserved_gdt, blocksize // 4)
        rest = (blocks - first_data_block) % per_group
        if rest and rest < last_overhead + 50:
            blocks -= rest
            continue
        return inodes_per_group * groups


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _has_super_backup(group: int) -> bool:
    """sparse_super: groups 0, 1 and powers of 3, 5 and 7 hold a superblock copy."""
    if group <= 1:
        return True
    for base in (3, 5, 7):
        power = base
        while power < group:
            power *= base
        if power == group:
            return True
    return False
