"""Apply image layers, in order, into a directory tree that becomes the guest's root disk.

Layers are untrusted tar streams and the runner is root, so extraction is done by hand rather than
with ``tarfile.extractall``: every path is resolved inside ``dest`` with chroot semantics (symlinks
planted by earlier entries are followed as if ``dest`` were ``/``, never out of it), the final
component is never followed, names that climb out of the root are refused, whiteouts follow the OCI
layer rules, device nodes are skipped (the guest's /dev is a devtmpfs) and a byte budget stops
decompression bombs. Layers are streamed; nothing is loaded into memory whole.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import queue
import shutil
import stat
import tarfile
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard
from isal import igzip, isal_zlib

from bencher_runner.oci.layout import LayerRef
from bencher_runner.spec.errors import ImageError, UnsafeImageError

DEFAULT_MAX_BYTES = 64 * 2**30
MAX_SYMLINKS = 40  # as Linux's path walk
MAX_METADATA_BYTES = 1 << 20  # PAX / GNU long-name headers are read into memory by tarfile: bound them
CHUNK_SIZE = 1 << 20
READAHEAD_CHUNKS = 4  # decompressed chunks a layer's reader thread may hold ready (memory bound)

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


@dataclass
class ByteBudget:
    """Regular-file bytes allowed across all layers of one image; ``used`` grows as files are written."""

    limit: int
    used: int = 0

    def charge(self, size: int, where: str) -> None:
        if self.used + size > self.limit:
            raise ImageError(
                f"image unpacks to more than {self.limit} bytes (limit {_human(self.limit)}, reached at "
                f"{where}); the image is too large or a decompression bomb; use a smaller image"
            )
        self.used += size


def _human(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def _q(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


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


class _GuardedReader:
    """The decompressed tar stream: turns decoding failures into :class:`ImageError`, counts bytes."""

    def __init__(self, src: _Readable, name: str, fmt: str) -> None:
        self._src = src
        self._name = name
        self._fmt = fmt
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._src.read(size)
        except _DECODE_ERRORS as e:
            raise ImageError(
                f"{self._name}: cannot decompress ({self._fmt}): {e}; the layer is corrupt, "
                "pull or build the image again"
            ) from None
        self.total += len(data)
        return data


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
                f"{name} (media type {media_type}) is compressed with {fmt}, which OCI layers do not use; "
                "rebuild the image with gzip, zstd or uncompressed layers"
            )
    return raw, "uncompressed"


# --- path resolution inside dest ---------------------------------------------------------------------


def _clean_name(name: str, where: str, what: str = "entry") -> tuple[str, ...]:
    """Lexically normalise a tar path; absolute paths and '..' above the root are refused."""
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


class _Tree:
    """``dest`` seen as a root filesystem: resolves paths with chroot semantics, never leaves it."""

    def __init__(self, root: Path, max_symlinks: int = MAX_SYMLINKS) -> None:
        self.root = os.fspath(root)
        self.max_symlinks = max_symlinks
        self._dirs: set[str] = set()  # real (non-symlink) directories seen, as relative paths

    def host(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def forget_dirs(self) -> None:
        """Called whenever a directory is deleted: the cache of known directories may be stale."""
        self._dirs.clear()

    def resolve_dir(self, parts: Sequence[str], *, create: bool, where: str) -> str:
        """Resolve ``parts`` (all followed, symlinks included) to a real directory; returns it relative.

        With ``create``, missing components become directories (0755); without, :class:`_Missing`.
        """
        pending = list(reversed(parts))
        cur: list[str] = []
        links = 0
        while pending:
            comp = pending.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                if cur:
                    cur.pop()
                continue
            rel = "/".join((*cur, comp))
            if rel in self._dirs:
                cur.append(comp)
                continue
            path = self.host(rel)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise _Missing(rel) from None
                os.mkdir(path, 0o755)
                os.chmod(path, 0o755)  # not subject to the umask
                self._dirs.add(rel)
                cur.append(comp)
                continue
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > self.max_symlinks:
                    raise UnsafeImageError(
                        f"{where}: more than {self.max_symlinks} symbolic links while resolving "
                        f"{_q('/'.join(parts))} (a symlink loop?); {_HOSTILE}"
                    )
                target = os.readlink(path)
                if target.startswith("/"):
                    cur = []
                pending.extend(reversed(target.split("/")))
                continue
            if stat.S_ISDIR(st.st_mode):
                self._dirs.add(rel)
                cur.append(comp)
                continue
            if not create:
                raise _Missing(rel)
            raise ImageError(
                f"{where}: cannot create {_q('/'.join(parts))}: /{rel} is not a directory; {_MALFORMED}"
            )
        return "/".join(cur)

    def remove(self, rel: str) -> bool:
        """Delete ``rel`` itself (a directory recursively, symlinks not followed); False if absent."""
        path = self.host(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # never follows symlinks (fd-based on Linux)
            self.forget_dirs()
        else:
            os.unlink(path)
        return True


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


# --- applying one layer ------------------------------------------------------------------------------


@dataclass
class _DirMeta:
    rel: str
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


def _set_xattrs(target: str | int, xattrs: dict[str, bytes]) -> None:
    for key, value in xattrs.items():
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError:
            pass  # best effort: ENOTSUP, user.* on symlinks, unknown namespaces, ...


def _set_mtime(target: str | int, mtime: float) -> None:
    try:
        if isinstance(target, int):
            os.utime(target, (mtime, mtime))
        else:
            os.utime(target, (mtime, mtime), follow_symlinks=False)
    except (OverflowError, ValueError):
        pass
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise


class _LayerApplier:
    def __init__(self, tree: _Tree, name: str, budget: ByteBudget, stats: UnpackStats) -> None:
        self.tree = tree
        self.name = name
        self.budget = budget
        self.stats = stats
        self.created: set[str] = set()  # real paths this layer created, and their ancestors
        self.dir_meta: list[_DirMeta] = []
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
            self.stats.skipped_devices.append("/" + "/".join(parts))
            self.skipped.add(parts)
            return
        if member.islnk() and _clean_name(member.linkname, where, "hard link target") in self.skipped:
            self.stats.skipped_devices.append("/" + "/".join(parts))  # a hard link to a skipped device
            self.skipped.add(parts)
            return
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isfifo()):
            raise ImageError(f"{where}: unsupported tar entry type {member.type!r}; {_MALFORMED}")

        link_src: str | None = None
        if member.islnk():
            link_src = self._link_target(member, where)
        if member.isreg():
            self.budget.charge(member.size, where)  # before a single byte is read or written

        parent = self.tree.resolve_dir(parts[:-1], create=True, where=where)
        rel = _join(parent, base)
        path = self.tree.host(rel)
        self._mark(rel)

        existing: os.stat_result | None
        try:
            existing = os.lstat(path)
        except FileNotFoundError:
            existing = None

        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                os.unlink(path)
                existing = None
            if existing is None:
                os.mkdir(path, 0o700)
            self.stats.dirs += 1
            self.dir_meta.append(
                _DirMeta(
                    rel, stat.S_IMODE(member.mode), member.uid, member.gid, member.mtime, _xattrs(member)
                )
            )
            return

        if link_src is not None and link_src == rel:
            return  # a hard link to itself: nothing to do
        if existing is not None:
            self.tree.remove(rel)

        if member.isreg():
            self._write_file(member, tar, path, where)
            self.stats.files += 1
            return
        if member.issym():
            os.symlink(member.linkname, path)
            self.stats.symlinks += 1
        elif member.islnk():
            assert link_src is not None
            try:
                os.link(self.tree.host(link_src), path, follow_symlinks=False)
            except FileNotFoundError:  # the target was inside what this entry replaced
                raise UnsafeImageError(
                    f"{where}: hard link target {_q(member.linkname)} no longer exists; {_HOSTILE}"
                ) from None
            self.stats.hardlinks += 1
            return  # a hard link shares its target's inode and metadata
        else:  # FIFO
            os.mkfifo(path, 0o600)
        self._set_meta(path, member, is_link=member.issym())

    def _link_target(self, member: tarfile.TarInfo, where: str) -> str:
        parts = _clean_name(member.linkname, where, "hard link target")
        if not parts:
            raise UnsafeImageError(f"{where}: hard link to the image root; {_HOSTILE}")
        try:
            parent = self.tree.resolve_dir(parts[:-1], create=False, where=where)
            rel = _join(parent, parts[-1])
            st = os.lstat(self.tree.host(rel))
        except (_Missing, FileNotFoundError):
            raise UnsafeImageError(
                f"{where}: hard link target {_q(member.linkname)} does not exist in the image; {_HOSTILE}"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeImageError(
                f"{where}: hard link target {_q(member.linkname)} is a directory; {_HOSTILE}"
            )
        return rel

    def _write_file(self, member: tarfile.TarInfo, tar: tarfile.TarFile, path: str, where: str) -> None:
        src = tar.extractfile(member)
        if src is None:
            raise ImageError(f"{where}: cannot read the file data; {_MALFORMED}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                remaining = member.size
                while remaining > 0:
                    chunk = src.read(min(CHUNK_SIZE, remaining))
                    if not chunk:
                        raise ImageError(f"{where}: the layer ends inside this file; {_MALFORMED}")
                    out.write(chunk)
                    remaining -= len(chunk)
            self.stats.bytes += member.size
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, stat.S_IMODE(member.mode))  # after chown, which clears setuid/setgid
            _set_xattrs(fd, _xattrs(member))
            _set_mtime(fd, member.mtime)
        finally:
            os.close(fd)

    def _set_meta(self, path: str, member: tarfile.TarInfo, *, is_link: bool) -> None:
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
        if not is_link:
            os.chmod(path, stat.S_IMODE(member.mode))  # path is a FIFO this function just created
        _set_xattrs(path, _xattrs(member))
        _set_mtime(path, member.mtime)

    def _whiteout(self, parts: tuple[str, ...], where: str) -> None:
        self.stats.whiteouts += 1
        base = parts[-1]
        try:
            parent = self.tree.resolve_dir(parts[:-1], create=False, where=where)
        except _Missing:
            return  # nothing below to hide
        if base == OPAQUE_WHITEOUT:
            self._prune(parent)
            return
        victim = base[len(WHITEOUT_PREFIX) :]
        if victim in ("", ".", ".."):
            raise UnsafeImageError(f"{where}: invalid whiteout name; {_HOSTILE}")
        rel = _join(parent, victim)
        if rel in self.created:
            return  # whiteouts only hide lower layers; this layer's own entry stays
        self.tree.remove(rel)

    def _prune(self, rel_dir: str) -> None:
        """Opaque whiteout: delete everything under ``rel_dir`` that this layer did not create."""
        with os.scandir(self.tree.host(rel_dir)) as it:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for child, is_dir in children:
            rel = _join(rel_dir, child)
            if rel not in self.created:
                self.tree.remove(rel)
            elif is_dir:
                self._prune(rel)

    def finish(self) -> None:
        """Apply directory metadata once the layer's contents are in place (0555 dirs get filled)."""
        for meta in reversed(self.dir_meta):
            path = self.tree.host(meta.rel)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                continue  # replaced or whited out later in the same layer
            except OSError as e:
                if e.errno == errno.ELOOP:  # replaced by a symlink later in the layer
                    continue
                raise
            try:
                os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, meta.mode)
                _set_xattrs(fd, meta.xattrs)
                _set_mtime(fd, meta.mtime)
            finally:
                os.close(fd)
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
        _apply_stream(_GuardedReader(ahead, name, fmt), media_type, dest, name, fmt, budget, stats)
    finally:
        ahead.close()
    return stats


def _apply_stream(
    guarded: _GuardedReader,
    media_type: str,
    dest: Path,
    name: str,
    fmt: str,
    budget: ByteBudget,
    stats: UnpackStats,
) -> None:
    applier = _LayerApplier(_Tree(dest), name, budget, stats)
    try:
        try:
            tar = tarfile.open(  # noqa: SIM115 - closed by the `with` below
                fileobj=cast(IO[bytes], guarded), mode="r|", tarinfo=_BoundedTarInfo
            )
        except tarfile.ReadError:
            if guarded.total == 0:
                return  # an empty layer
            raise
        with tar:
            while (member := tar.next()) is not None:
                getattr(tar, "members").clear()  # noqa: B009 - stream mode keeps every header otherwise
                try:
                    applier.apply(member, tar)
                except OSError as e:
                    raise ImageError(
                        f"{applier.where(member.name)}: cannot write {e.filename or dest}: {e.strerror}; "
                        "check free space and permissions of the work directory"
                    ) from e
    except tarfile.TarError as e:
        raise ImageError(
            f"{name} (media type {media_type}, {fmt}) is not a readable tar archive: {e}; "
            "the layer is corrupt, pull or build the image again"
        ) from None
    applier.finish()


def unpack_layers(
    layers: Sequence[LayerRef], dest: Path, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> UnpackStats:
    """Apply ``layers`` (lowest first) into the existing directory ``dest``; nothing outside it changes."""
    if not dest.is_dir():
        raise ImageError(f"unpack destination {dest} is not a directory")
    stats = UnpackStats()
    budget = ByteBudget(max_bytes)
    for i, layer in enumerate(layers, 1):
        name = f"layer {i}/{len(layers)} {layer.digest[:19]}…"
        try:
            f = layer.path.open("rb")
        except OSError as e:
            raise ImageError(
                f"{name}: cannot open {layer.path}: {e.strerror}; check the image layout"
            ) from None
        with f:
            unpack_layer_stream(f, layer.media_type, dest, name=name, budget=budget, stats=stats)
    return stats


def ensure_directory(dest: Path, path: str) -> None:
    """Create ``path`` (absolute in the image) inside ``dest`` if missing, as Docker does for WorkingDir.

    Resolved with the same chroot semantics as unpacking, so a planted symlink cannot lead outside.
    """
    tree = _Tree(dest)
    tree.resolve_dir([p for p in path.split("/") if p], create=True, where=f"working directory {_q(path)}")


def resolve_in_tree(dest: Path, path: str, *, max_symlinks: int = MAX_SYMLINKS) -> Path | None:
    """Where ``path`` (absolute in the image, symlinks followed as the image sees them) lies in ``dest``.

    None when it does not exist; UnsafeImageError past ``max_symlinks`` links. Never outside ``dest``.
    """
    tree = _Tree(dest, max_symlinks)
    parts = [p for p in path.split("/") if p]
    for _ in range(max_symlinks + 1):
        if not parts:
            return Path(tree.root)
        try:
            parent = tree.resolve_dir(parts[:-1], create=False, where=_q(path))
        except _Missing:
            return None
        if parts[-1] == "..":
            parts = [*(parent.split("/")[:-1] if parent else [])]
            continue
        full = tree.host(_join(parent, parts[-1]))
        try:
            st = os.lstat(full)
        except OSError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            return Path(full)
        target = os.readlink(full)
        base = [] if target.startswith("/") else parent.split("/") if parent else []
        parts = [*base, *(p for p in target.split("/") if p)]
    raise UnsafeImageError(f"more than {max_symlinks} symbolic links while resolving {_q(path)}")


def read_image_file(dest: Path, path: str, limit: int = 1 << 20) -> str | None:
    """A small regular file of the unpacked image (/etc/passwd), resolved inside ``dest``; None if absent."""
    try:
        full = resolve_in_tree(dest, path)
    except ImageError:
        return None
    if full is None:
        return None
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(limit).decode("utf-8", errors="replace")
