"""Where an image's tree is unpacked for `mkfs.ext4 -d`: in memory (tmpfs) when it surely fits.

The tree lives only from unpack to mkfs, and most of a cold job's preparation is creating its inodes:
on a disk filesystem each create costs the kernel about 30x what it costs on tmpfs (measured here:
180 us vs 5.5 us per file), so staging in `/dev/shm` roughly halves a cold job's preparation. It is
used only when `/dev/shm` is a tmpfs with room for a generous estimate of the tree (from the
compressed size) and the estimate is a small share of the host's available memory. That estimate only
decides where to start: a decompression bomb looks small compressed. The tree then gets an allowance
(:func:`memory_allowance`), which the unpacker checks against the uncompressed sizes as they are
reached; once the tree passes it (or the tmpfs is full), the job drops the tmpfs tree and unpacks
into its work directory on disk, where the disk budget alone applies. Nothing of it reaches the guest
but the ext4 image.

`/dev/shm` is writable by every local user, and the staged tree holds the image's setuid binaries
and is written by root, so the tree lives in `/dev/shm/bencher-runner` only when that directory is
ours: a real directory owned by the runner's euid, mode 0700. One made by anybody else (or a
symlink) is never used, changed or cleaned: the job warns and unpacks on disk. Each job's directory
in it is created fresh (never reused), and removed through the verified parent without following
symlinks (:func:`remove_memory_tree`).
"""

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

SHM = Path("/dev/shm")
STAGING_DIR = "bencher-runner"
TMPFS_MAGIC = 0x01021994
EXPANSION = 5  # unpacked bytes per compressed byte we plan for (gzip on typical images: 2-3)
HEADROOM = 64 << 20
MEMORY_SHARE = 0.25  # at most this share of MemAvailable
INODE_HEADROOM = 1024


def _mem_available() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _is_tmpfs(path: Path) -> bool:
    try:
        import ctypes

        buf = ctypes.create_string_buffer(128)  # struct statfs; f_type is its first field
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.statfs(os.fsencode(path), buf) != 0:
            return False
        return int.from_bytes(buf.raw[:8], "little") == TMPFS_MAGIC
    except OSError:
        return False


def _open_parent(root: Path, *, create: bool, warn: Callable[[str], None]) -> int | None:
    """An fd of ``root``/STAGING_DIR if only we can reach it, created 0700 if missing (``create``).

    Trusted only when it is a real directory (O_NOFOLLOW: a symlink is refused) owned by our euid,
    inside a ``root`` that others cannot rename it out of (sticky, or not writable by others); its
    mode is then set to exactly 0700 (which also masks any ACL). Another user's directory is never
    used nor changed: whoever made it could reach the staged tree (its setuid binaries) or swap the
    job's directory for a symlink. With the parent ours and ``root`` sticky, nobody else can replace
    it later, so paths through it stay good for the job's lifetime.
    """
    path = root / STAGING_DIR
    try:
        root_st = os.stat(root)
    except OSError:
        return None
    if root_st.st_mode & stat.S_IWOTH and not root_st.st_mode & stat.S_ISVTX:
        warn(f"{root} is writable by every user and not sticky: not staging images there")
        return None
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # verified below, whoever made it
        except OSError:
            return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        warn(
            f"{path} is not a directory (a symbolic link or another file): not staging images there; "
            "remove it (did another user make it?)"
        )
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        warn(
            f"{path} is owned by uid {st.st_uid}, not by this runner (uid {os.geteuid()}): not staging "
            "images there, since its owner could reach or redirect them; remove it (who made it?)"
        )
        return None
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def _ignore(text: str) -> None:
    pass


def memory_tree(
    work: Path,
    compressed_bytes: int,
    root: Path | None = None,
    *,
    warn: Callable[[str], None] = _ignore,
) -> Path | None:
    """A fresh directory on tmpfs for ``work``'s tree, or None when the tree should go to disk.

    It is made under the verified staging parent (:func:`_open_parent`) with mkdtemp's semantics
    (mode 0700, and never something that was already there: ``work``'s name is unique, so anything
    with that name is a leftover or planted; the job then unpacks on disk). ``warn`` hears why a
    parent is refused.
    """
    root = root or SHM
    if not root.is_dir() or not _is_tmpfs(root):
        return None
    estimate = compressed_bytes * EXPANSION + HEADROOM
    try:
        st = os.statvfs(root)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < estimate or estimate > _mem_available() * MEMORY_SHARE:
        return None
    parent = _open_parent(root, create=True, warn=warn)
    if parent is None:
        return None
    try:
        os.mkdir(work.name, 0o700, dir_fd=parent)
    except OSError:
        return None
    finally:
        os.close(parent)
    return root / STAGING_DIR / work.name


def memory_allowance(tree: Path) -> tuple[int, int | None]:
    """What unpacking into ``tree`` (on tmpfs) may take: (bytes, inodes; None when unbounded).

    The tmpfs's free space and free inodes less a headroom, and at most MEMORY_SHARE of the host's
    available memory: tmpfs pages are RAM. Checked while extracting, against uncompressed sizes.
    """
    try:
        st = os.statvfs(tree)
    except OSError:
        return 0, 0
    free = st.f_bavail * st.f_frsize - HEADROOM
    inodes = max(0, st.f_favail - INODE_HEADROOM) if st.f_files else None
    return max(0, min(free, int(_mem_available() * MEMORY_SHARE))), inodes


def remove_memory_tree(work: Path, root: Path | None = None) -> None:
    """Remove ``work``'s staged tree, if it has one (a killed runner's leftovers too).

    Through the verified parent only, never following a symlink: another user's directory (which no
    job used) is left alone, a symlink at the job's name is removed itself, a directory there is
    removed with everything in it (shutil.rmtree's fd-based walk).
    """
    parent = _open_parent(root or SHM, create=False, warn=_ignore)
    if parent is None:
        return
    try:
        st = os.stat(work.name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(work.name, dir_fd=parent)
        else:
            os.unlink(work.name, dir_fd=parent)
    except OSError:
        pass  # nothing staged, or already gone
    finally:
        os.close(parent)


def out_of_space(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) is ENOSPC: the estimate was wrong, use the disk."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
