"""Registry image references: ``host[:port]/path[:tag][@sha256:…]`` parsed strictly.

A reference names where the runner connects and which repository it asks for, so it is parsed with
the distribution grammar (lowercase path components, bounded tags, validated digests) instead of being
split loosely: a typo becomes an error naming the reference, never a request to a surprising host.
The registry host is always explicit (no implicit Docker Hub), and ``http://`` is used only when asked.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from bencher_runner.oci.digest import is_digest
from bencher_runner.spec.errors import ImageError
from bencher_runner.spec.registry import is_registry_host

_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
MAX_REPOSITORY_LENGTH = 255
DOCKER_HUB_ALIASES = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}

_FORMS = "use HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST], e.g. registry.example.com/team/bench:v1"


@dataclass(frozen=True)
class ImageReference:
    """One image in a registry; at least one of ``tag``/``digest`` is meaningful (tag defaults to latest).

    ``registry`` is ``host[:port]`` as written; ``insecure`` selects plain HTTP.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    insecure: bool = False

    @property
    def scheme(self) -> str:
        return "http" if self.insecure else "https"

    @property
    def base_url(self) -> str:
        """``scheme://host[:port]`` (Docker Hub names mapped to its API host)."""
        return f"{self.scheme}://{DOCKER_HUB_ALIASES.get(self.registry, self.registry)}"

    @property
    def reference(self) -> str:
        """What to ask the manifests endpoint for: the digest when known, else the tag (or latest)."""
        return self.digest or self.tag or "latest"

    @property
    def pull_spec(self) -> str:
        """The text :func:`parse_reference` turns back into this reference (``http://`` kept)."""
        return f"http://{self}" if self.insecure else str(self)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


_PORT_RE = re.compile(r"[0-9]{1,5}")


def may_fall_back_to_http(registry: str) -> bool:
    """Whether ``host[:port]`` names this machine literally, so that a failed TLS handshake may be
    retried over plain HTTP (as Docker does for loopback registries).

    Strict on purpose, since it decides when TLS is given up: exactly ``localhost``, a dotted-quad
    IPv4 address in 127.0.0.0/8 (no ``127.1``, hex, octal or integer forms), or ``[::1]`` (bracketed,
    no zone); an optional port 1-65535. Names that merely resolve to loopback do not count.
    """
    if registry.startswith("["):
        inside, bracket, rest = registry[1:].partition("]")
        host, port = inside, rest.removeprefix(":") if rest.startswith(":") else None
        if not bracket or (rest and port is None):
            return False
    else:
        host, colon, port_text = registry.partition(":")
        port = port_text if colon else None
    if port is not None and not (_PORT_RE.fullmatch(port) and 0 < int(port) <= 65535):
        return False
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)  # refuses 127.1, 0x7f.1, leading zeros, spaces
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return (
            registry.startswith("[") and address.scope_id is None and address == ipaddress.IPv6Address("::1")
        )
    return not registry.startswith("[") and address.is_loopback


def _looks_like_host(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost" or part.startswith("[")


def _split_tag(rest: str, original: str) -> tuple[str, str | None]:
    """``path[:tag]`` -> (path, tag or None); ImageError for an invalid tag."""
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon <= last_slash:
        return rest, None
    rest, tag = rest[:colon], rest[colon + 1 :]
    if not _TAG_RE.fullmatch(tag):
        raise ImageError(
            f"invalid image reference {original!r}: tag {tag!r} is not valid (letters, digits, _ . -, "
            f"at most 128, not starting with . or -); {_FORMS}"
        )
    return rest, tag


def _check_repository(rest: str, original: str) -> None:
    """ImageError unless ``rest`` is a valid repository path of at most MAX_REPOSITORY_LENGTH."""
    components = rest.split("/")
    bad = next((c for c in components if not _COMPONENT_RE.fullmatch(c)), None)
    if bad is not None:
        raise ImageError(
            f"invalid image reference {original!r}: repository path component {bad!r} is not valid "
            f"(lowercase letters, digits and single separators . _ __ -); {_FORMS}"
        )
    if len(rest) > MAX_REPOSITORY_LENGTH:
        raise ImageError(
            f"invalid image reference {original!r}: the repository name is longer than "
            f"{MAX_REPOSITORY_LENGTH} characters; {_FORMS}"
        )


def parse_reference(text: str, *, insecure: bool = False, layouts: bool = True) -> ImageReference:
    """Parse ``[http[s]://]host[:port]/path[:tag][@digest]``; ``http://`` or ``insecure``: plain HTTP.

    ``layouts``: whether the caller would have taken a local layout instead (only the hint differs).
    """
    original = text
    if text.startswith("http://"):
        insecure, text = True, text[len("http://") :]
    elif text.startswith("https://"):
        text = text[len("https://") :]
    if not text or any(c.isspace() for c in text):
        raise ImageError(f"invalid image reference {original!r}: empty or contains spaces; {_FORMS}")

    digest: str | None = None
    if "@" in text:
        text, _, digest = text.partition("@")
        if not is_digest(digest):
            raise ImageError(
                f"invalid image reference {original!r}: {digest!r} is not a digest (expected sha256: "
                f"followed by 64 lowercase hex digits); {_FORMS}"
            )

    host, slash, rest = text.partition("/")
    if not slash or not _looks_like_host(host):
        if not layouts:
            raise ImageError(
                f"invalid image reference {original!r}: it does not start with a registry host (a job's "
                f"image comes from a registry only, never a local directory); {_FORMS}"
            )
        raise ImageError(
            f"invalid image reference {original!r}: it does not start with a registry host (and is not an "
            f"existing local image layout); {_FORMS}, or pass an OCI layout directory DIR[:TAG]"
        )
    if not is_registry_host(host):
        raise ImageError(
            f"invalid image reference {original!r}: {host!r} is not a valid host[:port]; {_FORMS}"
        )

    rest, tag = _split_tag(rest, original)
    _check_repository(rest, original)
    return ImageReference(registry=host, repository=rest, tag=tag, digest=digest, insecure=insecure)
