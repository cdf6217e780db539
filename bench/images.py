"""The benchmarks' reference images, built once and cached, and a loopback registry to pull them from.

Benchmarks compare against references on the same input, so the inputs must be the same every run
and cheap to get again: each image is built under ``$BENCH_CACHE`` (default
``~/.cache/bencher-runner-bench``) in a temp directory renamed into place when complete, under a lock,
so a crashed build leaves nothing half-made and two benchmark processes never build it twice.

- ``realistic_layout()``: Debian bookworm minbase + python3 (debootstrap), one gzip layer via umoci, as
  BENCHMARKS.md specifies (about 261 MiB unpacked, 117 MiB compressed).
- ``big_layer_layout(size_mib)``: busybox plus ``size_mib`` MiB of incompressible data in one gzip
  layer, written by streaming, for peak-RSS measurements of pulls.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import httpx
from tests.support.busybox import busybox_tree
from tests.support.oci_builder import (
    OCI_CONFIG,
    OCI_LAYER_TYPES,
    OCI_MANIFEST,
    REF_NAME,
    host_arch,
    init_layout,
    write_index,
    write_json_blob,
)
from tests.support.registry import Registry, start_registry, stop_process

MIB = 1 << 20
REALISTIC_CMD = ["python3", "-c", "print(sum(range(10**6)))"]
REALISTIC_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BIG_FILE = "data/random.bin"
BIG_SEED = 20240101
SOURCE_TAG = "latest"  # every layout built here tags its image so


def cache_root() -> Path:
    root = Path(os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "bencher-runner-bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_root()/name``, built by ``build(tmp_dir)`` if missing (under a lock, renamed when done)."""
    root = cache_root()
    final = root / name
    if final.exists():
        return final
    lock = os.open(root / f".{name}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():  # built by another process while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(lock)
    return final


# --- the big-layer image (streamed) --------------------------------------------------------------------


class _HashingFile(io.RawIOBase):
    """Writes through to ``dst`` while hashing (sha256) and counting what passes."""

    def __init__(self, dst: IO[bytes]) -> None:
        self._dst = dst
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self.sha.update(view)
        self._dst.write(view)
        self.size += len(view)
        return len(view)


class _RandomStream(io.RawIOBase):
    """``size`` deterministic pseudo-random bytes (seeded), generated chunk by chunk as they are read."""

    def __init__(self, size: int, seed: int) -> None:
        self._left = size
        self._rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), self._left, MIB)
        view[:n] = self._rng.randbytes(n)
        self._left -= n
        return n


def write_single_layer_layout(
    layout: Path,
    write_tar: Callable[[tarfile.TarFile], None],
    config: dict[str, Any],
    *,
    tag: str = "latest",
    compresslevel: int = 6,
) -> str:
    """An OCI layout with one gzip layer whose tar ``write_tar`` streams; returns the manifest digest."""
    init_layout(layout)
    blobs = layout / "blobs" / "sha256"
    with tempfile.NamedTemporaryFile(dir=blobs, delete=False) as raw:
        compressed = _HashingFile(raw)
        with gzip.GzipFile(
            fileobj=cast(IO[bytes], compressed), mode="wb", mtime=0, compresslevel=compresslevel
        ) as gz:
            plain = _HashingFile(cast(IO[bytes], gz))
            with tarfile.open(fileobj=cast(IO[bytes], plain), mode="w|", format=tarfile.PAX_FORMAT) as tar:
                write_tar(tar)
    layer_digest = "sha256:" + compressed.sha.hexdigest()
    os.replace(raw.name, blobs / layer_digest.split(":", 1)[1])
    diff_id = "sha256:" + plain.sha.hexdigest()
    config_blob = {
        "architecture": host_arch(),
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "bench/images.py"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": write_json_blob(layout, config_blob, OCI_CONFIG),
        "layers": [{"mediaType": OCI_LAYER_TYPES["gzip"], "digest": layer_digest, "size": compressed.size}],
    }
    top = write_json_blob(layout, manifest, OCI_MANIFEST, annotations={REF_NAME: tag})
    write_index(layout, [top])
    return str(top["digest"])


def big_layer_layout(size_mib: int = 512) -> Path:
    """An OCI layout (tag ``latest``): one gzip layer of busybox plus ``size_mib`` MiB of random data."""

    def build(layout: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            tree = busybox_tree(Path(scratch) / "tree")

            def write_tar(tar: tarfile.TarFile) -> None:
                tar.add(tree, arcname=".", recursive=True)  # streams each file from disk
                info = tarfile.TarInfo(BIG_FILE)
                info.size = size_mib * MIB
                info.mode = 0o644
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BufferedReader(_RandomStream(info.size, BIG_SEED), MIB))

            # level 1: random data does not compress anyway, and the build stays quick
            write_single_layer_layout(layout, write_tar, {"Cmd": ["/bin/true"]}, compresslevel=1)

    return _cached(f"big-layer-{size_mib}M", build)


# --- the realistic image (debootstrap + umoci) ---------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (read at run time: never written into a file)."""
    candidates: list[str] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (
                    line.partition(":") for line in stanza.splitlines() if not line.startswith("#")
                )
                if v
            )
            if "bookworm" in fields.get("suites", "").split() and "deb" in fields.get("types", "").split():
                candidates += fields.get("uris", "").split()
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line + " ")
            if m:
                candidates.append(m.group(1))
    if not candidates:
        raise RuntimeError("no Debian bookworm mirror found in /etc/apt/sources.list(.d)")
    return candidates[0]


def _ensure_tool(tool: str, package: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not found:
        raise RuntimeError(f"{tool} is still missing after `apt-get install {package}`")
    return found


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} … failed ({proc.returncode}): {proc.stderr[-2000:]}")


def realistic_layout() -> Path:
    """The realistic image's OCI layout (tag ``latest``): bookworm minbase + python3 in one gzip layer."""

    def build(tmp: Path) -> None:
        debootstrap = _ensure_tool("debootstrap", "debootstrap")
        layout, bundle = tmp / "oci", tmp / "bundle"
        image = f"{layout}:latest"
        _run(["umoci", "init", "--layout", str(layout)])
        _run(["umoci", "new", "--image", image])
        _run(["umoci", "unpack", "--image", image, str(bundle)])  # an empty rootfs + its mtree
        rootfs = bundle / "rootfs"
        _run([debootstrap, "--variant=minbase", "--include=python3", "bookworm", str(rootfs), apt_mirror()])
        _run(["umoci", "repack", "--image", image, str(bundle)])  # the whole tree as ONE layer
        config = ["umoci", "config", "--image", image, "--config.env", REALISTIC_ENV]
        for arg in REALISTIC_CMD:
            config += ["--config.cmd", arg]
        _run(config)
        _run(["umoci", "gc", "--layout", str(layout)])
        shutil.rmtree(bundle)
        for p in layout.iterdir():
            p.rename(tmp / p.name)
        layout.rmdir()

    return _cached("realistic", build)


# --- the loopback registry -----------------------------------------------------------------------------


@contextlib.contextmanager
def loopback_registry(tmp: Path) -> Iterator[Registry]:
    """A docker-registry on 127.0.0.1 (plain HTTP) storing under ``tmp``; stopped on exit."""
    storage = tmp / "registry-storage"
    storage.mkdir(parents=True, exist_ok=True)
    reg = start_registry(tmp, storage)
    try:
        yield reg
    finally:
        stop_process(reg.proc)


def push(layout: Path, reg: Registry, repo: str, tag: str = "latest") -> str:
    """Push ``layout``'s image ``latest`` to ``reg`` as ``repo:tag``, byte-exact (each blob streamed from
    disk, none held in memory); returns its manifest digest."""
    base = f"{reg.url}/v2/{repo}"
    entry = _index_entry(layout, SOURCE_TAG)
    manifest_bytes = _blob(layout, entry["digest"]).read_bytes()
    manifest = json.loads(manifest_bytes)
    with httpx.Client(timeout=300) as client:
        for desc in [manifest["config"], *manifest["layers"]]:
            digest = desc["digest"]
            if client.head(f"{base}/blobs/{digest}").status_code == 200:
                continue
            r = client.post(f"{base}/blobs/uploads/")
            r.raise_for_status()
            location = httpx.URL(reg.url).join(r.headers["location"]).copy_merge_params({"digest": digest})
            with _blob(layout, digest).open("rb") as body:
                client.put(location, content=body).raise_for_status()
        headers = {"Content-Type": entry["mediaType"]}
        client.put(f"{base}/manifests/{tag}", content=manifest_bytes, headers=headers).raise_for_status()
    return str(entry["digest"])


def _index_entry(layout: Path, tag: str) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    entry: dict[str, Any] = next(
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag
    )
    return entry


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def layer_sizes(layout: Path, tag: str = "latest") -> tuple[int, int]:
    """(compressed bytes, count) of the layers of ``layout``'s image ``tag``."""
    manifest = json.loads(_blob(layout, _index_entry(layout, tag)["digest"]).read_bytes())
    return sum(int(layer["size"]) for layer in manifest["layers"]), len(manifest["layers"])
