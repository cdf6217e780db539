"""A content-addressed blob cache shared by every runner process on a host.

Blobs live at ``<root>/blobs/sha256/<hex>`` (an OCI layout's blob tree, so a cached image's layer
paths look like a layout's). A blob is written to a temp file in the same directory and renamed into
place only after its digest and size were checked, so a reader never sees a partial or unverified
blob. A per-blob ``flock`` on ``<root>/locks/<hex>.lock`` makes two concurrent pulls of one blob
download it once. Each use touches the blob's mtime, which is the "last used" time the LRU prune
goes by (atime is unreliable under relatime/noatime).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from bencher_runner.oci.digest import digest_bytes, parse_digest
from bencher_runner.spec.errors import CanceledError, DigestMismatchError, ImageError

TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600
LOCK_POLL_SECONDS = 0.05  # how often a cancellable wait for a blob lock retries
CANCELED_PULL = "the job was canceled while its image was pulled"


def image_cache_dir(cache: Path) -> Path:
    """Where a runner keeps its image blobs inside its cache directory."""
    return cache / "images"


@dataclass(frozen=True)
class CacheEntry:
    """One cached blob: digest, size in bytes, last use (UTC) and its path."""

    digest: str
    size: int
    last_used: datetime
    path: Path


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed and what is left."""

    removed: tuple[CacheEntry, ...]
    freed_bytes: int
    kept_bytes: int
    kept_count: int


class BlobCache:
    """The blob store at ``root`` (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def blob_dir(self) -> Path:
        return self.root / "blobs" / "sha256"

    def path(self, digest: str) -> Path:
        """The blob's path (the digest is validated before it becomes a path)."""
        parsed = parse_digest(digest, what="blob digest")
        return self.root / "blobs" / parsed.algorithm / parsed.hex

    def _lock_path(self, digest: str) -> Path:
        parsed = parse_digest(digest, what="blob digest")
        return self.root / "locks" / f"{parsed.algorithm}-{parsed.hex}.lock"

    def lookup(self, digest: str, size: int | None = None) -> Path | None:
        """The cached blob's path if present as a regular file (and of ``size`` bytes when given);
        touches it. Anything else at that path (a FIFO, a symlink) is a miss, replaced on the next
        :meth:`ensure`; read a hit with :func:`~bencher_runner.oci.untrusted.open_regular`."""
        path = self.path(digest)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
            return None
        _touch(path)
        return path

    @contextlib.contextmanager
    def locked(self, digest: str, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold the blob's exclusive lock (waits while another process downloads it).

        With ``cancel``, the wait polls and ends with :class:`CanceledError` once it is set: the lock's
        holder may be a hung pull, and a job must stay cancellable whatever it waits for.
        """
        lock_path = self._lock_path(digest)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            if cancel is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                _flock_cancellable(fd, cancel)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def ensure(
        self,
        digest: str,
        size: int,
        fetch: Callable[[BinaryIO], str],
        *,
        what: str = "blob",
        cancel: threading.Event | None = None,
    ) -> tuple[Path, bool]:
        """Return (path, was_cached) for blob ``digest``, calling ``fetch`` to write it if missing.

        ``fetch`` writes the blob into the file it is given and returns the digest of what it wrote. The
        file is renamed into place only if that digest and the size match; otherwise it is deleted and a
        :class:`DigestMismatchError` / :class:`ImageError` names the expected and actual values.
        ``cancel``: waiting for another process's download of the blob ends when it is set.
        """
        try:
            return self._ensure(digest, size, fetch, what, cancel)
        except OSError as e:
            raise ImageError(
                f"cannot store {what} {digest} in the image cache {self.root}: {e.strerror or e}; free disk "
                "space, fix the directory's permissions or choose another cache directory"
            ) from None

    def _ensure(
        self,
        digest: str,
        size: int,
        fetch: Callable[[BinaryIO], str],
        what: str,
        cancel: threading.Event | None,
    ) -> tuple[Path, bool]:
        found = self.lookup(digest, size)
        if found is not None:
            return found, True
        final = self.path(digest)
        with self.locked(digest, cancel):
            found = self.lookup(digest, size)  # another process may have fetched it meanwhile
            if found is not None:
                return found, True
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{final.name[:16]}-", dir=final.parent)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "w+b") as f:
                    actual = fetch(f)
                    f.flush()
                    os.fsync(f.fileno())
                    written = os.fstat(f.fileno()).st_size
                if actual != digest:
                    raise DigestMismatchError(f"{what} {digest}", digest, actual)
                if written != size:
                    raise ImageError(
                        f"{what} {digest}: size mismatch: the descriptor says {size} bytes, {written} were "
                        "received; the image is corrupt on the registry, push it again"
                    )
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _touch(final)
            return final, False

    def put_bytes(self, digest: str, data: bytes) -> Path:
        """Store already-verified bytes (manifests) under ``digest``."""

        def write(f: BinaryIO) -> str:
            f.write(data)
            return digest_bytes(data, parse_digest(digest).algorithm)

        path, _ = self.ensure(digest, len(data), write, what="manifest")
        return path

    def entries(self) -> list[CacheEntry]:
        """Every complete blob, least recently used first."""
        out: list[CacheEntry] = []
        base = self.root / "blobs"
        if not base.is_dir():
            return out
        for alg_dir in sorted(base.iterdir()):
            if not alg_dir.is_dir():
                continue
            for path in alg_dir.iterdir():
                if path.name.startswith(TEMP_PREFIX):
                    continue
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # never a blob this cache wrote; lookup ignores it, ensure replaces it
                digest = f"{alg_dir.name}:{path.name}"
                out.append(CacheEntry(digest, st.st_size, datetime.fromtimestamp(st.st_mtime, tz=UTC), path))
        out.sort(key=lambda e: (e.last_used, e.digest))
        return out

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def prune(self, max_bytes: int | None = None, *, keep: Collection[str] = ()) -> PruneResult:
        """Remove least recently used blobs until at most ``max_bytes`` remain (``None``: remove all).

        Blobs in ``keep`` (digests) and blobs being downloaded right now are never removed. Temp files
        left by crashed pulls (older than an hour) are removed too.
        """
        self._remove_stale_temps()
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed: list[CacheEntry] = []
        for entry in entries:
            if max_bytes is not None and total <= max_bytes:
                break
            if entry.digest in keep:
                continue
            if not self._try_remove(entry):
                continue
            removed.append(entry)
            total -= entry.size
        return PruneResult(tuple(removed), sum(e.size for e in removed), total, len(entries) - len(removed))

    def _try_remove(self, entry: CacheEntry) -> bool:
        try:
            lock_path = self._lock_path(entry.digest)
        except ImageError:  # not a blob name we would write: leave it alone
            return False
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a pull is writing or checking it right now
            entry.path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    def _remove_stale_temps(self) -> None:
        base = self.root / "blobs"
        if not base.is_dir():
            return
        cutoff = time.time() - STALE_TEMP_SECONDS
        for alg_dir in base.iterdir():
            if not alg_dir.is_dir():
                continue
            for path in alg_dir.glob(f"{TEMP_PREFIX}*"):
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()


def _flock_cancellable(fd: int, cancel: threading.Event) -> None:
    while True:
        if cancel.is_set():
            raise CanceledError(CANCELED_PULL)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            cancel.wait(LOCK_POLL_SECONDS)


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still serves its blobs
        os.utime(path)


def list_cache(cache_dir: Path) -> list[CacheEntry]:
    """``runner cache ls``: every cached blob with size and last use, least recently used first."""
    return BlobCache(cache_dir).entries()


def prune_cache(cache_dir: Path, max_bytes: int | None = None) -> PruneResult:
    """``runner cache prune``: shrink the cache to ``max_bytes`` (least recently used first), or empty it."""
    return BlobCache(cache_dir).prune(max_bytes)
