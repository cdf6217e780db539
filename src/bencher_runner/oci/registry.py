"""A small OCI distribution-spec client (pull only) on httpx.

The runner pulls with whatever a job or the user hands it: a job's short-lived Bearer JWT (sent
directly, and used to answer a ``WWW-Authenticate: Bearer`` challenge), a username/password, or
nothing. Everything a registry returns is untrusted: manifests are read with a size bound, blob bodies
are hashed while they stream and never allowed past their descriptor's size, and the caller compares
digests. Transient failures (connection drops, 429, 5xx) are retried with backoff (``retry.Backoff``,
cut short by a cancel) and an interrupted blob resumes with a Range request. Secrets never appear in
messages or reprs. A registry on this machine (``localhost``, 127.0.0.0/8, ``[::1]``, literally) whose
answer to the TLS handshake is plain HTTP is used over HTTP from then on, with one warning, as Docker
does; no other host ever is.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote as quote_url

import httpx

from bencher_runner import __version__
from bencher_runner.oci.blobcache import CANCELED_PULL
from bencher_runner.oci.credentials import Credentials, check_token
from bencher_runner.oci.digest import Hasher, parse_digest
from bencher_runner.oci.layout import INDEX_TYPES, MANIFEST_TYPES
from bencher_runner.oci.reference import ImageReference, may_fall_back_to_http
from bencher_runner.oci.untrusted import escape, quote
from bencher_runner.retry import Backoff
from bencher_runner.spec.errors import CanceledError, ImageError, RunnerError

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
NET_CHUNK_SIZE = 64 * 1024  # small enough that a dropped connection loses little before a resume
REALM_REFRESH_SECONDS = 30.0  # a realm token refused later than this (expired mid-pull) is fetched anew
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
CANCEL_POLL_SECONDS = 0.1  # how soon a canceled pull breaks off a read the registry never answers
MANIFEST_ACCEPT = ", ".join(sorted(MANIFEST_TYPES | INDEX_TYPES))
USER_AGENT = f"bencher-runner/{__version__}"

log = logging.getLogger("bencher_runner.oci.registry")

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header: the scheme (lowercased) and its parameters."""

    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``Bearer realm="…",service="…",scope="…"`` (or ``Basic realm="…"``); None if unparseable.

    httpx has no parser for challenges, and registries send exactly one, so only the first is read.
    """
    scheme, _, rest = header.strip().partition(" ")
    if not scheme or not re.fullmatch(r"[A-Za-z0-9_.-]+", scheme):
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
        pos = m.end()
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index body as served, with its Content-Type and Docker-Content-Digest header."""

    data: bytes
    media_type: str
    header_digest: str | None


def _error_detail(resp: httpx.Response) -> str:
    """A short description of an error response: status plus the registry's first error code/message."""
    try:
        body = b""
        for chunk in resp.iter_bytes():
            body += chunk
            if len(body) > MAX_ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        body = b""
    detail = f"HTTP {resp.status_code}"
    try:
        errors = json.loads(body[:MAX_ERROR_BODY_BYTES]).get("errors") or []
        first = errors[0]
        said = f"{first.get('code') or ''} {first.get('message') or ''}".strip()
    except (ValueError, AttributeError, IndexError, TypeError, RecursionError):
        said = body[:200].decode("utf-8", "replace").strip()
    if said:  # the registry's words, escaped: one line, encodable, bounded
        detail += f": {escape(said, 200)}"
    return detail


def _transport_detail(err: BaseException) -> str:
    """``Name: message`` of a transport error, escaped (its text may quote a URL or a header)."""
    return f"{type(err).__name__}: {escape(err, 200)}"


def _tls_protocol_error(err: BaseException) -> ssl.SSLError | None:
    """The TLS error (not a certificate refusal) in ``err``'s cause chain: what a handshake with a
    server that speaks plain HTTP ends with (``WRONG_VERSION_NUMBER``, ``record layer failure``)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_problem(err: BaseException) -> str | None:
    """A user-facing reason when ``err`` is a TLS failure (found in its cause chain), else None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (
                f"the certificate was not accepted ({seen.verify_message or seen.reason}); if the "
                "registry uses a private CA, point SSL_CERT_FILE at its certificate bundle"
            )
        if isinstance(seen, ssl.SSLError):
            return (
                f"TLS failed ({getattr(seen, 'reason', None) or seen}); if the registry serves plain HTTP "
                "(and the network is trusted), use an http:// registry URL (`runner run --insecure-registry`)"
            )
        seen = seen.__cause__ or seen.__context__
    return None


class _Breaker:
    """Breaks off a client's connections when its pull is canceled.

    A read from a registry that stops answering waits out its timeout (a minute), and nothing wakes a
    thread blocked in it except the socket going down. The sockets are learnt from httpx's ``trace``
    request extension as connections are made (plain, then TLS); a watcher thread, started with the
    first connection, polls the cancel Event and shuts them down, so the blocked read fails at once and
    the retry loop sees the cancel.
    """

    def __init__(self, cancel: threading.Event) -> None:
        self._cancel = cancel
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        sock = info["return_value"].get_extra_info("socket")
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            self._sockets.add(sock)
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="oci-pull-cancel", daemon=True)
                self._watcher.start()

    def _watch(self) -> None:
        while not self._closed.is_set():
            if self._cancel.wait(CANCEL_POLL_SECONDS):
                self._break()
                return

    def _break(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with suppress(OSError):  # closed meanwhile (its fd is then -1: never another file's)
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain call, also for an SSLSocket

    def close(self) -> None:
        self._closed.set()


@functools.lru_cache(maxsize=8)
def tls_context(verify: bool | str, cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """httpx's TLS context for ``verify`` (True: SSL_CERT_FILE, SSL_CERT_DIR or certifi's bundle; a
    path: that CA file or directory), made once per process: loading a CA bundle takes about 30 ms,
    which the daemon would otherwise pay at every job's pull (half of a new commit's pull of one small
    layer). The variables are part of the key, so a change to them is honoured."""
    del cert_file, cert_dir  # read by create_ssl_context itself
    if isinstance(verify, str):
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    return httpx.create_ssl_context(verify=verify)


class RegistryClient:
    """Pulls manifests and blobs of one repository. Thread-safe: layers may be fetched in parallel."""

    def __init__(
        self,
        ref: ImageReference,
        credentials: Credentials | None = None,
        *,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        timeout: float = 60.0,
        verify: bool | str = True,
        transport: httpx.BaseTransport | None = None,
        cancel: threading.Event | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.ref = ref
        self._warn = warn
        # HTTPS first; a loopback registry that answers the handshake in plain HTTP is used over HTTP
        self._https_prefix = f"{dataclasses.replace(ref, insecure=False).base_url}/"
        self._may_fall_back = not ref.insecure and may_fall_back_to_http(ref.registry)
        self._cancel = cancel or threading.Event()  # never set when none is given
        self._breaker = _Breaker(cancel) if cancel is not None else None
        self._creds = credentials or Credentials()
        self._retries = retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._client_options: dict[str, Any] = {
            "timeout": httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            "verify": verify,
            "transport": transport,
            "headers": {"User-Agent": USER_AGENT},
            "follow_redirects": True,
        }
        self._client_: httpx.Client | None = None
        self._client_lock = threading.Lock()
        self._lock = threading.Lock()
        self._creds.check()  # before any request: a bad token is one line, never retried or echoed
        self._auth: str | None = f"Bearer {self._creds.token}" if self._creds.token else None
        self._realm_fetched_at: float | None = None
        self._secrets: list[str] = list(self._creds.secrets)
        if self._creds.has_basic:
            self._secrets.append(self._basic_auth().removeprefix("Basic "))

    @property
    def _client(self) -> httpx.Client:
        """Made on first use: a pull whose blobs are all cached never pays for the TLS context."""
        with self._client_lock:
            if self._client_ is None:
                options = dict(self._client_options)
                verify = options.pop("verify")
                env = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
                self._client_ = httpx.Client(**options, verify=tls_context(verify, *env))
            return self._client_

    def close(self) -> None:
        if self._breaker is not None:
            self._breaker.close()
        if self._client_ is not None:
            self._client_.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- secrets ------------------------------------------------------------------------------------

    def _basic_auth(self) -> str:
        raw = f"{self._creds.username}:{self._creds.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def redact(self, text: str) -> str:
        """``text`` with every form of every secret this client holds replaced by ``***``."""
        forms = {
            form
            for secret in self._secrets
            for form in (secret, quote_url(secret, safe=""), repr(secret)[1:-1], escape(secret, len(secret)))
            if form
        }
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, "***")
        return text

    @contextmanager
    def redacting(self) -> Iterator[None]:
        """Errors raised inside carry no secret: a registry may echo our token in its error body."""
        try:
            yield
        except RunnerError as e:
            text = str(e)
            clean = self.redact(text)
            if clean != text:
                e.args = (clean,)
            raise

    # --- plumbing -----------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"registry {self.ref.registry}"

    def _url(self, kind: str, reference: str) -> str:
        return f"{self.ref.base_url}/v2/{self.ref.repository}/{kind}/{reference}"

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise CanceledError(CANCELED_PULL)

    def _backoff_for(self) -> Backoff:
        """A fresh retry budget for one operation; its waits end, with CanceledError, on cancel."""
        return Backoff(self._retries, self._backoff, self._max_backoff, self._cancel, self._check_cancel)

    def _fall_back_to_http(self, url: str, err: httpx.TransportError) -> bool:
        """Switch this client to plain HTTP if ``err`` is a loopback registry speaking HTTP to our TLS
        handshake on one of its own URLs (never a token realm or a redirect elsewhere). Warns once."""
        if not self._may_fall_back or not url.startswith(self._https_prefix):
            return False
        try:
            failed = str(err.request.url)  # a redirect's target when the redirect failed
        except RuntimeError:  # no request attached
            failed = url
        if not failed.startswith(self._https_prefix):
            return False
        tls = _tls_protocol_error(err)
        if tls is None:
            return False
        with self._lock:
            if self._may_fall_back:
                self._may_fall_back = False
                self.ref = dataclasses.replace(self.ref, insecure=True)
                reason = escape(getattr(tls, "reason", None) or tls, 100)
                text = (
                    f"registry {self.ref.registry} does not speak TLS ({reason}); it "
                    "is on this machine, so the pull goes on over plain HTTP, as Docker does for loopback "
                    "registries (pass --insecure-registry to use HTTP from the start)"
                )
                if self._warn is not None:
                    self._warn(text)
                else:
                    log.warning("%s", text)
        return True

    def _effective_url(self, url: str) -> str:
        """``url`` with https:// turned into http:// for the registry's own URLs once it fell back."""
        if self.ref.insecure and url.startswith(self._https_prefix):
            return "http://" + url.removeprefix("https://")
        return url

    def _send_once(self, method: str, url: str, headers: dict[str, str], auth: str | None) -> httpx.Response:
        self._check_cancel()  # a canceled pull sends nothing more
        url = self._effective_url(url)
        hdrs = dict(headers)
        if auth is not None:
            hdrs["Authorization"] = auth
        extensions = {"trace": self._breaker.trace} if self._breaker is not None else None
        request = self._client.build_request(method, url, headers=hdrs, extensions=extensions)
        try:
            return self._client.send(request, stream=True)
        except httpx.TransportError as e:
            self._check_cancel()  # a connection broken off by the cancel is no TLS problem
            if self._fall_back_to_http(url, e):
                return self._send_once(method, url, headers, auth)
            tls = _tls_problem(e)
            if tls is not None:  # a certificate does not get better by retrying: no caller retries this
                where = request.url.netloc.decode()
                raise ImageError(f"cannot connect to {where} over HTTPS: {tls}") from None
            raise

    def _request(self, method: str, url: str, headers: dict[str, str], what: str) -> httpx.Response:
        """Send with retries (transport errors, 429/5xx) and one authentication round on 401.

        Returns the final (streaming) response, whatever its status; the caller closes it.
        """
        backoff = self._backoff_for()
        authenticated = False
        while True:
            auth = self._auth
            try:
                resp = self._send_once(method, url, headers, auth)
            except httpx.TransportError as e:
                self._check_cancel()  # a read broken off by the cancel
                if backoff.spent:
                    raise ImageError(
                        f"cannot fetch {what} from {self._where} ({_transport_detail(e)}) after "
                        f"{backoff.used + 1} attempts; check that the registry is reachable and retry"
                    ) from None
                backoff.wait()
                continue
            if resp.status_code == 401 and not authenticated:
                challenge = resp.headers.get("www-authenticate", "")
                detail = _error_detail(resp)
                resp.close()
                authenticated = True
                self._authenticate(challenge, auth, detail)
                continue
            if resp.status_code in RETRY_STATUSES and not backoff.spent:
                _error_detail(resp)
                resp.close()
                backoff.wait(resp.headers.get("retry-after", ""))
                continue
            return resp

    def _authenticate(self, header: str, used: str | None, detail: str) -> None:
        with self._lock:
            if self._auth != used:  # another thread already refreshed the credentials
                return
            challenge = parse_challenge(header) if header else None
            if challenge is not None and challenge.scheme == "basic" and self._creds.has_basic:
                self._auth = self._basic_auth()
                return
            if challenge is not None and challenge.scheme == "bearer" and "realm" in challenge.params:
                last = self._realm_fetched_at
                if last is not None and time.monotonic() - last < REALM_REFRESH_SECONDS:
                    return  # the realm's fresh token was refused too: let the caller report the 401
                token = self._fetch_token(challenge)
                self._secrets.append(token)
                self._auth = "Bearer " + token
                self._realm_fetched_at = time.monotonic()
                return
            raise self._unauthorized(detail)

    def _unauthorized(self, detail: str) -> ImageError:
        repo = self.ref.repository
        if self._creds.token:
            return ImageError(
                f"{self._where} refused the pull token for repository {repo} ({detail}); the job's token "
                "may have expired or not grant pull on this repository"
            )
        if self._creds.has_basic:
            return ImageError(
                f"{self._where} refused the credentials of user {self._creds.username!r} for repository "
                f"{repo} ({detail}); check the registry username and password"
            )
        return ImageError(
            f"{self._where} requires authentication to pull repository {repo} ({detail}); pass a token "
            "or a registry username and password"
        )

    def _fetch_token(self, challenge: Challenge) -> str:
        url = self._token_url(challenge)
        realm = quote(challenge.params["realm"])  # shown in messages from here on
        body = self._token_body(url, realm)
        try:
            parsed: Any = json.loads(body)
            token = parsed.get("token") or parsed.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise ImageError(
                f"the token service {realm} of {self._where} returned no token; "
                "contact the registry's operator"
            )
        check_token(
            token,
            f"the token that the token service {realm} of {self._where} returned",
            fix="the token service is misconfigured, contact the registry's operator",
        )
        return token

    def _token_url(self, challenge: Challenge) -> str:
        """The realm's URL with the service and scope (this repository's pull when none is named)."""
        realm = challenge.params["realm"]
        query: dict[str, str] = {}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        query["scope"] = challenge.params.get("scope") or f"repository:{self.ref.repository}:pull"
        try:
            url = str(httpx.URL(realm, params=query)) if realm.startswith(("https://", "http://")) else None
        except httpx.InvalidURL:
            url = None
        if url is None:
            raise ImageError(
                f"{self._where} named an invalid token realm {quote(realm)} in its challenge; the registry "
                "is misconfigured, contact its operator"
            )
        return url

    def _token_body(self, url: str, realm: str) -> bytes:
        """The token service's answer, fetched with this client's credentials, with retries."""
        auth: str | None = None
        if self._creds.has_basic:
            auth = self._basic_auth()
        elif self._creds.token:
            auth = f"Bearer {self._creds.token}"
        backoff = self._backoff_for()
        while True:
            try:
                resp = self._send_once("GET", url, {}, auth)
            except httpx.TransportError as e:
                self._check_cancel()  # a read broken off by the cancel
                if backoff.spent:
                    raise ImageError(
                        f"cannot reach the token service {realm} of {self._where} ({_transport_detail(e)}); "
                        "check that it is reachable and retry"
                    ) from None
                backoff.wait()
                continue
            with closing(resp):
                if resp.status_code in RETRY_STATUSES and not backoff.spent:
                    backoff.wait(resp.headers.get("retry-after", ""))
                    continue
                if resp.status_code in (401, 403):
                    raise self._unauthorized(f"token service {realm}: {_error_detail(resp)}")
                if resp.status_code != 200:
                    raise ImageError(
                        f"the token service {realm} of {self._where} failed ({_error_detail(resp)}); retry "
                        "later or contact the registry's operator"
                    )
                try:
                    return self._read_bounded(resp, MAX_TOKEN_RESPONSE_BYTES, f"token from {realm}")
                except httpx.TransportError as e:
                    self._check_cancel()
                    raise ImageError(
                        f"reading the token from {realm} failed ({_transport_detail(e)}); retry the pull"
                    ) from None

    def _read_bounded(self, resp: httpx.Response, limit: int, what: str) -> bytes:
        """Read a whole (JSON) body of at most ``limit`` bytes; transport errors propagate (retryable)."""
        length = resp.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise ImageError(
                f"{what} from {self._where} is {int(length)} bytes, more than the {limit} byte limit; the "
                "image is malformed or hostile, rebuild it"
            )
        data = bytearray()
        for chunk in resp.iter_bytes():
            data += chunk
            if len(data) > limit:
                raise ImageError(
                    f"{what} from {self._where} is more than the {limit} byte limit; the image is "
                    "malformed or hostile, rebuild it"
                )
        return bytes(data)

    def _status_error(self, resp: httpx.Response, what: str) -> ImageError:
        detail = _error_detail(resp)
        if resp.status_code == 404:
            return ImageError(
                f"{self._where} has no {what} in repository {self.ref.repository} ({detail}); check the "
                "image reference and that the image was pushed"
            )
        if resp.status_code in (401, 403):
            return self._unauthorized(detail)
        return ImageError(
            f"{self._where} failed to serve {what} of repository {self.ref.repository} ({detail}); retry "
            "later or check the registry"
        )

    # --- API ------------------------------------------------------------------------------------------

    def get_manifest(self, reference: str, *, max_bytes: int = MAX_MANIFEST_BYTES) -> FetchedManifest:
        """GET a manifest or index by tag or digest (body bounded by ``max_bytes``)."""
        with self.redacting():
            return self._get_manifest(reference, max_bytes)

    def _get_manifest(self, reference: str, max_bytes: int) -> FetchedManifest:
        what = f"manifest {reference}"
        backoff = self._backoff_for()
        while True:
            resp = self._request("GET", self._url("manifests", reference), {"Accept": MANIFEST_ACCEPT}, what)
            with closing(resp):
                if resp.status_code != 200:
                    raise self._status_error(resp, what)
                try:
                    data = self._read_bounded(resp, max_bytes, what)
                except httpx.TransportError as e:
                    self._check_cancel()
                    if backoff.spent:
                        raise ImageError(
                            f"reading {what} from {self._where} failed ({_transport_detail(e)}); "
                            "retry the pull"
                        ) from None
                    backoff.wait()
                    continue
                media_type = resp.headers.get("content-type", "").split(";")[0].strip()
                return FetchedManifest(data, media_type, resp.headers.get("docker-content-digest"))

    @contextmanager
    def _blob_response(self, digest: str, offset: int) -> Iterator[httpx.Response]:
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = self._request("GET", self._url("blobs", digest), headers, f"blob {digest}")
        try:
            yield resp
        finally:
            resp.close()

    def download_blob(
        self,
        digest: str,
        out: BinaryIO,
        *,
        size: int,
        what: str = "blob",
        on_progress: Callable[[int], None] | None = None,
    ) -> str:
        """Stream blob ``digest`` (``size`` bytes per its descriptor) into ``out``; returns the digest of
        the bytes received (the caller compares it). ``out`` must be empty, seekable and writable.

        A dropped connection resumes with ``Range: bytes=N-`` (a server that ignores Range restarts from
        zero); more bytes than ``size`` or fewer at a clean end are an :class:`ImageError`.
        """
        with self.redacting():
            return self._download_blob(digest, out, size, what, on_progress)

    def _download_blob(
        self, digest: str, out: BinaryIO, size: int, what: str, on_progress: Callable[[int], None] | None
    ) -> str:
        parsed = parse_digest(digest, what=f"{what} digest")
        hasher: Hasher = parsed.hasher()
        done = 0
        resumes = self._backoff_for()
        label = f"{what} {digest}"
        while True:
            with self._blob_response(digest, done) as resp:
                if resp.status_code == 206 and done:
                    start = re.match(r"bytes (\d+)-", resp.headers.get("content-range", ""))
                    if start is None or int(start.group(1)) != done:
                        raise ImageError(
                            f"{self._where} answered the resume of {label} at byte {done} with range "
                            f"{resp.headers.get('content-range')!r}; retry the pull"
                        )
                elif resp.status_code == 200:
                    if done:  # Range ignored: start over
                        out.seek(0)
                        out.truncate()
                        hasher, done = parsed.hasher(), 0
                elif resp.status_code == 416 and done >= size:
                    break
                else:
                    raise self._status_error(resp, label)
                try:
                    for chunk in resp.iter_raw(NET_CHUNK_SIZE):
                        if done + len(chunk) > size:
                            raise ImageError(
                                f"{label} is larger than the {size} bytes its descriptor says; the image "
                                "is malformed or hostile, rebuild it"
                            )
                        out.write(chunk)
                        hasher.update(chunk)
                        done += len(chunk)
                        if on_progress is not None:
                            on_progress(done)
                except httpx.TransportError as e:
                    self._check_cancel()
                    if resumes.spent:
                        raise ImageError(
                            f"downloading {label} from {self._where} was interrupted {resumes.used + 1} "
                            f"times (last: {_transport_detail(e)}) at byte {done} of {size}; retry the pull"
                        ) from None
                    resumes.wait()
                    continue
            if done < size:
                raise ImageError(
                    f"{label} is truncated: {self._where} sent {done} of the {size} bytes its descriptor "
                    "says; the image is corrupt on the registry, push it again"
                )
            break
        out.flush()
        return f"{parsed.algorithm}:{hasher.hexdigest()}"
