"""Open an image from a tar archive, as users have them: ``docker save`` or ``skopeo copy`` output.

Two formats: an OCI layout in a tar (``oci-archive:FILE[:TAG]``; what ``skopeo copy … oci-archive:``
and current ``docker save`` write; a plain existing ``FILE[:TAG]`` is detected too) and the older
Docker archive (``docker-archive:FILE[:NAME:TAG]``: ``manifest.json``, a config JSON and layer tars).

The archive is untrusted like a layout and is never extracted: its headers are read first
(:mod:`tarfile` on the open file, streaming) and an archive with a member that climbs out (``..``, an
absolute name), a link pointing outside, a device, a FIFO, a duplicate name or a member larger than
the image limit is refused whole. The image's members are then read by offset from the archive
itself (links inside it are resolved by name, never through the filesystem): JSON members with a
memory bound, layers streamed into the content-addressed blob cache, hashed on the way, so the next
run finds them there. A Docker archive names no digests, so they are computed: an uncompressed layer
(what ``docker save`` and skopeo write) must hash to the config's ``rootfs.diff_ids`` entry, a
compressed one is named by the digest of its bytes, and an OCI manifest is built in memory from the
config and layer digests: the image's identity (the template cache key) is derived from its content,
whatever the archive's member names.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from pydantic import Field

from bencher_runner.oci.blobcache import CANCELED_PULL, BlobCache
from bencher_runner.oci.digest import CHUNK_SIZE, digest_bytes, new_hasher, parse_digest, verify_bytes
from bencher_runner.oci.imageconfig import parse_image_config
from bencher_runner.oci.layout import (
    HOST_ARCH,
    MAX_JSON_BYTES,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    LayerRef,
    LocalImage,
    OciModel,
    parse_model,
    read_layout,
)
from bencher_runner.oci.progress import ProgressCallback, PullProgress
from bencher_runner.oci.untrusted import NotRegularFileError, open_regular, quote
from bencher_runner.spec.errors import CanceledError, ImageError

OCI_ARCHIVE = "oci-archive:"
DOCKER_ARCHIVE = "docker-archive:"
PREFIXES = (OCI_ARCHIVE, DOCKER_ARCHIVE)
MAX_MEMBERS = 10_000  # headers kept in memory while an archive is read
MAX_LINK_HOPS = 8  # links inside an archive followed (by name) to reach a member's data
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

_HOSTILE = (
    "the archive is malformed or hostile; write it again (`docker save`, "
    "`skopeo copy … oci-archive:FILE` or `skopeo copy … docker-archive:FILE`)"
)
Kind = Literal["oci", "docker", "auto"]


@dataclass(frozen=True)
class ArchiveRef:
    """An archive on this host: its format (``auto``: by its members), path and chosen tag."""

    kind: Kind
    path: Path
    tag: str | None


def _split_existing(text: str) -> tuple[Path, str | None] | None:
    """``FILE`` or ``FILE:TAG`` where FILE exists (the longest existing prefix before a ':')."""
    if Path(text).exists():
        return Path(text), None
    pos = len(text)
    while (pos := text.rfind(":", 0, pos)) > 0:
        if Path(text[:pos]).exists():
            return Path(text[:pos]), text[pos + 1 :]
    return None


def parse_archive_ref(image: str) -> ArchiveRef | None:
    """The archive ``image`` names, or None: ``oci-archive:``/``docker-archive:`` references always
    name one (ImageError when the file does not exist); an existing regular file (``FILE[:TAG]``) is
    one whose format is detected when opened."""
    for prefix, kind in ((OCI_ARCHIVE, "oci"), (DOCKER_ARCHIVE, "docker")):
        if image.startswith(prefix):
            rest = image[len(prefix) :]
            found = _split_existing(rest) if rest else None
            if found is None:
                raise ImageError(
                    f"image archive not found: {quote(rest)}; pass {prefix}FILE[:TAG] with the path of a "
                    "tar written by `docker save` or `skopeo copy`"
                )
            path, tag = found
            if tag == "":
                raise ImageError(f"image reference {quote(image)} has an empty tag; use {prefix}FILE[:TAG]")
            return ArchiveRef(kind, path, tag)  # type: ignore[arg-type]
    if Path(image).is_file():
        return ArchiveRef("auto", Path(image), None)
    head, sep, tag = image.rpartition(":")
    if sep and head and tag and "/" not in tag and Path(head).is_file():
        return ArchiveRef("auto", Path(head), tag)
    return None


# --- the outer tar ----------------------------------------------------------------------------------


def _clean(name: str, archive: Path) -> str:
    """A member name as a relative path without ``.`` parts; ImageError for ``..`` or absolute."""
    if name.startswith("/"):
        raise ImageError(f"archive {archive}: member {quote(name)} has an absolute name; {_HOSTILE}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"archive {archive}: member {quote(name)} climbs out with '..'; {_HOSTILE}")
    return "/".join(parts)


def _kind(info: tarfile.TarInfo) -> str:
    names = {
        tarfile.FIFOTYPE: "a FIFO",
        tarfile.CHRTYPE: "a character device",
        tarfile.BLKTYPE: "a block device",
        tarfile.CONTTYPE: "a contiguous file",
        tarfile.GNUTYPE_SPARSE: "a sparse file",
    }
    return names.get(info.type, f"of tar type {info.type!r}")


class _Archive:
    """The members of one open archive, checked; reads by name, following links inside it only."""

    def __init__(self, path: Path, tar: tarfile.TarFile, max_member_bytes: int) -> None:
        self.path = path
        self._tar = tar
        self.members: dict[str, tarfile.TarInfo] = {}
        self._scan(max_member_bytes)

    def _scan(self, max_member_bytes: int) -> None:
        where = f"archive {self.path}"
        try:
            for count, info in enumerate(self._tar, 1):
                if count > MAX_MEMBERS:
                    raise ImageError(f"{where} has more than {MAX_MEMBERS} members; {_HOSTILE}")
                name = _clean(info.name, self.path)
                member = f"{where}: member {quote(info.name)}"
                if name in self.members or (not name and not info.isdir()):
                    raise ImageError(f"{member} appears more than once; {_HOSTILE}")
                if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    if info.size > max_member_bytes:
                        raise ImageError(
                            f"{member} is {info.size} bytes, more than the image limit of "
                            f"{max_member_bytes}; {_HOSTILE}"
                        )
                elif info.issym() or info.islnk():
                    self._link_target(name, info)  # refused now if it points outside
                elif not info.isdir():
                    raise ImageError(f"{member} is {_kind(info)}; {_HOSTILE}")
                if name:
                    self.members[name] = info
        except tarfile.TarError as e:
            raise ImageError(f"{where} is not a readable tar archive ({e}); {_HOSTILE}") from None
        self._tar.members = []  # type: ignore[attr-defined]  # tarfile's copy of the headers: ours suffice

    def _link_target(self, name: str, info: tarfile.TarInfo) -> str:
        target = info.linkname
        member = f"archive {self.path}: member {quote(info.name)}"
        if target.startswith("/"):
            raise ImageError(f"{member} links to the absolute path {quote(target)}; {_HOSTILE}")
        parts = name.split("/")[:-1] if info.issym() else []  # a hardlink names a member from the root
        for part in target.split("/"):
            if part == "..":
                if not parts:
                    raise ImageError(f"{member} links outside the archive ({quote(target)}); {_HOSTILE}")
                parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        return "/".join(parts)

    def find(self, name: str) -> tarfile.TarInfo | None:
        """The regular member ``name`` names (through links inside the archive), None if absent."""
        key = name
        for _ in range(MAX_LINK_HOPS + 1):
            info = self.members.get(key)
            if info is None:
                return None
            if not (info.issym() or info.islnk()):
                if not info.isreg():
                    raise ImageError(
                        f"archive {self.path}: member {quote(name)} is a directory, not a file; {_HOSTILE}"
                    )
                return info
            key = self._link_target(key, info)
        raise ImageError(
            f"archive {self.path}: member {quote(name)} is a chain of more than {MAX_LINK_HOPS} links; "
            f"{_HOSTILE}"
        )

    def need(self, name: str, what: str) -> tarfile.TarInfo:
        info = self.find(name)
        if info is None:
            raise ImageError(
                f"archive {self.path} has no member {quote(name)} ({what}); the archive is incomplete, "
                "write it again"
            )
        return info

    def chunks(self, info: tarfile.TarInfo, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The bytes of the regular member ``info``, read by offset from the archive file."""
        f = self._tar.extractfile(info)
        assert f is not None  # find() returns regular members only
        with f:
            while True:
                try:
                    chunk = f.read(size)
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise ImageError(
                        f"archive {self.path}: member {quote(info.name)} cannot be read ({e}); the "
                        "archive is truncated or corrupt, write it again"
                    ) from None
                if not chunk:
                    return
                yield chunk

    def read(self, info: tarfile.TarInfo, limit: int, what: str) -> bytes:
        if info.size > limit:
            raise ImageError(
                f"archive {self.path}: member {quote(info.name)} ({what}) is {info.size} bytes, more than "
                f"the {limit // (1024 * 1024)} MiB limit; {_HOSTILE}"
            )
        data = b"".join(self.chunks(info))
        if len(data) != info.size:
            raise ImageError(
                f"archive {self.path}: member {quote(info.name)} is truncated ({len(data)} of {info.size} "
                "bytes); write the archive again"
            )
        return data


# --- importing blobs --------------------------------------------------------------------------------


class _Importer:
    """Moves verified blobs from an archive into the blob cache, within the image size limit."""

    def __init__(
        self,
        archive: _Archive,
        cache: BlobCache,
        max_image_bytes: int,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> None:
        self.archive = archive
        self.cache = cache
        self.max_image_bytes = max_image_bytes
        self.progress = progress
        self.cancel = cancel
        self.total = 0

    def _report(
        self, kind: Literal["config", "layer"], digest: str, done: int, total: int, **kw: bool
    ) -> None:
        if self.progress is not None:
            self.progress(PullProgress(str(self.archive.path), kind, digest, done, total, **kw))

    def _charge(self, size: int) -> None:
        self.total += size
        if self.total > self.max_image_bytes:
            raise ImageError(
                f"the image in archive {self.archive.path} is more than {self.max_image_bytes} bytes "
                "compressed (the image size limit); use a smaller image or raise the limit"
            )

    def json_blob(self, info: tarfile.TarInfo, digest: str | None, what: str) -> tuple[bytes, str]:
        """(bytes, digest) of a small member, verified against ``digest`` when the archive names one."""
        data = self.archive.read(info, MAX_JSON_BYTES, what)
        label = f"{what} (member {quote(info.name)} of archive {self.archive.path})"
        if digest is not None:
            verify_bytes(data, digest, what=label)
        else:
            digest = digest_bytes(data)
        self._charge(len(data))
        self.cache.put_bytes(digest, data)
        return data, digest

    def layer(self, info: tarfile.TarInfo, digest: str, what: str) -> Path:
        """The cached blob ``digest`` (``info.size`` bytes), imported from ``info`` unless cached."""
        size = info.size
        self._charge(size)
        cached = self.cache.lookup(digest, size)
        if cached is not None:
            self._report("layer", digest, size, size, cached=True, complete=True)
            return cached
        alg = parse_digest(digest, what=f"{what} digest").algorithm

        def fetch(out: BinaryIO) -> str:
            hasher = new_hasher(alg)
            done = 0
            for chunk in self.archive.chunks(info):
                if self.cancel is not None and self.cancel.is_set():
                    raise CanceledError(CANCELED_PULL)
                out.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                self._report("layer", digest, done, size)
            return f"{alg}:{hasher.hexdigest()}"

        label = f"{what} (member {quote(info.name)} of archive {self.archive.path})"
        path, was_cached = self.cache.ensure(digest, size, fetch, what=label, cancel=self.cancel)
        self._report("layer", digest, size, size, cached=was_cached, complete=True)
        return path


@dataclass(frozen=True)
class _ArchiveLayout:
    """An OCI layout inside an archive, as a :class:`~bencher_runner.oci.layout.LayoutSource`."""

    importer: _Importer

    @property
    def _archive(self) -> _Archive:
        return self.importer.archive

    @property
    def name(self) -> str:
        return f"archive {self._archive.path}"

    @property
    def tag_form(self) -> str:
        return f"{OCI_ARCHIVE}{self._archive.path}:TAG"

    @property
    def root(self) -> Path:
        return self.importer.cache.root

    def describe(self, name: str) -> str:
        return f"member {name} of archive {self._archive.path}"

    def read_file(self, name: str) -> bytes:
        info = self._archive.find(name)
        if info is None:
            raise ImageError(
                f"archive {self._archive.path} has no {name}: it is not an OCI archive (a Docker archive "
                f"has manifest.json: use {DOCKER_ARCHIVE}FILE); write it with "
                "`skopeo copy … oci-archive:FILE`"
            )
        return self._archive.read(info, MAX_JSON_BYTES, name)

    def _blob(self, desc: Descriptor, what: str) -> tarfile.TarInfo:
        parsed = parse_digest(desc.digest, what=f"{what} digest")  # validated before it names a member
        info = self._archive.need(f"blobs/{parsed.algorithm}/{parsed.hex}", f"{what} {desc.digest}")
        if info.size != desc.size:
            raise ImageError(
                f"{what} {desc.digest} in archive {self._archive.path}: size mismatch: the descriptor says "
                f"{desc.size} bytes, the member has {info.size}; the blob is corrupt or truncated, write "
                "the archive again"
            )
        return info

    def read_json_blob(self, desc: Descriptor, what: str) -> bytes:
        data, _ = self.importer.json_blob(self._blob(desc, what), desc.digest, f"{what} {desc.digest}")
        return data

    def layer(self, desc: Descriptor, what: str) -> Path:
        return self.importer.layer(self._blob(desc, what), desc.digest, f"{what} {desc.digest}")


# --- Docker archives --------------------------------------------------------------------------------


class _DockerEntry(OciModel):
    config: str = Field(alias="Config")
    repo_tags: list[str] | None = Field(default=None, alias="RepoTags")
    layers: list[str] = Field(alias="Layers")


class _DockerManifest(OciModel):
    entries: list[_DockerEntry]


class _RootFS(OciModel):
    diff_ids: list[str]


class _ConfigRootFS(OciModel):
    rootfs: _RootFS


def _matches(wanted: str, repo_tag: str) -> bool:
    """``hello``, ``hello:latest`` and ``docker.io/library/hello:latest`` all choose the last."""
    if ":" not in wanted.rpartition("/")[2]:
        wanted += ":latest"
    return repo_tag == wanted or ("/" not in wanted and repo_tag.rpartition("/")[2] == wanted)


def _select_entry(entries: list[_DockerEntry], tag: str | None, path: Path) -> _DockerEntry:
    tags = sorted({t for e in entries for t in e.repo_tags or []})
    available = ", ".join(quote(t, 100) for t in tags[:20]) or "(none)"
    if tag is not None:
        chosen = [e for e in entries if any(_matches(tag, t) for t in e.repo_tags or [])]
        if len(chosen) != 1:
            raise ImageError(
                f"tag {quote(tag)} {'not found' if not chosen else 'is ambiguous'} in archive {path}; "
                f"available: {available}"
            )
        return chosen[0]
    if len(entries) != 1:
        raise ImageError(
            f"archive {path} holds {len(entries)} images; choose one with {DOCKER_ARCHIVE}{path}:NAME:TAG "
            f"(available: {available})"
        )
    return entries[0]


def _layer_format(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


def _hash_member(archive: _Archive, info: tarfile.TarInfo, cancel: threading.Event | None) -> str:
    hasher = new_hasher("sha256")
    for chunk in archive.chunks(info):
        if cancel is not None and cancel.is_set():
            raise CanceledError(CANCELED_PULL)
        hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


def _parse_docker_manifest(data: bytes, path: Path) -> list[_DockerEntry]:
    what = f"member manifest.json of archive {path}"
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImageError(f"{what} is not valid JSON ({e}); {_HOSTILE}") from None
    if not isinstance(raw, list):
        raise ImageError(f"{what} is a JSON {type(raw).__name__}, not a list of images; {_HOSTILE}")
    return parse_model(_DockerManifest, json.dumps({"entries": raw}).encode(), what).entries


def _read_docker(importer: _Importer, tag: str | None, arch: str) -> LocalImage:
    archive = importer.archive
    path = archive.path
    info = archive.find("manifest.json")
    if info is None:
        raise ImageError(
            f"archive {path} has neither index.json nor manifest.json: it is no image archive; write it "
            "with `docker save` or `skopeo copy … oci-archive:FILE`"
        )
    entries = _parse_docker_manifest(archive.read(info, MAX_JSON_BYTES, "manifest.json"), path)
    entry = _select_entry(entries, tag, path)

    config_info = archive.need(_clean(entry.config, path), "the image config named by manifest.json")
    config_data, config_digest = importer.json_blob(config_info, None, "image config")
    config = parse_image_config(config_data)
    if config.os != "linux" or config.architecture != arch:
        raise ImageError(
            f"the image in archive {path} is for {quote(config.os, 40)}/{quote(config.architecture, 40)}, "
            f"not linux/{arch}; build or save the image for linux/{arch}"
        )
    diff_ids = parse_model(
        _ConfigRootFS, config_data, f"image config {config_digest} in archive {path}"
    ).rootfs
    if len(diff_ids.diff_ids) != len(entry.layers):
        raise ImageError(
            f"archive {path}: manifest.json names {len(entry.layers)} layers but the image config lists "
            f"{len(diff_ids.diff_ids)} diff_ids; {_HOSTILE}"
        )

    layers: list[LayerRef] = []
    for i, (name, diff_id) in enumerate(zip(entry.layers, diff_ids.diff_ids, strict=True)):
        what = f"layer {i + 1} of the image in archive {path}"
        parse_digest(diff_id, what=f"diff_id of {what}")
        layer_info = archive.need(_clean(name, path), what)
        fmt = _layer_format(next(archive.chunks(layer_info, 4), b""))
        # An uncompressed layer (what docker save and skopeo write) must hash to its diff_id, checked
        # as it is imported; a compressed one is named by the digest of its bytes.
        digest = diff_id if fmt == "none" else _hash_member(archive, layer_info, importer.cancel)
        media_type = OCI_LAYER if fmt == "none" else f"{OCI_LAYER}+{fmt}"
        layer_path = importer.layer(layer_info, digest, what)
        layers.append(LayerRef(digest=digest, media_type=media_type, size=layer_info.size, path=layer_path))

    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_data)},
        "layers": [{"mediaType": la.media_type, "digest": la.digest, "size": la.size} for la in layers],
    }
    manifest_data = json.dumps(manifest, separators=(",", ":")).encode()
    manifest_digest = digest_bytes(manifest_data)
    importer.cache.put_bytes(manifest_digest, manifest_data)
    return LocalImage(
        layout_dir=importer.cache.root,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        config=config,
        layers=tuple(layers),
    )


# --- entry point ------------------------------------------------------------------------------------


def _open_file(path: Path) -> BinaryIO:
    try:
        return open_regular(path.resolve())  # the user's path may be a symlink; its target may not
    except FileNotFoundError:
        raise ImageError(f"image archive {path} does not exist; check the path") from None
    except NotRegularFileError as e:
        raise ImageError(
            f"image archive {path} is not a regular file (a {e.kind}); pass a tar file written by "
            "`docker save` or `skopeo copy`"
        ) from None
    except OSError as e:
        raise ImageError(f"cannot open image archive {path}: {e.strerror}; check the path") from None


def open_archive(
    ref: ArchiveRef,
    *,
    cache_dir: Path,
    arch: str = HOST_ARCH,
    max_image_bytes: int,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> LocalImage:
    """Open the image in archive ``ref`` for linux/``arch``; its blobs end up verified in the blob
    cache at ``cache_dir`` (``LocalImage.layout_dir``), as after a pull."""
    with _open_file(ref.path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            tar = tarfile.open(fileobj=f, mode="r:*")  # noqa: SIM115 (closed below; nothing is extracted)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ImageError(
                f"image archive {ref.path} ({size} bytes) is not a tar archive ({e}); pass a tar file "
                "written by `docker save` or `skopeo copy`"
            ) from None
        with tar:
            archive = _Archive(ref.path, tar, max_image_bytes)
            importer = _Importer(archive, BlobCache(cache_dir), max_image_bytes, progress, cancel)
            kind = ref.kind
            if kind == "auto":
                members = archive.members
                kind = "oci" if "index.json" in members or "oci-layout" in members else "docker"
            if kind == "oci":
                return read_layout(_ArchiveLayout(importer), ref.tag, arch=arch)
            return _read_docker(importer, ref.tag, arch)
