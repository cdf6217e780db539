"""Registry credentials, apart from the HTTP client so that naming them costs no httpx import.

They are checked before the first request (:meth:`Credentials.check`): a token goes into an HTTP
header as it is, so it must be visible ASCII (a CR/LF would split the header; h11 refuses it, the
request was retried and the refused value quoted in the error). A username and password are sent
base64-encoded, so they may hold any text but a control character (a stray newline from a file is
the usual cause); the username holds no ':' (Basic auth splits at the first one). Errors name what is
wrong and where, never the secret itself.
"""

from dataclasses import dataclass, field

from bencher_runner.spec.errors import ImageError


def _control_at(value: str) -> int | None:
    """Index of the first control character (C0, DEL, C1) or lone surrogate, else None."""
    for i, c in enumerate(value):
        code = ord(c)
        if code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF:
            return i
    return None


def _header_unsafe_at(value: str) -> int | None:
    """Index of the first character outside visible ASCII (what an HTTP token may hold), else None."""
    return next((i for i, c in enumerate(value) if not 0x21 <= ord(c) <= 0x7E), None)


def _describe(value: str, at: int) -> str:
    code = ord(value[at])
    name = {0x0A: "a line feed", 0x0D: "a carriage return", 0x00: "a NUL", 0x20: "a space"}.get(code)
    return f"{name or f'the character U+{code:04X}'} at position {at} of {len(value)}"


def check_token(
    token: str, whose: str, fix: str = "remove it (a trailing newline from a file is the usual cause)"
) -> None:
    """ImageError naming ``whose`` token and the offending position (not the token) unless it can be
    sent in an ``Authorization: Bearer`` header."""
    at = _header_unsafe_at(token)
    if at is not None:
        raise ImageError(
            f"{whose} holds {_describe(token, at)}, a character an HTTP header cannot carry (a token is "
            f"visible ASCII only); {fix}"
        )


def _username_problem(name: str) -> str | None:
    if not name:
        return "is empty"
    if ":" in name:
        return "holds a ':'"
    at = _control_at(name)
    return None if at is None else f"holds {_describe(name, at)}"


@dataclass(frozen=True)
class Credentials:
    """How to authenticate to a registry: a Bearer ``token`` (a job's ``oci_token``), or a username and
    password (Basic, or exchanged at a token realm). ``repr`` never shows a secret."""

    token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (
            f"Credentials(token={'***' if self.token else None}, username={self.username!r}, "
            f"password={'***' if self.password else None})"
        )

    @property
    def has_basic(self) -> bool:
        return self.username is not None and self.password is not None

    @property
    def secrets(self) -> tuple[str, ...]:
        """The values no message may show."""
        return tuple(s for s in (self.token, self.password) if s)

    def check(self) -> None:
        """ImageError (one line, no secret) unless every given credential can be sent."""
        if self.token is not None:
            check_token(self.token, "the registry token")
        why = _username_problem(self.username) if self.username is not None else None
        if why is not None:
            raise ImageError(
                f"the registry username {self.username!r:.100} {why}, which Basic authentication cannot "
                "carry; pass the username alone"
            )
        if self.password is not None:
            at = _control_at(self.password)
            if at is not None:
                raise ImageError(
                    f"the registry password holds {_describe(self.password, at)}, a control character; "
                    "remove it (a trailing newline from a file is the usual cause)"
                )
