"""Registry credentials: checked before the first request (one line, no retries), and never in an error.

A token or password the HTTP stack cannot send (CR/LF, NUL, non-ASCII in a header) used to be retried
five times and then echoed in the error (h11 quotes the refused header value), or crashed with
UnicodeEncodeError. And whatever a registry or token service sends back, including our own secret
echoed in an error body or a header, must not reach the error text, which goes to the server and logs.
Everything here runs against the scriptable fake registry on loopback.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bencher_runner.oci.credentials import Credentials
from bencher_runner.oci.pull import pull_image
from bencher_runner.oci.reference import parse_reference
from bencher_runner.spec.errors import ImageError, RunnerError
from tests.registry.conftest import FakeRegistry
from tests.support.oci_builder import OCI_MANIFEST, build_layout, file

TOKEN = "job-token-S3CRET-0123456789"
PASSWORD = "pw-S3CRET-9876"
REALM_TOKEN = "realm-token-S3CRET-abcdef"


def secrets_of(*values: str) -> list[str]:
    """Every form a secret could take in a text: plain, URL-quoted, and inside a Basic header."""
    forms: list[str] = []
    for v in values:
        forms += [v, quote(v, safe=""), v.encode("unicode_escape").decode()]
    forms.append(base64.b64encode(f"alice:{PASSWORD}".encode()).decode())
    return forms


def assert_clean(err: BaseException, *secrets: str) -> str:
    text = str(err)
    assert isinstance(err, RunnerError), repr(err)
    assert "\n" not in text and "\r" not in text, text
    text.encode()  # encodable as UTF-8
    for s in secrets_of(*secrets) if secrets else secrets_of(TOKEN, PASSWORD, REALM_TOKEN):
        assert s not in text, f"secret form {s!r} in {text!r}"
    return text


def pull(fake: FakeRegistry, tmp_path: Path, creds: Credentials | None, **kw: Any) -> Any:
    return pull_image(
        parse_reference(f"{fake.host}/hostile:v1", insecure=True),
        cache_dir=tmp_path / "cache",
        credentials=creds,
        retries=2,
        backoff=0.01,
        **kw,
    )


def serve(fake: FakeRegistry, tmp_path: Path) -> str:
    layout = tmp_path / "img"
    build_layout(layout, [[file("a", "x")]], {"Cmd": ["/a"]}, tag="v1", arch="amd64")
    return fake.load_layout(layout, "hostile", "v1")


# --- refused before anything is sent -----------------------------------------------------------------

BAD_SECRETS = [
    f"{TOKEN}\r\nX-Injected: 1",
    f"{TOKEN}\n",
    f"{TOKEN}\r",
    f"{TOKEN}\x00",
    f"{TOKEN}\x7f",
    f"{TOKEN}\t",
    f"{TOKEN} x",
    f"tök-{TOKEN}",
    f"{TOKEN}\ud800",
]


@pytest.mark.parametrize("token", BAD_SECRETS)
def test_a_token_the_client_cannot_send_is_refused_before_any_request(
    fake_registry: FakeRegistry, tmp_path: Path, token: str
) -> None:
    serve(fake_registry, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ImageError) as err:
        pull(fake_registry, tmp_path, Credentials(token=token))
    assert time.monotonic() - t0 < 2  # no retries, no backoff
    assert fake_registry.log == []
    text = assert_clean(err.value, TOKEN)
    assert "registry token" in text and "character" in text, text


@pytest.mark.parametrize("password", [p.replace(TOKEN, PASSWORD) for p in BAD_SECRETS if "ö" not in p])
def test_a_password_with_control_characters_is_refused_before_any_request(
    fake_registry: FakeRegistry, tmp_path: Path, password: str
) -> None:
    serve(fake_registry, tmp_path)
    if password == f"{PASSWORD} x":  # a space is fine in a password: it is sent base64-encoded
        pull(fake_registry, tmp_path, Credentials(username="alice", password=password))
        return
    with pytest.raises(ImageError) as err:
        pull(fake_registry, tmp_path, Credentials(username="alice", password=password))
    assert fake_registry.log == []
    text = assert_clean(err.value, PASSWORD)
    assert "registry password" in text, text


@pytest.mark.parametrize("username", ["al:ice", "alice\r\n", "al\x00ice", ""])
def test_a_username_basic_auth_cannot_carry_is_refused(
    fake_registry: FakeRegistry, tmp_path: Path, username: str
) -> None:
    with pytest.raises(ImageError, match="registry username") as err:
        pull(fake_registry, tmp_path, Credentials(username=username, password=PASSWORD))
    assert fake_registry.log == []
    assert_clean(err.value, PASSWORD)


def test_a_password_may_hold_any_printable_unicode(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    digest = serve(fake_registry, tmp_path)
    image = pull(fake_registry, tmp_path, Credentials(username="alice", password="pässwörd ✓"))
    assert image.manifest_digest == digest


# --- a registry or token service that echoes the secret ------------------------------------------------


def challenge(fake: FakeRegistry) -> dict[str, str]:
    return {"WWW-Authenticate": f'Bearer realm="http://{fake.host}/token",service="svc"'}


def echo_body(status: int, *secrets: str) -> tuple[int, dict[str, str], bytes]:
    said = " ".join(f"you sent {s} (Bearer {s}, {quote(s)})" for s in secrets)
    body = json.dumps({"errors": [{"code": "DENIED", "message": said}]}).encode()
    return status, {"Content-Type": "application/json"}, body


@pytest.mark.parametrize("status", [401, 403, 404, 500, 418])
def test_a_registry_echoing_the_token_in_its_error_body(
    fake_registry: FakeRegistry, tmp_path: Path, status: int
) -> None:
    fake_registry.routes["/v2/hostile/manifests/v1"] = echo_body(status, TOKEN)
    with pytest.raises(ImageError) as err:
        pull(fake_registry, tmp_path, Credentials(token=TOKEN))
    text = assert_clean(err.value)
    assert f"HTTP {status}" in text, text


def test_a_registry_echoing_the_token_in_a_text_body_and_a_header(
    fake_registry: FakeRegistry, tmp_path: Path
) -> None:
    fake_registry.routes["/v2/hostile/manifests/v1"] = (500, {}, f"<html>token {TOKEN}</html>".encode())
    with pytest.raises(ImageError) as err:
        pull(fake_registry, tmp_path, Credentials(token=TOKEN))
    assert_clean(err.value)
    fake_registry.manifest("hostile", "v1", b'{"schemaVersion": 2}', f"application/x-{TOKEN}")
    with pytest.raises(ImageError, match="unsupported media type") as err:
        pull(fake_registry, tmp_path, Credentials(token=TOKEN))
    assert_clean(err.value)


def test_a_token_service_echoing_the_password_and_the_realm_token(
    fake_registry: FakeRegistry, tmp_path: Path
) -> None:
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    fake_registry.routes["/v2/hostile/manifests/v1"] = (401, challenge(fake_registry), b"")
    fake_registry.routes["/token"] = echo_body(401, PASSWORD, basic)
    with pytest.raises(ImageError, match="token service") as err:
        pull(fake_registry, tmp_path, Credentials(username="alice", password=PASSWORD))
    assert_clean(err.value)

    # the realm's token is a secret too: a registry that refuses it and echoes it
    token_body = json.dumps({"token": REALM_TOKEN}).encode()
    fake_registry.routes["/token"] = (200, {"Content-Type": "application/json"}, token_body)
    calls: list[int] = []

    def refuse() -> tuple[int, dict[str, str], bytes]:
        calls.append(1)
        status, headers, body = echo_body(401, REALM_TOKEN, PASSWORD)
        return status, {**headers, **challenge(fake_registry)}, body

    fake_registry.routes["/v2/hostile/manifests/v1"] = refuse
    with pytest.raises(ImageError, match="refused") as err:
        pull(fake_registry, tmp_path, Credentials(username="alice", password=PASSWORD))
    assert_clean(err.value)


@pytest.mark.parametrize("bad", ["tok\r\nX: 1", "tok\x00", "t\u00f6k", ""])
def test_a_token_service_answering_a_token_the_client_cannot_send(
    fake_registry: FakeRegistry, tmp_path: Path, bad: str
) -> None:
    fake_registry.routes["/v2/hostile/manifests/v1"] = (401, challenge(fake_registry), b"")
    fake_registry.routes["/token"] = (200, {}, json.dumps({"token": bad}).encode())
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=r"token service .* returned") as err:
        pull(fake_registry, tmp_path, Credentials(token=TOKEN))
    assert time.monotonic() - t0 < 2
    assert fake_registry.log.count("/token") == 1
    assert_clean(err.value, TOKEN, bad) if bad else assert_clean(err.value)


@pytest.mark.parametrize(
    "realm", ["http://127.0.0.1:1/\x01x", "http://[::1", "ftp://x/token", "http://exa mple/\x00"]
)
def test_an_unusable_token_realm_is_one_line(fake_registry: FakeRegistry, tmp_path: Path, realm: str) -> None:
    header = json.dumps(realm)  # a quoted-string, escapes and all
    fake_registry.routes["/v2/hostile/manifests/v1"] = (
        401,
        {"WWW-Authenticate": f"Bearer realm={header}"},
        b"",
    )
    with pytest.raises(ImageError, match=r"token realm|token service") as err:
        pull(fake_registry, tmp_path, Credentials(token=TOKEN))
    assert_clean(err.value)


# --- whatever the registry says, the error text is one encodable line ---------------------------------


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"errors": [{"code": "X", "message": "lone \ud800 surrogate\nand a newline"}]}).encode(),
        json.dumps({"errors": [{"code": {"nested": ["x"]}, "message": None}]}).encode(),
        json.dumps({"errors": [{"code": "\u2028", "message": "\x1b[31mred"}]}).encode(),
        b"\xff\xfe not utf-8 \r\n second line",
        b"x" * 100_000,
    ],
)
def test_error_bodies_become_one_encodable_line(
    fake_registry: FakeRegistry, tmp_path: Path, body: bytes
) -> None:
    fake_registry.routes["/v2/hostile/manifests/v1"] = (404, {}, body)
    with pytest.raises(ImageError, match="HTTP 404") as err:
        pull(fake_registry, tmp_path, None)
    text = assert_clean(err.value)
    assert "\x1b" not in text and "\u2028" not in text and len(text) < 1000, text


def test_hostile_strings_in_manifests_become_encodable_lines(
    fake_registry: FakeRegistry, tmp_path: Path
) -> None:
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": "sha256:" + "a" * 64,
                "size": 2,
                "platform": {"os": "li\ud800nux\n", "architecture": "\x1b[2J"},
            }
        ],
    }
    body = json.dumps(index).encode()
    fake_registry.manifest("hostile", "v1", body, "application/vnd.oci.image.index.v1+json")
    with pytest.raises(ImageError, match="no image for linux/") as err:
        pull(fake_registry, tmp_path, None)
    text = assert_clean(err.value)
    assert "\x1b" not in text, text
