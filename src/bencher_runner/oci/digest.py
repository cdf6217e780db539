"""Content digests: parse them strictly, hash streams in bounded chunks, compare.

Every blob in an OCI layout is named by its digest, and the runner trusts nothing it has not hashed.
Digest strings are also used to build blob paths, so they are validated (registered algorithm, exact
hex length, lowercase) before they touch the filesystem: a crafted "digest" can never name a path.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from bencher_runner.oci.untrusted import quote
from bencher_runner.spec.errors import DigestMismatchError, ImageError

CHUNK_SIZE = 1 << 20  # 1 MiB: hashing reads never hold more than this at once

# Only the registered algorithms of the OCI image spec, with their exact hex lengths.
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")


class Hasher(Protocol):
    """The part of a hashlib object the helpers use."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class Digest:
    """A validated digest: ``algorithm`` is a key of :data:`ALGORITHMS`, ``hex`` is lowercase hex."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> Hasher:
        return new_hasher(self.algorithm)


def parse_digest(value: str, *, what: str = "digest") -> Digest:
    """Parse ``sha256:<64 hex>`` or ``sha512:<128 hex>``; anything else is an :class:`ImageError`."""
    match = _DIGEST_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ImageError(
            f"{what} {quote(value, 150)} is not a valid digest (expected sha256: followed by 64 lowercase "
            "hex digits, or sha512: followed by 128); the image is malformed, rebuild it"
        )
    if match.group(1):
        return Digest(match.group(1), match.group(2))
    return Digest(match.group(3), match.group(4))


def is_digest(value: str) -> bool:
    """Whether ``value`` is a digest :func:`parse_digest` accepts."""
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def new_hasher(algorithm: str) -> Hasher:
    """A fresh hash object for a registered algorithm."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return hashlib.new(algorithm)


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    """The digest string of ``data``."""
    h = new_hasher(algorithm)
    h.update(data)
    return f"{algorithm}:{h.hexdigest()}"


def hash_stream(
    fileobj: BinaryIO, algorithm: str = "sha256", *, chunk_size: int = CHUNK_SIZE
) -> tuple[str, int]:
    """Hash ``fileobj`` to its end in ``chunk_size`` pieces; returns (digest string, bytes read)."""
    h = new_hasher(algorithm)
    total = 0
    while chunk := fileobj.read(chunk_size):
        h.update(chunk)
        total += len(chunk)
    return f"{algorithm}:{h.hexdigest()}", total


def verify_bytes(data: bytes, expected: str, *, what: str) -> None:
    """Raise :class:`DigestMismatchError` unless ``data`` hashes to ``expected``."""
    parsed = parse_digest(expected, what=what)
    actual = digest_bytes(data, parsed.algorithm)
    if actual != str(parsed):
        raise DigestMismatchError(what, str(parsed), actual)


def verify_stream(fileobj: BinaryIO, expected: str, *, what: str, chunk_size: int = CHUNK_SIZE) -> int:
    """Hash ``fileobj`` to its end and compare with ``expected``; returns the number of bytes read."""
    parsed = parse_digest(expected, what=what)
    actual, total = hash_stream(fileobj, parsed.algorithm, chunk_size=chunk_size)
    if actual != str(parsed):
        raise DigestMismatchError(what, str(parsed), actual)
    return total
