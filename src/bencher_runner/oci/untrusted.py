"""Two rules for handling what an image, a layout or a registry hands the runner.

Files: an image file (``index.json``, a blob, a cached blob) is opened with ``O_NONBLOCK|O_NOFOLLOW``
and checked to be a regular file on the open descriptor before anything is read. A plain ``open()`` of
a FIFO blocks until a writer appears, which is forever, and nothing (not even a job cancel) can wake a
thread stuck there; a symlink could lead anywhere on the host, a device node read forever.

Text: a string that came from image or registry data is quoted with :func:`quote` before it goes into
an error text, so that the text stays one line and is always encodable as UTF-8 (JSON decoding gives
lone surrogates for ``"\\ud800"``, which ``str.encode()`` refuses).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

MAX_QUOTED = 200  # characters of an untrusted string kept in an error text


class NotRegularFileError(OSError):
    """The path names something other than a regular file (FIFO, symlink, device, directory...)."""

    def __init__(self, path: Path | str, kind: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", str(path))
        self.kind = kind


def file_kind(mode: int) -> str:
    """A short name of a file type, for messages (``FIFO``, ``symbolic link``, ...)."""
    kinds = (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def open_regular(path: Path | str) -> BinaryIO:
    """Open ``path`` for reading if, and only if, it is a regular file (the last component is not
    followed if it is a symlink). Never blocks; :class:`NotRegularFileError` otherwise, other
    :class:`OSError` (``FileNotFoundError``, ...) as the system reports them."""
    st = os.lstat(path)  # a device is refused before it is opened at all (opening one may act)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(path, file_kind(st.st_mode))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a symlink since the lstat
            raise NotRegularFileError(path, "symbolic link") from None
        raise
    try:
        st = os.fstat(fd)  # the file actually opened, whatever was swapped in since the lstat
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, file_kind(st.st_mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path | str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the regular file ``path`` (the caller compares with ``limit``)."""
    with open_regular(path) as f:
        return f.read(limit + 1)


def escape(value: object, limit: int = MAX_QUOTED) -> str:
    """``value`` as :func:`quote` makes it, without the quotes (for texts shown inline, e.g. a
    platform name or a registry's error message)."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    return repr(text[:limit])[1:-1] + ("…" if cut else "")


def quote(value: object, limit: int = MAX_QUOTED) -> str:
    """``value`` as a quoted, escaped, one-line, UTF-8-encodable text of bounded length.

    ``repr`` escapes control characters and lone surrogates; longer texts are cut, marked with ``…``.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return repr(text[:limit]) + "…"
    return repr(text)
