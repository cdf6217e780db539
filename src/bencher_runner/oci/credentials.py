"""Registry credentials, apart from the HTTP client so that naming them costs no httpx import."""

from dataclasses import dataclass, field


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
