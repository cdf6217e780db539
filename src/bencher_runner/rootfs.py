"""The guest's root disk: an ext4 image of exactly the requested size, filled from the unpacked tree.

`mkfs.ext4 -d` (e2fsprogs) formats and populates in one step with no mount and no loop device, and
keeps ownership, modes and xattrs from the tree. The image is then fully allocated (fallocate) so a
guest can never over-commit the host's disk.
"""

import os
import shutil
import subprocess
from pathlib import Path

from bencher_runner.spec.errors import RootfsError
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


def build_rootfs(tree: Path, image: Path, disk_mib: int) -> None:
    """Format ``image`` as ext4 of ``disk_mib`` MiB holding ``tree``; RootfsError when it cannot."""
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
    proc = subprocess.run([mkfs, *MKFS_FLAGS, "-d", str(tree), str(image)], capture_output=True, text=True)
    if proc.returncode != 0:
        message = proc.stderr.strip() or proc.stdout.strip()
        if "No space left" in message or "Could not allocate" in message or "too small" in message:
            raise RootfsError(
                f"the image's files ({bytes_to_mib(content)} MiB) do not fit in a {disk_mib} MiB disk; "
                f"pass a larger --disk (mkfs.ext4: {message.splitlines()[-1]})"
            )
        raise RootfsError(f"mkfs.ext4 failed building the root disk ({disk_mib} MiB): {message}")
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
