"""A real registry on loopback for tests and benchmarks: Debian's docker-registry, started on a free
port with filesystem storage, and two ways to push an OCI layout into it (skopeo, or a small HTTP
pusher for shapes skopeo rewrites or refuses)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.oci_builder import blob_path, read_index

REGISTRY_BIN = "docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- docker-registry ---------------------------------------------------------------------------------


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    storage: Path
    proc: subprocess.Popen[bytes]
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def blob_data(self, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


def start_registry(
    tmp: Path, storage: Path, auth: dict[str, Any] | None = None, tls: tuple[Path, Path] | None = None
) -> Registry:
    """``tls``: (certificate, key) PEM files: the registry then serves HTTPS only."""
    if shutil.which(REGISTRY_BIN) is None:
        raise RuntimeError(
            f"{REGISTRY_BIN} is not installed; `apt-get install docker-registry` (the Makefile does)"
        )
    port = free_port()
    lines = [
        "version: 0.1",
        "log: {level: error}",
        f"storage: {{filesystem: {{rootdirectory: {json.dumps(str(storage))}}}, delete: {{enabled: true}}}}",
        f"http: {{addr: '127.0.0.1:{port}', secret: test-secret}}",
    ]
    if tls is not None:
        cert, key = tls
        lines[-1] = (
            f"http: {{addr: '127.0.0.1:{port}', secret: test-secret, "
            f"tls: {{certificate: {json.dumps(str(cert))}, key: {json.dumps(str(key))}}}}}"
        )
    if auth is not None:
        lines.append(f"auth: {json.dumps(auth)}")
    scheme = "https" if tls else "http"
    config = tmp / f"registry-{port}.yml"
    config.write_text("\n".join(lines) + "\n")
    log = (tmp / f"registry-{port}.log").open("wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(f"{scheme}://127.0.0.1:{port}/v2/", timeout=1, verify=False).status_code in (
                200,
                401,
            ):
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"docker-registry did not start: {(tmp / f'registry-{port}.log').read_text()}")
        time.sleep(0.05)
    return Registry(f"127.0.0.1:{port}", storage, proc, scheme)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- pushing -----------------------------------------------------------------------------------------


def skopeo_push(layout: Path, reg: Registry, repo: str, tag: str, *, fmt: str | None = None) -> None:
    argv = ["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false"]
    argv += ["--format", fmt] if fmt else ["--preserve-digests"]
    argv += [f"oci:{layout}:{tag}", f"docker://{reg.host}/{repo}:{tag}"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def http_push(layout: Path, reg: Registry, repo: str, tag: str, *, verify: bool = True) -> str:
    """Push every blob of ``layout`` and the manifests reachable from ``tag`` verbatim; returns the
    top digest (for shapes skopeo rewrites or refuses: Docker manifest lists, odd manifests)."""
    base = f"{reg.url}/v2/{repo}"
    with httpx.Client(timeout=30, verify=verify) as c:
        for path in sorted((layout / "blobs" / "sha256").iterdir()):
            digest = "sha256:" + path.name
            if c.head(f"{base}/blobs/{digest}").status_code == 200:
                continue
            r = c.post(f"{base}/blobs/uploads/")
            assert r.status_code == 202, r.text
            loc = httpx.URL(reg.url).join(r.headers["location"]).copy_merge_params({"digest": digest})
            with path.open("rb") as body:
                r = c.put(loc, content=body, timeout=300)
            assert r.status_code == 201, r.text
        top = next(m for m in read_index(layout) if m.get("annotations", {}).get(REF_NAME) == tag)

        def put(desc: dict[str, Any], ref: str) -> None:
            body = blob_path(layout, desc["digest"]).read_bytes()
            doc = json.loads(body)
            for child in doc.get("manifests", []):
                put(child, child["digest"])
            r = c.put(f"{base}/manifests/{ref}", content=body, headers={"Content-Type": desc["mediaType"]})
            assert r.status_code == 201, r.text

        put(top, tag)
        return str(top["digest"])


REF_NAME = "org.opencontainers.image.ref.name"
