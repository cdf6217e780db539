"""The HTTPS -> HTTP fallback for loopback registries, on a mock transport (no traffic at all).

A TLS protocol error (the server speaks plain HTTP) from ``localhost``/127.0.0.0/8/``[::1]`` is retried
once over HTTP with one warning; a certificate error is not (that server does speak TLS); any other
host never falls back, whatever the error.
"""

from __future__ import annotations

import ssl

import httpx
import pytest

from bencher_runner.oci.reference import parse_reference
from bencher_runner.oci.registry import RegistryClient
from bencher_runner.spec.errors import ImageError

D = "sha256:" + "ab" * 32
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'


def plain_http_server(seen: list[str], error: BaseException | None = None) -> httpx.MockTransport:
    """Answers over http://, fails every https:// request like a TLS handshake with an HTTP server."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.scheme == "https":
            cause = error or ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
            raise httpx.ConnectError("TLS handshake failed", request=request) from cause
        return httpx.Response(200, headers={"Content-Type": "application/json"}, content=MANIFEST)

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("registry", ["127.0.0.1:5000", "localhost:5000", "[::1]:5000", "127.9.8.7"])
def test_a_loopback_registry_speaking_http_is_retried_over_http_with_one_warning(registry: str) -> None:
    seen: list[str] = []
    warned: list[str] = []
    ref = parse_reference(f"{registry}/team/bench:v1")
    with RegistryClient(ref, transport=plain_http_server(seen), warn=warned.append, retries=0) as client:
        assert client.get_manifest("v1").data == MANIFEST
        assert client.get_manifest(D).data == MANIFEST  # the next requests go over HTTP at once
    assert seen == [
        f"https://{registry}/v2/team/bench/manifests/v1",
        f"http://{registry}/v2/team/bench/manifests/v1",
        f"http://{registry}/v2/team/bench/manifests/{D}",
    ]
    assert len(warned) == 1, warned
    assert registry in warned[0] and "plain HTTP" in warned[0] and "--insecure-registry" in warned[0]


@pytest.mark.parametrize(
    "registry",
    ["registry.example.com", "example.com:5000", "10.0.0.5:5000", "127.0.0.1.example.com", "localhost.evil"],
)
def test_other_registries_never_fall_back(registry: str) -> None:
    seen: list[str] = []
    warned: list[str] = []
    ref = parse_reference(f"{registry}/team/bench:v1")
    with (
        RegistryClient(ref, transport=plain_http_server(seen), warn=warned.append, retries=0) as client,
        pytest.raises(ImageError) as err,
    ):
        client.get_manifest("v1")
    assert seen == [f"https://{registry}/v2/team/bench/manifests/v1"]  # never a plain-HTTP request
    assert warned == []
    assert "TLS failed" in str(err.value) and registry in str(err.value)


def test_a_certificate_error_on_loopback_does_not_fall_back() -> None:
    seen: list[str] = []
    warned: list[str] = []
    bad_cert = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed certificate")
    bad_cert.verify_message, bad_cert.reason = "self-signed certificate", "CERTIFICATE_VERIFY_FAILED"
    ref = parse_reference("127.0.0.1:5000/team/bench:v1")
    transport = plain_http_server(seen, bad_cert)
    with (
        RegistryClient(ref, transport=transport, warn=warned.append, retries=0) as client,
        pytest.raises(ImageError) as err,
    ):
        client.get_manifest("v1")
    assert seen == ["https://127.0.0.1:5000/v2/team/bench/manifests/v1"] and warned == []
    assert "certificate" in str(err.value)


def test_insecure_registry_uses_http_from_the_first_request_without_a_warning() -> None:
    seen: list[str] = []
    warned: list[str] = []
    for text in ("127.0.0.1:5000/team/bench:v1", "http://registry.example.com/team/bench:v1"):
        ref = parse_reference(text, insecure=True)
        with RegistryClient(ref, transport=plain_http_server(seen), warn=warned.append) as client:
            client.get_manifest("v1")
    assert seen == [
        "http://127.0.0.1:5000/v2/team/bench/manifests/v1",
        "http://registry.example.com/v2/team/bench/manifests/v1",
    ]
    assert warned == []


def test_a_token_realm_on_loopback_is_not_rewritten() -> None:
    """Only the registry's own URLs fall back; a realm the registry names keeps the scheme it says."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.scheme == "https":
            raise httpx.ConnectError("TLS handshake failed", request=request) from ssl.SSLError(
                1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"
            )
        if "Authorization" not in request.headers:
            realm = 'Bearer realm="https://127.0.0.1:6000/token",service="s"'
            return httpx.Response(401, headers={"WWW-Authenticate": realm})
        return httpx.Response(200, content=MANIFEST)

    ref = parse_reference("127.0.0.1:5000/team/bench:v1")
    with (
        RegistryClient(ref, transport=httpx.MockTransport(handler), retries=0) as client,
        pytest.raises(ImageError) as err,
    ):
        client.get_manifest("v1")
    assert seen[-1].startswith("https://127.0.0.1:6000/token"), seen
    assert "127.0.0.1:6000" in str(err.value)
