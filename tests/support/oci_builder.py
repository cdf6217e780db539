"""A small OCI image layout writer for tests and examples (no Docker, no registry).

Tests need real layouts with precise, sometimes hostile, contents: entries that climb out of the
root, planted symlinks, device nodes, whiteouts, mislabeled or corrupt blobs, multi-platform
indexes, Docker v2 media types. Everything is written with tarfile, hashlib and json; file data is
streamed, so large (e.g. all-zero "bomb") entries cost no memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform as _platform
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, cast

import zstandard

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"

Compression = Literal["gzip", "zstd", "none"]
OCI_LAYER_TYPES: dict[str, str] = {
    "gzip": OCI_LAYER + "+gzip",
    "zstd": OCI_LAYER + "+zstd",
    "none": OCI_LAYER,
}

_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
}


def host_arch() -> str:
    machine = _platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


@dataclass
class Entry:
    """One tar entry, written verbatim (names and link targets are not sanitised: hostile is allowed).

    ``zeros``: for a "file", append this many zero bytes after ``data`` (streamed, for big files).
    """

    name: str
    type: str = "file"  # file | dir | symlink | hardlink | fifo | chardev | blockdev
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    mtime: float = 1_700_000_000
    xattrs: dict[str, bytes] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0
    zeros: int = 0


def file(name: str, data: bytes | str = b"", mode: int = 0o644, **kw: Any) -> Entry:
    return Entry(name, "file", data.encode() if isinstance(data, str) else data, mode, **kw)


def directory(name: str, mode: int = 0o755, **kw: Any) -> Entry:
    return Entry(name, "dir", mode=mode, **kw)


def symlink(name: str, target: str, **kw: Any) -> Entry:
    return Entry(name, "symlink", linkname=target, mode=0o777, **kw)


def hardlink(name: str, target: str, **kw: Any) -> Entry:
    return Entry(name, "hardlink", linkname=target, **kw)


@dataclass
class Layer:
    """A layer with explicit options; a plain ``list[Entry]`` uses the layout's defaults."""

    entries: list[Entry]
    compression: Compression | None = None
    media_type: str | None = None  # override (e.g. mislabeled or foreign types)


@dataclass
class RawLayer:
    """A layer blob given as bytes (garbage, truncated streams, ...), stored as is."""

    data: bytes
    media_type: str = OCI_LAYER + "+gzip"
    diff_id: str | None = None


LayerSpec = Sequence[Entry] | Layer | RawLayer


def layer_from_dir(src: Path, *, prefix: str = "") -> list[Entry]:
    """Entries reproducing the real tree ``src`` (modes, owners, symlinks kept), parents first."""
    out: list[Entry] = []
    pre = prefix.strip("/")

    def name_of(p: Path) -> str:
        rel = p.relative_to(src).as_posix()
        return f"{pre}/{rel}" if pre else rel

    def walk(d: Path) -> Iterator[Path]:
        for child in sorted(d.iterdir()):
            yield child
            if child.is_dir() and not child.is_symlink():
                yield from walk(child)

    for p in walk(src):
        st = p.lstat()
        common: dict[str, Any] = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
        common["mtime"] = st.st_mtime
        if stat.S_ISLNK(st.st_mode):
            out.append(Entry(name_of(p), "symlink", linkname=os.readlink(p), **common))
        elif stat.S_ISDIR(st.st_mode):
            out.append(Entry(name_of(p), "dir", **common))
        elif stat.S_ISREG(st.st_mode):
            out.append(Entry(name_of(p), "file", data=p.read_bytes(), **common))
    return out


# --- tar writing -------------------------------------------------------------------------------------


class _Zeros(io.RawIOBase):
    def __init__(self, head: bytes, n: int) -> None:
        self._head = head
        self._left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._head:
            k = min(len(view), len(self._head))
            view[:k] = self._head[:k]
            self._head = self._head[k:]
            return k
        k = min(len(view), self._left)
        view[:k] = bytes(k)
        self._left -= k
        return k


class _HashingWriter(io.RawIOBase):
    """Hashes what passes through (the uncompressed tar: the diff_id) and forwards it."""

    def __init__(self, dst: IO[bytes]) -> None:
        self._dst = dst
        self.sha = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.sha.update(data)
        self._dst.write(data)
        return len(data)


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(e.name)
    ti.type = _TAR_TYPES[e.type]
    ti.mode = e.mode
    ti.uid, ti.gid = e.uid, e.gid
    ti.mtime = e.mtime
    ti.linkname = e.linkname
    ti.devmajor, ti.devminor = e.devmajor, e.devminor
    if e.type == "file":
        ti.size = len(e.data) + e.zeros
    if e.xattrs:
        ti.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in e.xattrs.items()
        }
    return ti


def write_tar(entries: Sequence[Entry], out: IO[bytes]) -> None:
    """Write ``entries`` as an uncompressed PAX tar stream to ``out``."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            ti = _tarinfo(e)
            if e.type == "file":
                tar.addfile(ti, io.BufferedReader(_Zeros(e.data, e.zeros), 1 << 20))
            else:
                tar.addfile(ti)


def sparse_tar(name: str, size: int, workdir: Path, data: bytes = b"x") -> bytes:
    """An uncompressed GNU tar holding ``name``, a sparse file of ``size`` apparent bytes (``data`` at
    its start, the rest a hole), written by GNU tar --sparse: a few KiB whatever ``size`` is."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / name
    with src.open("wb") as f:
        f.write(data)
        f.truncate(size)
    try:
        return subprocess.run(
            ["tar", "--sparse", "--format=gnu", "-C", str(workdir), "-cf", "-", name],
            check=True,
            capture_output=True,
        ).stdout
    finally:
        src.unlink()


def layer_bytes(entries: Sequence[Entry], compression: Compression = "gzip") -> bytes:
    """A compressed layer blob in memory (for small layers and stream-level tests)."""
    buf = io.BytesIO()
    _write_layer(entries, compression, buf)
    return buf.getvalue()


def _write_layer(entries: Sequence[Entry], compression: Compression, out: IO[bytes]) -> str:
    """Write a compressed layer to ``out``; returns the diff_id (digest of the uncompressed tar)."""
    if compression == "gzip":
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
            hw = _HashingWriter(cast(IO[bytes], gz))
            write_tar(entries, cast(IO[bytes], hw))
    elif compression == "zstd":
        with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as zw:
            hw = _HashingWriter(cast(IO[bytes], zw))
            write_tar(entries, cast(IO[bytes], hw))
    elif compression == "none":
        hw = _HashingWriter(out)
        write_tar(entries, cast(IO[bytes], hw))
    else:
        raise ValueError(f"unknown compression {compression!r}")
    return "sha256:" + hw.sha.hexdigest()


# --- blobs and layout --------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(layout: Path, digest: str) -> Path:
    alg, _, hexpart = digest.partition(":")
    return layout / "blobs" / alg / hexpart


def write_blob(layout: Path, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    """Store ``data`` as a blob; returns its descriptor (``extra`` keys are added, e.g. annotations)."""
    digest = sha256(data)
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def write_json_blob(layout: Path, obj: Any, media_type: str, **extra: Any) -> dict[str, Any]:
    return write_blob(layout, json.dumps(obj, separators=(",", ":")).encode(), media_type, **extra)


def read_json_blob(layout: Path, digest: str) -> Any:
    return json.loads(blob_path(layout, digest).read_bytes())


def init_layout(layout: Path) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    if not (layout / "index.json").exists():
        write_index(layout, [])


def read_index(layout: Path) -> list[dict[str, Any]]:
    return list(json.loads((layout / "index.json").read_text())["manifests"])


def write_index(layout: Path, manifests: list[dict[str, Any]]) -> None:
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    (layout / "index.json").write_text(json.dumps(index, indent=2))


def _store_layer(
    layout: Path, spec: LayerSpec, compression: Compression, docker: bool
) -> tuple[dict[str, Any], str]:
    if isinstance(spec, RawLayer):
        desc = write_blob(layout, spec.data, spec.media_type)
        return desc, spec.diff_id or desc["digest"]
    entries = spec.entries if isinstance(spec, Layer) else list(spec)
    comp = spec.compression if isinstance(spec, Layer) and spec.compression else compression
    if isinstance(spec, Layer) and spec.media_type:
        media_type = spec.media_type
    elif docker and comp == "gzip":
        media_type = DOCKER_LAYER_GZIP
    else:
        media_type = OCI_LAYER_TYPES[comp]
    tmp_dir = layout / "blobs" / "sha256"
    with tempfile.NamedTemporaryFile(dir=tmp_dir, delete=False) as tmp:
        diff_id = _write_layer(entries, comp, tmp)
    tmp_path = Path(tmp.name)
    h = hashlib.sha256()
    with tmp_path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    size = tmp_path.stat().st_size
    tmp_path.replace(blob_path(layout, digest))
    return {"mediaType": media_type, "digest": digest, "size": size}, diff_id


def build_layout(
    dest: Path,
    layers: Sequence[LayerSpec],
    config: dict[str, Any] | None = None,
    *,
    compression: Compression = "gzip",
    tag: str | None = "latest",
    docker_media_types: bool = False,
    platforms: list[tuple[str, str]] | None = None,
    arch: str | None = None,
    manifest_annotations: dict[str, str] | None = None,
    edit_manifest: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Write (or add to) the OCI layout ``dest``; returns the digest that index.json points at.

    ``config`` is the Docker-cased inner config ({"Entrypoint": [...], "Cmd": [...], "Env": [...],
    "WorkingDir": ..., "User": ...}). With ``platforms`` ([(os, arch), ...]) one manifest per platform
    is written (same layers, config architecture set) under an image index / manifest list, and the
    index's digest is returned. Calling it again on the same ``dest`` adds another image (another tag).
    ``edit_manifest`` may change each manifest dict before it is stored (for hostile fixtures).
    """
    init_layout(dest)
    layer_descs: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for spec in layers:
        desc, diff_id = _store_layer(dest, spec, compression, docker_media_types)
        layer_descs.append(desc)
        diff_ids.append(diff_id)

    manifest_type = DOCKER_MANIFEST if docker_media_types else OCI_MANIFEST
    config_type = DOCKER_CONFIG if docker_media_types else OCI_CONFIG
    index_type = DOCKER_LIST if docker_media_types else OCI_INDEX

    def manifest_for(os_name: str, arch_name: str) -> dict[str, Any]:
        blob = {
            "architecture": arch_name,
            "os": os_name,
            "config": config or {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "tests/support/oci_builder.py"} for _ in diff_ids],
        }
        config_desc = write_json_blob(dest, blob, config_type)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config_desc,
            "layers": layer_descs,
        }
        if manifest_annotations:
            manifest["annotations"] = manifest_annotations
        if edit_manifest is not None:
            edit_manifest(manifest)
        return write_json_blob(
            dest, manifest, manifest_type, platform={"architecture": arch_name, "os": os_name}
        )

    if platforms:
        children = [manifest_for(o, a) for o, a in platforms]
        top = write_json_blob(
            dest, {"schemaVersion": 2, "mediaType": index_type, "manifests": children}, index_type
        )
    else:
        top = manifest_for("linux", arch or host_arch())
    if tag is not None:
        top["annotations"] = {REF_NAME: tag}
    entries = [m for m in read_index(dest) if tag is None or m.get("annotations", {}).get(REF_NAME) != tag]
    write_index(dest, [*entries, top])
    return str(top["digest"])


def manifest_of(layout: Path, tag: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(index.json entry, manifest JSON) of the image tagged ``tag`` (or the only one)."""
    entries = read_index(layout)
    entry = next(m for m in entries if tag is None or m.get("annotations", {}).get(REF_NAME) == tag)
    return entry, read_json_blob(layout, entry["digest"])


def replace_manifest(layout: Path, manifest: dict[str, Any], tag: str | None = None) -> str:
    """Store ``manifest`` and point the index entry of ``tag`` (or the only one) at it; returns its digest."""
    entries = read_index(layout)
    for i, m in enumerate(entries):
        if tag is None or m.get("annotations", {}).get(REF_NAME) == tag:
            extra = {k: v for k, v in m.items() if k not in ("mediaType", "digest", "size")}
            entries[i] = write_json_blob(layout, manifest, m["mediaType"], **extra)
            write_index(layout, entries)
            return str(entries[i]["digest"])
    raise KeyError(tag)
