"""Pulls over HTTPS from a real docker-registry serving TLS with a certificate made in the fixture.

A certificate the host trusts (here via SSL_CERT_FILE, as for a private CA) pulls; an untrusted one
fails at once with a reason and what to do (no retries: a certificate does not get better), and so
does a plain-HTTP registry addressed as HTTPS.
"""

import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from bencher_runner.oci.pull import pull_image
from bencher_runner.oci.reference import parse_reference
from bencher_runner.oci.source import open_image
from bencher_runner.spec.errors import CanceledError, ImageError
from tests.support.oci_builder import build_layout, file
from tests.support.registry import Registry, http_push, start_registry, stop_process
from tests.support.tls import self_signed


def write_certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), as PEM files."""
    key, cert = self_signed("bencher-runner test registry", ip="127.0.0.1")
    cert_path, key_path = tmp / "registry.crt", tmp / "registry.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Path]]:
    tmp = tmp_path_factory.mktemp("tls-registry")
    cert, key = write_certificate(tmp)
    reg = start_registry(tmp, tmp / "storage", tls=(cert, key))
    yield reg, cert
    stop_process(reg.proc)


def push_small(tmp_path: Path, reg: Registry) -> str:
    layout = tmp_path / "layout"
    digest = build_layout(layout, [[file("hello.txt", b"over TLS\n")]], {"Cmd": ["/hello"]}, tag="v1")
    http_push(layout, reg, "tls/proj", "v1", verify=False)
    return digest


def test_a_trusted_certificate_pulls(
    tmp_path: Path, tls_registry: tuple[Registry, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, cert = tls_registry
    digest = push_small(tmp_path, reg)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    image = open_image(f"{reg.host}/tls/proj@{digest}", cache_dir=tmp_path / "cache")
    assert image.manifest_digest == digest
    assert list(image.config.config.cmd or []) == ["/hello"]


def test_an_untrusted_certificate_fails_at_once_saying_what_to_do(
    tmp_path: Path, tls_registry: tuple[Registry, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, _ = tls_registry
    digest = push_small(tmp_path, reg)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(ImageError) as err:
        open_image(f"{reg.host}/tls/proj@{digest}", cache_dir=tmp_path / "cache")
    assert time.monotonic() - t0 < 3  # not retried
    text = str(err.value)
    assert "certificate" in text and "SSL_CERT_FILE" in text and reg.host in text, text


def test_a_plain_http_loopback_registry_addressed_as_https_falls_back_saying_so(
    tmp_path: Path, registry: Registry
) -> None:
    """Issue #17: as Docker does for loopback registries, HTTPS first, then plain HTTP, with a warning
    (other hosts never fall back: tests/unit/test_http_fallback.py)."""
    warned: list[str] = []
    with pytest.raises(ImageError) as err:
        open_image(f"{registry.host}/tls/nothing-here:v1", cache_dir=tmp_path / "cache", warn=warned.append)
    assert "has no manifest v1" in str(err.value), err.value  # the HTTP request reached the registry
    assert len(warned) == 1 and "does not speak TLS" in warned[0] and registry.host in warned[0], warned


def test_a_cancel_breaks_off_an_https_read_the_registry_never_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel shuts the TLS connection's socket down; without it the read waits out its timeout."""
    cert, key = write_certificate(tmp_path)
    released = threading.Event()

    class Stalling(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            released.wait(120)  # never answers while the test runs

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    try:
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(CanceledError):
            pull_image(
                parse_reference(f"127.0.0.1:{server.server_address[1]}/tls/proj:v1"),
                cache_dir=tmp_path / "cache",
                cancel=cancel,
            )
        assert cancel.is_set() and time.monotonic() - t0 < 2.0  # 0.5 s to the cancel, then at once
    finally:
        timer.cancel()
        released.set()
        server.shutdown()
        server.server_close()
