"""Replace a file atomically: a reader sees the old content or the new, never a torn or empty file.

The one way the runner writes a file that others read while it may be rewritten or the host may lose
power (the outbox, update records, tuning state, caches, host fixes): write to a temporary file in
the same directory (``mkstemp``: O_EXCL, so never through a planted symlink), fsync it, give it its
mode, rename it over the target, fsync the directory so the rename itself survives a crash. On any
failure the temporary file is removed and the target is left as it was. ``durable=False`` skips both
fsyncs, for advisory files rewritten often (the daemon's status). The standard library has no such
call, and the libraries that do (atomicwrites, unmaintained since 2022) add nothing past these lines.
"""

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8), permissions ``mode``. OSError on failure,
    with ``path`` untouched and no temporary file left behind."""
    payload = data.encode() if isinstance(data, str) else data
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        sync_directory(directory)


def sync_directory(directory: Path) -> None:
    """fsync ``directory``, so that a rename or unlink in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
