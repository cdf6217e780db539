"""The guest's root disk: an ext4 image of exactly the requested size, filled from the unpacked tree.

`mkfs.ext4 -d` (e2fsprogs) formats and populates in one step with no mount and no loop device, and
keeps ownership, modes and xattrs from the tree. The image is then fully allocated (fallocate) so a
guest can never over-commit the host's disk.
"""

import errno
import json
import os
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


def tree_usage_bytes(tree: Path) -> int:
    """Bytes the tree's files occupy (allocated blocks, each inode counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += max(st.st_blocks * 512, 4096 if name in dirnames else 0)
    return total


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
    """
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        raise RootfsError("mkfs.ext4 is not installed; install it with `apt-get install e2fsprogs`")
    content = tree_usage_bytes(tree)
    needed = min_disk_mib(content)
    if needed > disk_mib:
        raise RootfsError(
            f"the image's files take {bytes_to_mib(content)} MiB and need a disk of at least {needed} MiB, "
            f"but the disk is {disk_mib} MiB; pass --disk {needed} or more"
        )
    os.chmod(tree, 0o755)  # becomes the guest's `/`
    with image.open("wb") as f:
        f.truncate(disk_mib * MIB)
    proc = _run_cancellable([mkfs, *MKFS_FLAGS, "-d", str(tree), str(image)], cancel)
    if proc.returncode != 0:
        message = proc.stderr.strip() or proc.stdout.strip()
        if "No space left" in message or "Could not allocate" in message or "too small" in message:
            raise RootfsError(
                f"the image's files ({bytes_to_mib(content)} MiB) do not fit in a {disk_mib} MiB disk; "
                f"pass a larger --disk (mkfs.ext4: {message.splitlines()[-1]})"
            )
        raise RootfsError(f"mkfs.ext4 failed building the root disk ({disk_mib} MiB): {message}")
    if allocate:
        allocate_disk(image, disk_mib)


def _run_cancellable(argv: list[str], cancel: threading.Event | None) -> subprocess.CompletedProcess[str]:
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=0.1)  # retrying loses no output
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    proc.kill()
                    proc.communicate()
                    raise CanceledError("the job was canceled while its root disk was built") from None
                continue
            return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def allocate_disk(image: Path, disk_mib: int) -> None:
    """Reserve every block: a guest filling its disk can never over-commit the host's."""
    fd = os.open(image, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, disk_mib * MIB)
    except OSError as err:
        raise RootfsError(
            f"cannot reserve {disk_mib} MiB for the root disk at {image}: {err.strerror}; "
            "free host disk space"
        ) from None
    finally:
        os.close(fd)


def copy_disk(src: Path, dest: Path) -> None:
    """A job's own root disk from a (sparse) template: ``dest`` is fully allocated first, then only the
    template's data extents are copied, in the kernel (copy_file_range: no user-space buffer, and on
    filesystems that can, e.g. XFS or btrfs, shared blocks)."""
    size = src.stat().st_size
    with src.open("rb") as s, dest.open("wb") as d:
        fd_in, fd_out = s.fileno(), d.fileno()
        try:
            os.posix_fallocate(fd_out, 0, size)  # the guest can never over-commit the host's disk
        except OSError as err:
            raise RootfsError(
                f"cannot reserve {bytes_to_mib(size)} MiB for the root disk at {dest}: {err.strerror}; "
                "free host disk space"
            ) from None
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
        return Template(disk, doc.get("passwd"), doc.get("group"))

    def put(self, key: str, built: Path, passwd: str | None, group: str | None) -> Template:
        """Move a freshly built (sparse, unallocated) disk into the cache, atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        disk, meta = self.root / f"{key}.ext4", self.root / f"{key}.json"
        tmp = self.root / f".{key}.{os.getpid()}.json"
        tmp.write_text(json.dumps({"passwd": passwd, "group": group}))
        os.replace(built, disk)
        os.replace(tmp, meta)  # the metadata lands last: get() sees a template only when it is whole
        self.prune()
        return Template(disk, passwd, group)

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
