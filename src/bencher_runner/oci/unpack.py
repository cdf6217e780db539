"""Apply image layers, in order, into a directory tree that becomes the guest's root disk.

Layers are untrusted tar streams and the runner is root, so extraction is done by hand rather than
with ``tarfile.extractall``. Every operation is relative to a directory fd reached from ``dest``
without following any symlink (see :class:`_Tree`), so a symlink planted by an entry, earlier or later
in the layer, can never redirect a write, a chown, a chmod, an xattr or a deletion outside ``dest``.
Symlinks in paths are resolved by hand with chroot semantics (``dest`` is ``/``), the final
component is never followed, names that climb out of the root are refused, whiteouts follow the OCI
layer rules, device nodes are skipped (the guest's /dev is a devtmpfs), and a budget of bytes and
inodes (a job's: its disk, see :class:`ByteBudget`) stops decompression bombs while they extract.
Numbers that chown cannot take are refused, mtimes are clamped to ext4's range, and every error is
one printable UTF-8 line (:func:`_safe`). Layers are streamed; nothing is loaded into memory whole.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import mmap
import os
import queue
import stat
import tarfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard
from isal import igzip, isal_zlib

from bencher_runner.oci.layout import LayerRef
from bencher_runner.spec.errors import ImageError, RunnerError, UnsafeImageError

DEFAULT_MAX_BYTES = 64 * 2**30
MAX_SYMLINKS = 40  # as Linux's path walk
MAX_METADATA_BYTES = 1 << 20  # PAX / GNU long-name headers are read into memory by tarfile: bound them
CHUNK_SIZE = 1 << 20
READAHEAD_CHUNKS = 4  # decompressed chunks a layer's reader thread may hold ready (memory bound)
SCAN_MAX = 4 * 2**30  # what is counted past the disk budget, to say how large a disk an image needs
PAGE_SIZE = mmap.PAGESIZE  # what tmpfs allocates a file's data in
FD_CACHE = 64  # directory fds a layer keeps open, most recently used first
MAX_DEPTH = 512  # directory levels: far beyond real images, within what mkfs -d and os.walk recurse into
PATH_MAX = 4096  # Linux's, for the host path of every entry (the tools after us use paths)
MAX_ID = 2**32 - 2  # chown's largest uid/gid: 2**32 - 1 means "leave unchanged"
EXT4_MIN_TIME, EXT4_MAX_TIME = -(2**31), 2**34 - 2**31 - 1  # what an ext4 inode stores (256-byte inodes)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_META_PREFIX = ".wh..wh."

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}

_HOSTILE = "the image is malformed or hostile, rebuild it"
_MALFORMED = "the image is malformed, rebuild it"


@dataclass
class UnpackStats:
    """What unpacking produced; ``skipped_devices`` holds image paths like ``/dev/null``."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    skipped_devices: list[str] = field(default_factory=list)
    whiteouts: int = 0


class StagingFull(ImageError):
    """The tree passed its staging allowance (tmpfs): the caller unpacks it on disk instead."""


@dataclass
class StagingAllowance:
    """What the tree may take of the tmpfs it is staged on: ``bytes`` of file pages (sizes rounded up
    to whole pages, as tmpfs allocates them; xattrs too) and ``inodes`` (None: unbounded)."""

    bytes: int
    inodes: int | None = None
    used_bytes: int = 0
    used_inodes: int = 0

    def charge(self, size: int, inodes: int, where: str) -> None:
        pages = -(-size // PAGE_SIZE) * PAGE_SIZE
        if self.used_bytes + pages > self.bytes or (
            self.inodes is not None and self.used_inodes + inodes > self.inodes
        ):
            raise StagingFull(
                f"the tree passed its memory allowance of {_human(self.bytes)}"
                + (f" or {self.inodes} inodes" if self.inodes is not None else "")
                + f" at {where}"
            )
        self.used_bytes += pages
        self.used_inodes += inodes

    def release(self, size: int, inodes: int) -> None:
        self.used_bytes = max(0, self.used_bytes - -(-size // PAGE_SIZE) * PAGE_SIZE)
        self.used_inodes = max(0, self.used_inodes - inodes)


@dataclass
class ByteBudget:
    """What the unpacked tree may take, across all layers of one image, charged as entries are written
    (before their data is read) and refunded when a later entry or whiteout removes them.

    ``limit``: regular-file bytes at their apparent size (a sparse member is written dense, zeros and
    all) plus xattr bytes. ``inode_limit``: files, directories, symlinks and FIFOs (a hard link shares
    its target's inode). A job sets both from its disk (``disk_mib``), so a bomb stops at the disk
    size while it extracts; the rest of the image is then only counted, up to a bound, so that the
    error can say which disk it needs (``disk_for(bytes, inodes)`` -> MiB, given by the job).
    ``staging``: the tmpfs allowance, checked against the uncompressed sizes as they are reached;
    passing it raises :class:`StagingFull`.
    """

    limit: int
    used: int = 0
    inode_limit: int | None = None
    inodes: int = 0
    disk_mib: int | None = None
    staging: StagingAllowance | None = None
    disk_for: Callable[[int, int], int] | None = None

    def charge(self, size: int, where: str, *, inodes: int = 0) -> None:
        """Charge ``size`` bytes and ``inodes`` inodes for the entry at ``where``, or raise ImageError."""
        over_bytes = self.used + size > self.limit
        if over_bytes or (self.inode_limit is not None and self.inodes + inodes > self.inode_limit):
            if self.disk_mib is None:
                raise ImageError(self._too_big(where) if over_bytes else self._too_many(where))
            raise _OverBudget(self, "bytes" if over_bytes else "inodes", where)
        if self.staging is not None:
            self.staging.charge(size, inodes, where)
        self.used += size
        self.inodes += inodes

    def release(self, st: os.stat_result) -> None:
        """An entry was removed: refund its inode, and its bytes when it was a file's last link."""
        last = stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1
        size = st.st_size if last and stat.S_ISREG(st.st_mode) else 0
        inodes = 1 if last else 0
        self.used = max(0, self.used - size)
        self.inodes = max(0, self.inodes - inodes)
        if self.staging is not None:
            self.staging.release(size, inodes)

    def _too_big(self, where: str) -> str:
        return (
            f"image unpacks to more than {self.limit} bytes (limit {_human(self.limit)}, reached at "
            f"{where}); the image is too large or a decompression bomb; use a smaller image"
        )

    def _too_many(self, where: str) -> str:
        return (
            f"image has more than {self.inode_limit} files, directories and links (reached at {where}); "
            "use an image with fewer files"
        )

    def over_disk(self, over: _OverBudget) -> str:
        """The error for an image that does not fit its disk, with what was counted of it."""
        found = f"found at {over.where}"
        needed = self.disk_for(over.bytes, over.inodes) if self.disk_for and over.complete else None
        fix = f"pass --disk {needed} or more" if needed else "pass a larger --disk"
        fix += " (or give the job a larger disk)"
        if over.kind == "bytes" and over.complete:
            need = f" and need a disk of at least {needed} MiB" if needed else ""
            return (
                f"the image's files take {-(-over.bytes // 2**20)} MiB{need}, but the disk is "
                f"{self.disk_mib} MiB ({found}); {fix}"
            )
        if over.kind == "bytes":
            return (
                f"the image unpacks to more than {_human(over.bytes)}, far more than its {self.disk_mib} "
                f"MiB disk holds ({found}); if its layers are small, it is a decompression bomb; "
                f"{fix} or use a smaller image"
            )
        count = str(over.inodes) if over.complete else f"more than {over.inodes}"
        return (
            f"the image has more files than an ext4 disk of {self.disk_mib} MiB holds: {count} files, "
            f"directories and links for its {self.inode_limit} inodes ({found}); {fix} or use an image "
            "with fewer files"
        )


class _OverBudget(ImageError):
    """The disk budget ran out at ``where``. What follows is counted from the tar headers, not written:
    up to a bound of decompressed bytes read (as much again as the disk, at most SCAN_MAX) and of
    entries (twice the inodes), and unpack_layers then says how large the image is.
    """

    def __init__(self, budget: ByteBudget, kind: str, where: str) -> None:
        self.kind = kind
        self.where = where
        self.bytes = budget.used
        self.inodes = budget.inodes
        self.complete = False  # the whole image was counted (the message up to then says "more than")
        self.scanned = 0  # decompressed bytes read while counting
        self._cap = budget.limit + min(budget.limit, SCAN_MAX)
        self._inode_cap = 2 * budget.inode_limit if budget.inode_limit is not None else None
        super().__init__(budget.over_disk(self))
        self.complete = True

    def count(self, member: tarfile.TarInfo) -> None:
        if member.isreg():
            self.bytes += max(0, member.size)
        base = member.name.rstrip("/").rpartition("/")[2]
        if not (member.islnk() or member.ischr() or member.isblk() or base.startswith(WHITEOUT_PREFIX)):
            self.inodes += 1

    def full(self) -> bool:
        if self.scanned > self._cap or (self._inode_cap is not None and self.inodes > self._inode_cap):
            self.complete = False
            return True
        return False

    def scan(self, tar: tarfile.TarFile, guarded: _GuardedReader) -> None:
        """Count the rest of ``tar``, skipping the data, until the stream read passes the bound."""
        start = guarded.total
        guarded.stop_at = start + self._cap - self.scanned
        try:
            while not self.full():
                member = tar.next()
                if member is None:
                    break
                getattr(tar, "members").clear()  # noqa: B009 - as in _apply_stream
                self.count(member)
                self.scanned += guarded.total - start
                start = guarded.total
        except _StopReading:
            self.complete = False  # a member larger than what is left to read: "more than"
        except (RunnerError, tarfile.TarError, OSError, EOFError):
            self.complete = False  # a corrupt rest: what was counted is a lower bound
        self.scanned += guarded.total - start

    def scan_layer(self, layer: LayerRef) -> None:
        try:
            with layer.path.open("rb") as f:
                stream, fmt = _sniff(f, layer.media_type, "")
                guarded = _GuardedReader(stream, "", fmt)
                tar = _open_stream(guarded)
                if tar is None:
                    return  # an empty layer
                with tar:
                    self.scan(tar, guarded)
        except (RunnerError, tarfile.TarError, OSError, EOFError):
            self.complete = False


def _human(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _safe(text: str | None) -> str:
    """``text`` (a tar name, a media type, an OS message) made printable, one line and UTF-8-encodable.

    tarfile hands undecodable bytes over as lone surrogates (surrogateescape); those become ``\\xNN``,
    as the bytes were. Control and line-breaking characters (and backslashes, quotes) are escaped, so
    an error text is always one line and always survives ``json.dumps(..., ensure_ascii=False)``.
    """
    if text is None:
        return ""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the usual case, checked in C
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _q(name: str) -> str:
    """``name`` quoted for an error text (see :func:`_safe`)."""
    return f'"{_safe(name)}"'


# --- reading the stream ------------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Prefixed(io.RawIOBase):
    """``head`` (bytes already read to sniff the format) followed by the rest of ``src``."""

    def __init__(self, head: bytes, src: _Readable) -> None:
        self._head = head
        self._src = src

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._src.read(len(view))
        view[: len(data)] = data
        return len(data)


class _ReadAhead:
    """Reads ``src`` (the decompressor) in a thread, up to ``depth`` chunks ahead of the tar reader.

    zlib and zstd release the GIL while they inflate, so decompression runs on another core while the
    main thread creates files; memory stays bounded by ``depth`` chunks. Only the thread touches
    ``src``; its exceptions are re-raised by :meth:`read`, in the reader's place. Call :meth:`close`
    before the underlying file is closed.
    """

    def __init__(self, src: _Readable, depth: int = READAHEAD_CHUNKS) -> None:
        self._src = src
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._chunk = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="oci-unpack-read", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._src.read(CHUNK_SIZE)
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as e:  # handed to the reader, which raises it
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        if not self._chunk:
            if self._done:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            self._chunk = memoryview(item)
        n = len(self._chunk) if size < 0 else min(size, len(self._chunk))
        data = bytes(self._chunk[:n])
        self._chunk = self._chunk[n:]
        return data

    def close(self) -> None:
        """Stop the thread and wait for it (it may be blocked handing over a chunk)."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()


_DECODE_ERRORS = (
    OSError, EOFError, zlib.error, cast(type[Exception], isal_zlib.IsalError), zstandard.ZstdError
)  # fmt: skip


class _StopReading(Exception):
    """A :class:`_GuardedReader` reached its ``stop_at``."""


class _GuardedReader:
    """The decompressed tar stream: turns decoding failures into :class:`ImageError`, counts bytes,
    and stops (:class:`_StopReading`) once ``total`` passes ``stop_at``."""

    def __init__(self, src: _Readable, name: str, fmt: str) -> None:
        self._src = src
        self._name = name
        self._fmt = fmt
        self.total = 0
        self.stop_at: int | None = None

    def read(self, size: int = -1) -> bytes:
        if self.stop_at is not None and self.total > self.stop_at:
            raise _StopReading
        try:
            data = self._src.read(size)
        except _DECODE_ERRORS as e:
            raise ImageError(
                f"{self._name}: cannot decompress ({self._fmt}): {_safe(str(e))}; the layer is corrupt, "
                "pull or build the image again"
            ) from None
        self.total += len(data)
        return data


def _open_stream(guarded: _GuardedReader) -> tarfile.TarFile | None:
    """The layer's tar stream, or None for an empty layer (no bytes at all); the caller closes it."""
    try:
        return tarfile.open(fileobj=cast(IO[bytes], guarded), mode="r|", tarinfo=_BoundedTarInfo)
    except tarfile.ReadError:
        if guarded.total == 0:
            return None
        raise


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses oversized PAX / GNU long-name headers, which tarfile would read into memory whole."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        meta = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME)
        if self.type in (*meta, tarfile.GNUTYPE_LONGLINK) and self.size > MAX_METADATA_BYTES:
            raise UnsafeImageError(
                f"tar metadata header of {self.size} bytes (limit {MAX_METADATA_BYTES}); {_HOSTILE}"
            )
        proc = getattr(super(), "_proc_member")  # noqa: B009 - private tarfile hook, not in the stubs
        return cast(tarfile.TarInfo, proc(tarfile_))


def _sniff(fileobj: _Readable, media_type: str, name: str) -> tuple[_Readable, str]:
    head = b""
    while len(head) < 6:
        chunk = fileobj.read(6 - len(head))
        if not chunk:
            break
        head += chunk
    raw = io.BufferedReader(_Prefixed(head, fileobj), CHUNK_SIZE)
    if head.startswith(_GZIP_MAGIC):
        gz = igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[no-untyped-call]  # ISA-L: ~3x zlib
        return gz, "gzip"
    if head.startswith(_ZSTD_MAGIC):
        reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=CHUNK_SIZE, read_across_frames=True
        )
        return cast(_Readable, reader), "zstd"
    for magic, fmt in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise ImageError(
                f"{name} (media type {_q(media_type)}) is compressed with {fmt}, which OCI layers do not "
                "use; rebuild the image with gzip, zstd or uncompressed layers"
            )
    return raw, "uncompressed"


# --- path resolution inside dest ---------------------------------------------------------------------


def _clean_name(name: str, where: str, what: str = "entry") -> tuple[str, ...]:
    """Lexically normalise a tar path; absolute paths, '..' above the root and NULs are refused."""
    if "\0" in name:
        raise UnsafeImageError(f"{where} {what} {_q(name)}: a NUL byte in the name; {_HOSTILE}")
    if name.startswith("/"):
        raise UnsafeImageError(f"{where} {what} {_q(name)}: absolute path; {_HOSTILE}")
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise UnsafeImageError(f"{where} {what} {_q(name)}: path escapes the image root; {_HOSTILE}")
            parts.pop()
        else:
            parts.append(comp)
    return tuple(parts)


class _Missing(Exception):
    """A path component does not exist (or is not a directory) while resolving without creating."""


def _open_dir(name: str, dir_fd: int) -> int:
    """``name`` in ``dir_fd`` as a directory fd; never follows a symlink, never blocks on a FIFO."""
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


class _Tree:
    """``dest`` seen as a root filesystem, reached through directory fds only.

    The root is opened once (O_NOFOLLOW: a swapped-in symlink is refused) and every other directory
    is opened relative to its parent's fd, one component at a time, with O_NOFOLLOW|O_DIRECTORY, so
    the kernel never follows a symlink of the tree, wherever and whenever it was planted. Symlinks met
    on the way are read here and resolved with chroot semantics (``dest`` is ``/``; ``..`` stops
    there). This component-wise walk was chosen over openat2(RESOLVE_IN_ROOT|RESOLVE_NO_SYMLINKS):
    Python has no binding for it (a ctypes syscall with a fallback would leave two code paths, one
    rarely tested), and missing components must be created on the way anyway. The walk costs little:
    directory fds are cached by their real path (LRU, :data:`FD_CACHE` of them), and an entry whose
    parent is cached costs no lookup at all. Removing a directory drops the fds of its subtree.

    Fds returned by :meth:`resolve_dir` and :meth:`real_dir` belong to the cache: use them before the
    next call that may walk (dup them to keep them longer).
    """

    def __init__(
        self, root: Path, max_symlinks: int = MAX_SYMLINKS, budget: ByteBudget | None = None
    ) -> None:
        self.root = os.fspath(root)
        self.max_symlinks = max_symlinks
        self.budget = budget  # charged for directories created on the way, refunded for removals
        try:
            self.fd = os.open(self.root, _DIR_FLAGS)
        except OSError as e:
            raise ImageError(
                f"unpack destination {_q(self.root)} is not a directory (or is a symbolic link): "
                f"{_safe(e.strerror)}"
            ) from None
        self._root_bytes = len(os.fsencode(self.root))
        self._fds: OrderedDict[str, int] = OrderedDict()

    def __enter__(self) -> _Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.fd)

    def host(self, rel: str) -> str:
        """The host path of ``rel``, for messages and for callers outside the unpacker."""
        return os.path.join(self.root, rel) if rel else self.root

    # -- the fd cache

    def _cached(self, rel: str) -> int | None:
        if not rel:
            return self.fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
        return fd

    def _keep(self, rel: str, fd: int) -> None:
        self._fds[rel] = fd
        if len(self._fds) > FD_CACHE:
            _, oldest = self._fds.popitem(last=False)  # never the fd just used: it is the newest
            os.close(oldest)

    def _drop(self, rel: str) -> None:
        """``rel`` (a directory) is being removed: forget its fd and its subtree's."""
        prefix = rel + "/"
        for key in [k for k in self._fds if k == rel or k.startswith(prefix)]:
            os.close(self._fds.pop(key))

    # -- walking

    def check_new(self, rel: str, where: str) -> None:
        """Refuse to create ``rel`` deeper or longer than the tools after us (mkfs, the guest) handle."""
        depth = rel.count("/") + 1
        if depth > MAX_DEPTH:
            raise UnsafeImageError(f"{where}: more than {MAX_DEPTH} directory levels deep; {_HOSTILE}")
        if self._root_bytes + 1 + len(os.fsencode(rel)) >= PATH_MAX:
            raise ImageError(
                f"{where}: the path /{_q(rel)[1:-1]} is too long ({len(os.fsencode(rel))} bytes; Linux "
                f"paths hold {PATH_MAX - 1}); {_MALFORMED}"
            )

    def real_dir(self, rel: str) -> int | None:
        """The fd of the real directory at ``rel``, reached without following any symlink; None if a
        component is missing, not a directory or a symlink."""
        fd = self._cached(rel)
        if fd is not None:
            return fd
        comps = rel.split("/")
        known = len(comps) - 1
        while known > 0 and "/".join(comps[:known]) not in self._fds:
            known -= 1
        cur = self._cached("/".join(comps[:known]))
        assert cur is not None
        for i in range(known, len(comps)):
            try:
                cur = _open_dir(comps[i], cur)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return None
                raise
            self._keep("/".join(comps[: i + 1]), cur)
        return cur

    def resolve_dir(self, parts: Sequence[str], *, create: bool, where: str) -> tuple[str, int]:
        """Resolve ``parts`` (all followed, symlinks included) to a real directory: (its path relative
        to the root, its fd). With ``create``, missing components become directories (0755); without,
        :class:`_Missing`."""
        pending = list(reversed(parts))
        cur: list[str] = []
        cur_rel = ""
        cur_fd = self.fd
        links = 0
        while pending:
            comp = pending.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                if cur:
                    cur.pop()
                    cur_rel = "/".join(cur)
                    fd = self.real_dir(cur_rel)
                    if fd is None:  # we just came through it
                        raise _Missing(cur_rel)
                    cur_fd = fd
                continue
            rel = f"{cur_rel}/{comp}" if cur_rel else comp
            fd = self._cached(rel)
            if fd is None:
                try:
                    fd = _open_dir(comp, cur_fd)
                except FileNotFoundError:
                    if not create:
                        raise _Missing(rel) from None
                    fd = self._mkdir(cur_fd, comp, rel, where)
                except OSError as e:
                    if e.errno == errno.ENAMETOOLONG and not create:
                        raise _Missing(rel) from None  # no such name can exist
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    if not stat.S_ISLNK(os.stat(comp, dir_fd=cur_fd, follow_symlinks=False).st_mode):
                        if not create:
                            raise _Missing(rel) from None
                        raise ImageError(
                            f"{where}: cannot create {_q('/'.join(parts))}: /{_q(rel)[1:-1]} is not a "
                            f"directory; {_MALFORMED}"
                        ) from None
                    links += 1
                    if links > self.max_symlinks:
                        raise UnsafeImageError(
                            f"{where}: more than {self.max_symlinks} symbolic links while resolving "
                            f"{_q('/'.join(parts))} (a symlink loop?); {_HOSTILE}"
                        ) from None
                    target = os.readlink(comp, dir_fd=cur_fd)
                    if target.startswith("/"):
                        cur, cur_rel, cur_fd = [], "", self.fd
                    pending.extend(reversed(target.split("/")))
                    continue
                self._keep(rel, fd)
            cur.append(comp)
            cur_rel, cur_fd = rel, fd
        return cur_rel, cur_fd

    def _mkdir(self, parent_fd: int, name: str, rel: str, where: str) -> int:
        self.check_new(rel, where)
        if self.budget is not None:
            self.budget.charge(0, where, inodes=1)
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        fd = _open_dir(name, parent_fd)
        os.fchmod(fd, 0o755)  # not subject to the umask
        return fd

    def lookup(self, parts: Sequence[str], where: str) -> tuple[str, int, str] | None:
        """What ``parts`` names, final symlinks followed too: (parent's relative path, parent's fd,
        name), name "" for the root itself; None when it does not exist."""
        parts = list(parts)
        for _ in range(self.max_symlinks + 1):
            if not parts:
                return "", self.fd, ""
            try:
                parent, parent_fd = self.resolve_dir(parts[:-1], create=False, where=where)
            except _Missing:
                return None
            base = parts[-1]
            if base in ("..", "."):
                up = parent.split("/") if parent else []
                parts = up[:-1] if base == ".." else up
                continue
            try:
                st = os.stat(base, dir_fd=parent_fd, follow_symlinks=False)
            except OSError:
                return None
            if not stat.S_ISLNK(st.st_mode):
                return parent, parent_fd, base
            target = os.readlink(base, dir_fd=parent_fd)
            start = [] if target.startswith("/") or not parent else parent.split("/")
            parts = [*start, *(p for p in target.split("/") if p)]
        raise UnsafeImageError(f"more than {self.max_symlinks} symbolic links while resolving {where}")

    # -- removing

    def remove(self, parent_fd: int, name: str, rel: str) -> bool:
        """Delete ``name`` in ``parent_fd`` (at ``rel``) itself, a directory with all it holds, symlinks
        never followed; False if it was absent."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            self._drop(rel)
            self._rmtree(parent_fd, name)
        else:
            os.unlink(name, dir_fd=parent_fd)
        self.released(st)
        return True

    def released(self, st: os.stat_result) -> None:
        if self.budget is not None:
            self.budget.release(st)

    def _rmtree(self, parent_fd: int, name: str) -> None:
        fd = _open_dir(name, parent_fd)
        try:
            with os.scandir(fd) as it:
                children = [e.name for e in it]
            for child in children:
                st = os.stat(child, dir_fd=fd, follow_symlinks=False)  # now: an earlier link went
                if stat.S_ISDIR(st.st_mode):
                    self._rmtree(fd, child)  # depth bounded by MAX_DEPTH
                else:
                    os.unlink(child, dir_fd=fd)
                self.released(st)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


# --- applying one layer ------------------------------------------------------------------------------


@dataclass
class _DirMeta:
    mode: int
    uid: int
    gid: int
    mtime: float
    xattrs: dict[str, bytes]


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
    return out


def _set_xattrs(fd: int, xattrs: dict[str, bytes]) -> None:
    for key, value in xattrs.items():
        with contextlib.suppress(OSError):  # best effort: ENOTSUP, unknown namespaces, ...
            os.setxattr(fd, key, value)


def _set_link_xattrs(parent_fd: int, name: str, xattrs: dict[str, bytes]) -> None:
    """Xattrs of the symlink ``name`` itself. Python's setxattr takes no dir_fd, so the path goes
    through /proc/self/fd/<parent>, a magic link to that very directory: nothing is re-resolved."""
    path = f"/proc/self/fd/{parent_fd}/{name}"
    for key, value in xattrs.items():
        with contextlib.suppress(OSError):  # user.* on symlinks is refused by Linux; no /proc: none
            os.setxattr(path, key, value, follow_symlinks=False)


def _clamp_time(mtime: float) -> float:
    """A tar mtime as ext4 (the guest's disk) stores it: the kernel clamps timestamps written to an
    ext4 inode to 1901-12-13 .. 2446-05-10, and so do we, whatever the staging filesystem; NaN is 0.
    Whole seconds (rounded down): `mkfs.ext4 -d` (e2fsprogs 1.47.0) copies only those, and a tree
    written onto a mounted ext4 (an incremental root disk, layercache.py) must read back the same."""
    if math.isnan(mtime):
        return 0
    return math.floor(min(max(mtime, EXT4_MIN_TIME), EXT4_MAX_TIME))


def _set_mtime(fd: int, mtime: float, name: str | None = None) -> None:
    """The mtime (and atime) of ``fd``, or of ``name`` in ``fd`` itself (a symlink: not followed)."""
    mtime = _clamp_time(mtime)
    try:
        if name is None:
            os.utime(fd, (mtime, mtime))
        else:
            os.utime(name, (mtime, mtime), dir_fd=fd, follow_symlinks=False)
    except (OverflowError, ValueError):
        pass
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise


def _check_numbers(member: tarfile.TarInfo, where: str) -> None:
    """Refuse owners chown cannot set and negative sizes (PAX records carry any integer); GNU tar, too,
    reports an owner out of uid_t's range as an error. Mtimes are clamped instead (:func:`_clamp_time`)."""
    for what, value in (("uid", member.uid), ("gid", member.gid)):
        if not 0 <= value <= MAX_ID:
            raise ImageError(f"{where}: {what} {value} is out of range (0 to {MAX_ID}); {_MALFORMED}")
    if member.size < 0:
        raise ImageError(f"{where}: negative size {member.size}; {_MALFORMED}")


class _LayerApplier:
    def __init__(self, tree: _Tree, name: str, budget: ByteBudget, stats: UnpackStats) -> None:
        self.tree = tree
        self.name = name
        self.budget = budget
        self.stats = stats
        self.created: set[str] = set()  # real paths this layer created, and their ancestors
        self.dir_meta: dict[str, _DirMeta] = {}  # by real path, in the order last seen
        self.skipped: set[tuple[str, ...]] = set()  # device entries left out (by image name)

    def where(self, member_name: str) -> str:
        return f"{self.name} entry {_q(member_name)}"

    def _mark(self, rel: str) -> None:
        while rel and rel not in self.created:
            self.created.add(rel)
            rel = rel.rpartition("/")[0]

    def apply(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        where = self.where(member.name)
        parts = _clean_name(member.name, self.name)
        if not parts:
            if member.isdir():
                return  # the root itself ("./"): its metadata belongs to the runner, not the image
            raise UnsafeImageError(f"{where}: a non-directory entry replaces the image root; {_HOSTILE}")
        base = parts[-1]
        if base == OPAQUE_WHITEOUT or (
            base.startswith(WHITEOUT_PREFIX) and not base.startswith(_META_PREFIX)
        ):
            self._whiteout(parts, where)
            return
        if any(p.startswith(_META_PREFIX) for p in parts):
            return  # AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): not part of the filesystem
        if member.ischr() or member.isblk():
            self.stats.skipped_devices.append("/" + _safe("/".join(parts)))
            self.skipped.add(parts)
            return
        if member.islnk() and _clean_name(member.linkname, where, "hard link target") in self.skipped:
            self.stats.skipped_devices.append("/" + _safe("/".join(parts)))  # a link to a skipped device
            self.skipped.add(parts)
            return
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isfifo()):
            raise ImageError(f"{where}: unsupported tar entry type {member.type!r}; {_MALFORMED}")
        if member.issym() and ("\0" in member.linkname or not member.linkname):
            raise UnsafeImageError(f"{where}: an empty symlink target or a NUL byte in it; {_HOSTILE}")
        _check_numbers(member, where)

        link_src: tuple[str, int, str] | None = None
        try:
            if member.islnk():
                link_src = self._link_target(member, where)
            self._create(member, tar, parts, where, link_src)
        finally:
            if link_src is not None:
                os.close(link_src[1])

    def _create(
        self,
        member: tarfile.TarInfo,
        tar: tarfile.TarFile,
        parts: tuple[str, ...],
        where: str,
        link_src: tuple[str, int, str] | None,
    ) -> None:
        base = parts[-1]
        parent, pfd = self.tree.resolve_dir(parts[:-1], create=True, where=where)
        rel = _join(parent, base)
        self.tree.check_new(rel, where)
        self._mark(rel)

        existing: os.stat_result | None
        try:
            existing = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None

        xattrs = _xattrs(member)
        xattr_bytes = sum(len(k) + len(v) for k, v in xattrs.items())
        if member.isdir():
            self._create_dir(member, pfd, base, rel, existing, xattrs, where)
            return

        if link_src is not None and link_src[0] == rel:
            return  # a hard link to itself: nothing to do
        if existing is not None:
            self.tree.remove(pfd, base, rel)

        if member.islnk():
            pass  # a hard link shares its target's inode
        elif member.isreg():  # before a single byte is read or written
            self.budget.charge(member.size + xattr_bytes, where, inodes=1)
        else:
            self.budget.charge(xattr_bytes, where, inodes=1)
        if member.isreg():
            self._write_file(member, tar, pfd, base, where)
            self.stats.files += 1
        else:
            self._create_special(member, pfd, base, where, link_src, xattrs)

    def _create_dir(
        self,
        member: tarfile.TarInfo,
        pfd: int,
        base: str,
        rel: str,
        existing: os.stat_result | None,
        xattrs: dict[str, bytes],
        where: str,
    ) -> None:
        """A directory entry: made if missing (replacing a non-directory); its mode, owner and times
        are kept in ``dir_meta`` for the end of the layer, as its children change its mtime."""
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            os.unlink(base, dir_fd=pfd)
            self.tree.released(existing)
            existing = None
        xattr_bytes = sum(len(k) + len(v) for k, v in xattrs.items())
        self.budget.charge(xattr_bytes, where, inodes=1 if existing is None else 0)
        if existing is None:
            os.mkdir(base, 0o700, dir_fd=pfd)
        self.stats.dirs += 1
        self.dir_meta.pop(rel, None)
        self.dir_meta[rel] = _DirMeta(stat.S_IMODE(member.mode), member.uid, member.gid, member.mtime, xattrs)

    def _create_special(
        self,
        member: tarfile.TarInfo,
        pfd: int,
        base: str,
        where: str,
        link_src: tuple[str, int, str] | None,
        xattrs: dict[str, bytes],
    ) -> None:
        """A symlink, a hard link or a FIFO, where nothing is any more (the budget is charged)."""
        if member.issym():
            os.symlink(member.linkname, base, dir_fd=pfd)
            os.chown(base, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
            _set_link_xattrs(pfd, base, xattrs)
            _set_mtime(pfd, member.mtime, base)
            self.stats.symlinks += 1
        elif member.islnk():
            assert link_src is not None
            _, src_fd, src_name = link_src
            try:
                os.link(src_name, base, src_dir_fd=src_fd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:  # the target was inside what this entry replaced
                raise UnsafeImageError(
                    f"{where}: hard link target {_q(member.linkname)} no longer exists; {_HOSTILE}"
                ) from None
            self.stats.hardlinks += 1  # a hard link shares its target's inode and metadata
        else:  # FIFO
            os.mkfifo(base, 0o600, dir_fd=pfd)
            fd = os.open(base, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                self._set_meta(fd, member)
            finally:
                os.close(fd)

    def _link_target(self, member: tarfile.TarInfo, where: str) -> tuple[str, int, str]:
        """The hard link's source: (its relative path, a dup of its parent's fd, its name)."""
        parts = _clean_name(member.linkname, where, "hard link target")
        if not parts:
            raise UnsafeImageError(f"{where}: hard link to the image root; {_HOSTILE}")
        try:
            parent, parent_fd = self.tree.resolve_dir(parts[:-1], create=False, where=where)
            st = os.stat(parts[-1], dir_fd=parent_fd, follow_symlinks=False)
        except (_Missing, FileNotFoundError):
            raise UnsafeImageError(
                f"{where}: hard link target {_q(member.linkname)} does not exist in the image; {_HOSTILE}"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeImageError(
                f"{where}: hard link target {_q(member.linkname)} is a directory; {_HOSTILE}"
            )
        return _join(parent, parts[-1]), os.dup(parent_fd), parts[-1]

    def _write_file(
        self, member: tarfile.TarInfo, tar: tarfile.TarFile, parent_fd: int, name: str, where: str
    ) -> None:
        src = tar.extractfile(member)
        if src is None:
            raise ImageError(f"{where}: cannot read the file data; {_MALFORMED}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent_fd)
        try:
            remaining = member.size
            while remaining > 0:
                chunk = src.read(min(CHUNK_SIZE, remaining))
                if not chunk:
                    raise ImageError(f"{where}: the layer ends inside this file; {_MALFORMED}")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                remaining -= len(chunk)
            self.stats.bytes += member.size
            self._set_meta(fd, member)
        finally:
            os.close(fd)

    @staticmethod
    def _set_meta(fd: int, member: tarfile.TarInfo) -> None:
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, stat.S_IMODE(member.mode))  # after chown, which clears setuid/setgid
        _set_xattrs(fd, _xattrs(member))
        _set_mtime(fd, member.mtime)

    def _whiteout(self, parts: tuple[str, ...], where: str) -> None:
        self.stats.whiteouts += 1
        base = parts[-1]
        try:
            parent, parent_fd = self.tree.resolve_dir(parts[:-1], create=False, where=where)
        except _Missing:
            return  # nothing below to hide
        if base == OPAQUE_WHITEOUT:
            self._prune(parent, parent_fd)
            return
        victim = base[len(WHITEOUT_PREFIX) :]
        if victim in ("", ".", ".."):
            raise UnsafeImageError(f"{where}: invalid whiteout name; {_HOSTILE}")
        rel = _join(parent, victim)
        if rel in self.created:
            return  # whiteouts only hide lower layers; this layer's own entry stays
        self.tree.remove(parent_fd, victim, rel)

    def _prune(self, rel_dir: str, dir_fd: int) -> None:
        """Opaque whiteout: delete everything under ``rel_dir`` that this layer did not create."""
        with os.scandir(dir_fd) as it:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for child, is_dir in children:
            rel = _join(rel_dir, child)
            if rel not in self.created:
                self.tree.remove(dir_fd, child, rel)
            elif is_dir:
                fd = _open_dir(child, dir_fd)
                try:
                    self._prune(rel, fd)
                finally:
                    os.close(fd)

    def finish(self) -> None:
        """Apply directory metadata once the layer's contents are in place (0555 dirs get filled).

        Each directory is reached again from the root without following any symlink: one that a later
        entry replaced, whited out or put behind a symlink is skipped, never reached through it.
        """
        for rel, meta in reversed(self.dir_meta.items()):
            fd = self.tree.real_dir(rel)
            if fd is None:
                continue
            os.fchown(fd, meta.uid, meta.gid)
            os.fchmod(fd, meta.mode)
            _set_xattrs(fd, meta.xattrs)
            _set_mtime(fd, meta.mtime)
        self.dir_meta.clear()


def unpack_layer_stream(
    fileobj: BinaryIO | IO[bytes],
    media_type: str,
    dest: Path,
    *,
    name: str,
    budget: ByteBudget,
    stats: UnpackStats | None = None,
) -> UnpackStats:
    """Apply one layer read from ``fileobj`` onto ``dest``; returns ``stats`` (new if not given).

    ``media_type`` is only used in messages: the compression is sniffed from the magic bytes.
    """
    stats = stats if stats is not None else UnpackStats()
    decompressed, fmt = _sniff(fileobj, media_type, name)
    ahead = _ReadAhead(decompressed)
    try:
        with _Tree(dest) as tree:
            _apply_stream(_GuardedReader(ahead, name, fmt), media_type, tree, name, fmt, budget, stats)
    finally:
        ahead.close()
    return stats


def _apply_stream(
    guarded: _GuardedReader,
    media_type: str,
    tree: _Tree,
    name: str,
    fmt: str,
    budget: ByteBudget,
    stats: UnpackStats,
) -> None:
    tree.budget = budget
    applier = _LayerApplier(tree, name, budget, stats)
    where = name
    try:
        tar = _open_stream(guarded)
        if tar is None:
            return  # an empty layer
        with tar:
            while (member := tar.next()) is not None:
                getattr(tar, "members").clear()  # noqa: B009 - stream mode keeps every header otherwise
                where = applier.where(member.name)
                try:
                    applier.apply(member, tar)
                except _OverBudget as over:
                    over.count(member)
                    over.scan(tar, guarded)
                    raise
        where = f"{name} (its directories' metadata)"
        applier.finish()
    except tarfile.TarError as e:
        raise ImageError(
            f"{name} (media type {_q(media_type)}, {fmt}) is not a readable tar archive: {_safe(str(e))}; "
            "the layer is corrupt, pull or build the image again"
        ) from None
    except OSError as e:
        raise ImageError(
            f"{where}: cannot create it in {_q(tree.root)}: {_safe(e.strerror or str(e))}; "
            "check free space and permissions of the work directory"
        ) from e


def unpack_layers(
    layers: Sequence[LayerRef],
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    budget: ByteBudget | None = None,
    first: int = 1,
    total: int | None = None,
) -> UnpackStats:
    """Apply ``layers`` (lowest first) into the existing directory ``dest``; nothing outside it changes.

    ``budget`` (a job's: its disk, perhaps a tmpfs allowance) or else ``max_bytes`` bounds the tree.
    ``first``/``total``: the layers are numbers ``first``.. of an image of ``total`` layers (messages
    say "layer 3/3" when only the top of an image is applied onto its cached lower layers).
    """
    stats = UnpackStats()
    budget = budget if budget is not None else ByteBudget(max_bytes)
    count = total if total is not None else first - 1 + len(layers)
    with _Tree(dest):
        pass  # dest must be a directory, not a symlink: say so before opening any layer
    for i, layer in enumerate(layers, first):
        name = f"layer {i}/{count} {layer.digest[:19]}…"
        try:
            f = layer.path.open("rb")
        except OSError as e:
            raise ImageError(
                f"{name}: cannot open {_q(str(layer.path))}: {_safe(e.strerror)}; check the image layout"
            ) from None
        try:
            with f:
                unpack_layer_stream(f, layer.media_type, dest, name=name, budget=budget, stats=stats)
        except _OverBudget as over:
            for later in layers[i - first + 1 :]:
                if over.full():
                    break
                over.scan_layer(later)
            raise ImageError(budget.over_disk(over)) from None
    return stats


def ensure_directory(dest: Path, path: str) -> None:
    """Create ``path`` (absolute in the image) inside ``dest`` if missing, as Docker does for WorkingDir.

    Resolved with the same chroot semantics as unpacking, so a planted symlink cannot lead outside.
    """
    where = f"working directory {_q(path)}"
    if "\0" in path:
        raise ImageError(f"{where}: contains a NUL byte, which no path can; fix the image's WorkingDir")
    with _Tree(dest) as tree:
        try:
            tree.resolve_dir([p for p in path.split("/") if p], create=True, where=where)
        except OSError as e:
            raise ImageError(
                f"{where}: cannot create it in the image: {_safe(e.strerror or str(e))}"
            ) from None


def resolve_in_tree(dest: Path, path: str, *, max_symlinks: int = MAX_SYMLINKS) -> Path | None:
    """Where ``path`` (absolute in the image, symlinks followed as the image sees them) lies in ``dest``.

    None when it does not exist; UnsafeImageError past ``max_symlinks`` links. Never outside ``dest``.
    """
    if "\0" in path:
        return None  # no file has such a name
    with _Tree(dest, max_symlinks) as tree:
        found = tree.lookup([p for p in path.split("/") if p], where=_q(path))
        if found is None:
            return None
        parent, _, name = found
        return Path(tree.host(_join(parent, name) if name else parent))


def read_image_file(dest: Path, path: str, limit: int = 1 << 20) -> str | None:
    """A small regular file of the unpacked image (/etc/passwd), resolved inside ``dest``; None if absent
    or not a regular file (a FIFO there is never opened for blocking). At most ``limit`` bytes are read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    if "\0" in path:
        return None
    try:
        with _Tree(dest) as tree:
            found = tree.lookup([p for p in path.split("/") if p], where=_q(path))
            if found is None or not found[2]:
                return None
            fd = os.open(found[2], flags, dir_fd=found[1])
    except (ImageError, OSError):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a directory
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")
