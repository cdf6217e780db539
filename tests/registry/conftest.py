"""Real registries for pull tests: Debian's docker-registry (open, and token-auth with a test token
server), images pushed with skopeo (or a small HTTP pusher for shapes skopeo will not write), a
fault-injecting proxy, and a scriptable fake registry for hostile answers. Everything is on loopback.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.oci_builder import blob_path, read_index
from tests.support.registry import (
    REF_NAME,
    Registry,
    start_registry,
    stop_process,
)
from tests.support.tls import self_signed

SERVICE = "test-registry"
ISSUER = "test-token-issuer"
USERNAME, PASSWORD = "alice", "s3cret-pw"
JOB_TOKEN = "opaque-job-token-0123456789"  # accepted by the token server, not by the registry


# --- docker-registry ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def registry(registry_tmp: Path) -> Iterator[Registry]:
    """An open (anonymous) docker-registry; its storage is shared with ``auth_registry``."""
    reg = start_registry(registry_tmp, registry_tmp / "storage")
    yield reg
    stop_process(reg.proc)


# --- token server + token-auth registry --------------------------------------------------------------


@dataclass
class TokenServer:
    url: str
    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    requests: list[dict[str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def mint(self, repo: str, *, actions: tuple[str, ...] = ("pull",), ttl: float = 300) -> str:
        """A registry token for ``repo`` (negative ``ttl``: already expired)."""
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": USERNAME,
            "aud": SERVICE,
            "iat": now - 60 if ttl > 0 else now - 600,
            "nbf": now - 60 if ttl > 0 else now - 600,
            "exp": now + int(ttl),
            "jti": uuid.uuid4().hex,
            "access": [{"type": "repository", "name": repo, "actions": list(actions)}],
        }
        der = self.cert.public_bytes(serialization.Encoding.DER)
        return jwt.encode(
            claims, self.key, algorithm="RS256", headers={"x5c": [base64.b64encode(der).decode()]}
        )

    def _grant(self, auth: str, scope: str) -> str | None:
        parts = scope.split(":")
        if len(parts) != 3 or parts[0] != "repository":
            return None
        repo = parts[1]
        if auth == "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode():
            return self.mint(repo)
        if auth == f"Bearer {JOB_TOKEN}":
            return self.mint(repo)
        if auth.startswith("Bearer "):  # one of our JWTs: valid, unexpired and for this repository
            try:
                claims = jwt.decode(auth[7:], self.key.public_key(), algorithms=["RS256"], audience=SERVICE)
            except jwt.PyJWTError:
                return None
            if any(a.get("name") == repo and "pull" in a.get("actions", []) for a in claims["access"]):
                return self.mint(repo)
        return None


def _token_handler(ts: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            auth = self.headers.get("Authorization", "")
            ts.requests.append({"path": url.path, "auth": auth, **q})
            token = ts._grant(auth, q.get("scope", "")) if q.get("service") == SERVICE else None
            if token is None:
                body = b'{"errors":[{"code":"UNAUTHORIZED","message":"access denied"}]}'
                self.send_response(401)
            else:
                body = json.dumps({"token": token, "expires_in": 300}).encode()
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that stop reading early (size limits) are expected here


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = _QuietServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="session")
def token_server() -> Iterator[TokenServer]:
    key, cert = self_signed("test token issuer")
    ts = TokenServer("", key, cert)
    server, url = serve(_token_handler(ts))
    ts.url, ts.server = url, server
    yield ts
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def auth_registry(registry: Registry, registry_tmp: Path, token_server: TokenServer) -> Iterator[Registry]:
    """A token-auth docker-registry serving the same storage as ``registry`` (push there)."""
    bundle = registry_tmp / "token-root.pem"
    bundle.write_bytes(token_server.cert.public_bytes(serialization.Encoding.PEM))
    auth = {
        "token": {
            "realm": token_server.realm,
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(bundle),
        }
    }
    reg = start_registry(registry_tmp, registry.storage, auth)
    yield reg
    stop_process(reg.proc)


# --- fault-injecting proxy ---------------------------------------------------------------------------


@dataclass
class Faults:
    """What the proxy breaks: ``cut_blob_after`` cuts the next N blob GETs after that many body bytes;
    ``statuses`` answers the next requests whose path contains the key with those statuses;
    ``blob_chunk_delay`` sleeps that long after every 4 KiB of blob body (a slow registry)."""

    cut_blob_after: int | None = None
    blob_chunk_delay: float = 0.0
    cuts_left: int = 1
    statuses: dict[str, list[int]] = field(default_factory=dict)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, range)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def blob_gets(self) -> list[tuple[str, str, str]]:
        return [e for e in self.log if e[0] == "GET" and "/blobs/" in e[1]]


def _proxy_handler(upstream: str, faults: Faults) -> type[BaseHTTPRequestHandler]:
    client = httpx.Client(base_url=upstream, timeout=30)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _forward(self, method: str) -> None:
            with faults.lock:
                faults.log.append((method, self.path, self.headers.get("Range", "")))
                status = None
                for key, queue in faults.statuses.items():
                    if key in self.path and queue:
                        status = queue.pop(0)
                        break
                cut = None
                blob_get = method == "GET" and "/blobs/" in self.path
                if blob_get and faults.cut_blob_after is not None and faults.cuts_left > 0:
                    faults.cuts_left -= 1
                    cut = faults.cut_blob_after
            if status is not None:
                body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'
                self.send_response(status)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            headers = {
                k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization", "range")
            }
            headers["Accept-Encoding"] = "identity"
            with client.stream(method, self.path, headers=headers) as resp:
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.end_headers()
                sent = 0
                for chunk in resp.iter_raw(4096):
                    if cut is not None and sent + len(chunk) > cut:
                        self.wfile.write(chunk[: cut - sent])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if blob_get and faults.blob_chunk_delay:
                        time.sleep(faults.blob_chunk_delay)

        def do_GET(self) -> None:
            self._forward("GET")

        def do_HEAD(self) -> None:
            self._forward("HEAD")

    return Handler


@pytest.fixture
def faulty_proxy(registry: Registry) -> Iterator[tuple[str, Faults]]:
    """(host:port of a proxy in front of ``registry``, its Faults)."""
    faults = Faults()
    server, url = serve(_proxy_handler(registry.url, faults))
    yield url.removeprefix("http://"), faults
    server.shutdown()
    server.server_close()


# --- scriptable fake registry (hostile answers) ------------------------------------------------------


@dataclass(frozen=True)
class Stall:
    """An answer that announces ``total`` bytes, sends ``prefix`` and then nothing until the test ends
    (a registry that hangs mid-blob); see ``FakeRegistry.stalls``. ``FakeRegistry.stall`` as a route
    callable hangs before the headers."""

    prefix: bytes
    total: int


Route = tuple[int, dict[str, str], bytes]


@dataclass
class FakeRegistry:
    host: str
    routes: dict[str, Route | Callable[[], Route]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    stalls: dict[str, Stall] = field(default_factory=dict)  # path -> a 200 answer that hangs mid-body
    released: threading.Event = field(default_factory=threading.Event)  # set at teardown: stalls end

    def stall(self) -> Route:
        """A route callable's body: answer nothing at all until the test ends."""
        self.released.wait(120)
        return (503, {}, b"")

    def manifest(self, repo: str, ref: str, body: bytes, media_type: str, **headers: str) -> None:
        self.routes[f"/v2/{repo}/manifests/{ref}"] = (200, {"Content-Type": media_type, **headers}, body)

    def blob(self, repo: str, digest: str, body: bytes, **headers: str) -> None:
        self.routes[f"/v2/{repo}/blobs/{digest}"] = (200, headers, body)

    def load_layout(self, layout: Path, repo: str, tag: str = "latest") -> str:
        """Serve ``layout``'s blobs and the tagged image as they are on disk; returns its digest."""
        for path in (layout / "blobs" / "sha256").iterdir():
            digest = "sha256:" + path.name
            data = path.read_bytes()
            self.blob(repo, digest, data)
            try:
                mt = json.loads(data).get("mediaType")
            except (ValueError, AttributeError):
                mt = None
            if isinstance(mt, str):
                self.manifest(repo, digest, data, mt)
        top = next(m for m in read_index(layout) if m.get("annotations", {}).get(REF_NAME) == tag)
        self.manifest(repo, tag, blob_path(layout, top["digest"]).read_bytes(), top["mediaType"])
        return str(top["digest"])


def _fake_handler(fake: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            fake.log.append(path)
            route = fake.routes.get(path)
            not_found: Route = (404, {}, b'{"errors":[{"code":"NOT_FOUND","message":"unknown"}]}')
            stall = fake.stalls.get(path)
            if stall is not None:
                self.send_response(200)
                self.send_header("Content-Length", str(stall.total))
                self.end_headers()
                self.wfile.write(stall.prefix)
                self.wfile.flush()
                fake.released.wait(120)
                self.close_connection = True
                return
            status, headers, body = not_found if route is None else route() if callable(route) else route
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if headers.get("Connection") == "close":  # body delimited by closing: no length announced
                self.close_connection = True
            elif not any(k.lower() == "content-length" for k in headers):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def fake_registry() -> Iterator[FakeRegistry]:
    fake = FakeRegistry("")
    server, url = serve(_fake_handler(fake))
    fake.host = url.removeprefix("http://")
    yield fake
    fake.released.set()
    server.shutdown()
    server.server_close()
