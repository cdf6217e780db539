"""Read a local OCI image layout directory and verify every blob the chosen image uses.

The layout is the runner's only input format (``docker save``/``buildah push oci:``/``skopeo copy``
all write it). Nothing from it is trusted: JSON blobs are read with a size bound, every blob is hashed
against its digest and descriptor size before use, and digests are validated before they become blob
paths. Layers are verified here (streamed, never loaded) so unpacking only ever sees checked bytes.
Every file is opened without blocking or following a symlink and must be a regular file
(:mod:`bencher_runner.oci.untrusted`): a FIFO at ``index.json`` would otherwise hang the job forever.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bencher_runner.oci.digest import CHUNK_SIZE, parse_digest, verify_bytes, verify_stream
from bencher_runner.oci.imageconfig import ImageConfigBlob, parse_image_config
from bencher_runner.oci.untrusted import NotRegularFileError, escape, open_regular, read_regular
from bencher_runner.spec.errors import ImageError

OCI_LAYOUT_VERSION = "1.0.0"
MAX_JSON_BYTES = 4 * 1024 * 1024  # bound for index.json, index, manifest and config blobs
MAX_INDEX_DEPTH = 4  # index -> index -> ... -> manifest nesting the runner follows
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
)

_REBUILD = "the image is malformed, rebuild it"


def host_arch() -> str:
    """The host's architecture in OCI naming (``amd64``, ``arm64``, ...)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


HOST_ARCH = host_arch()


@dataclass(frozen=True)
class LayerRef:
    """One verified layer: ``path`` is the blob file whose bytes hashed to ``digest``."""

    digest: str
    media_type: str
    size: int
    path: Path


@dataclass(frozen=True)
class LocalImage:
    """The image chosen from a layout, with its manifest and config digests and verified layers."""

    layout_dir: Path
    manifest_digest: str
    config_digest: str
    config: ImageConfigBlob
    layers: tuple[LayerRef, ...]


# --- JSON shapes (only the fields the runner reads; the rest is ignored) ---------------------------
# Public: the registry puller (pull.py) and the archive reader (archive.py) parse the same documents.


class OciModel(BaseModel):
    """Base of the OCI JSON shapes: unknown fields ignored, immutable, fields by alias or by name."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class _Platform(OciModel):
    architecture: str
    os: str
    variant: str | None = None


class Descriptor(OciModel):
    """An OCI content descriptor: media type, digest, size (and a platform in an index)."""

    media_type: str = Field(alias="mediaType")
    digest: str
    size: int = Field(ge=0)
    annotations: dict[str, str] | None = None
    platform: _Platform | None = None

    @property
    def ref_name(self) -> str | None:
        return (self.annotations or {}).get(REF_NAME_ANNOTATION)


class ImageIndex(OciModel):
    """An OCI image index (or Docker manifest list): descriptors of manifests, one per platform."""

    schema_version: int = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    manifests: list[Descriptor]


class ImageManifest(OciModel):
    """An OCI image manifest (or Docker v2 schema 2): the config descriptor and the layers in order."""

    schema_version: int = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    config: Descriptor
    layers: list[Descriptor]


class _LayoutMarker(OciModel):
    image_layout_version: str = Field(alias="imageLayoutVersion")


_M = TypeVar("_M", bound=OciModel)


def parse_model(model: type[_M], data: bytes, what: str) -> _M:
    """``data`` (untrusted JSON) as ``model``; ImageError naming ``what`` and the first bad field."""
    try:
        raw: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImageError(f"{what} is not valid JSON ({e}); {_REBUILD}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = escape(".".join(str(p) for p in first["loc"]), 100) or "(top level)"  # loc holds keys
        raise ImageError(f"{what}: field {where}: {escape(first['msg'])}; {_REBUILD}") from None


# --- reference parsing ------------------------------------------------------------------------------


def parse_layout_ref(ref: str) -> tuple[Path, str | None]:
    """Split ``DIR`` or ``DIR:TAG`` into the layout directory and the tag (``None`` if none given).

    An existing path is taken whole (directories may contain ':'); otherwise the reference is split at
    its last ':' and the left part must exist.
    """
    if not ref:
        raise ImageError(
            "image layout not found: empty reference; pass an OCI image layout directory (DIR[:TAG])"
        )
    whole = Path(ref)
    if whole.exists():
        return whole, None
    head, sep, tag = ref.rpartition(":")
    if sep and head and Path(head).exists():
        if not tag:
            raise ImageError(f"image reference {ref!r} has an empty tag; use DIR or DIR:TAG")
        return Path(head), tag
    raise ImageError(
        f"image layout not found: {ref}; pass the path of an OCI image layout directory, optionally "
        "followed by :TAG (e.g. `skopeo copy docker://IMAGE oci:DIR:TAG` writes one)"
    )


# --- blob access ------------------------------------------------------------------------------------


def _blob_path(layout_dir: Path, digest: str, what: str) -> Path:
    parsed = parse_digest(digest, what=f"{what} digest")  # validated before it becomes a path
    return layout_dir / "blobs" / parsed.algorithm / parsed.hex


@contextmanager
def _open_regular(path: Path, what: str, digest: str) -> Iterator[tuple[BinaryIO, int]]:
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise ImageError(
            f"{what} {digest} is missing from the layout ({path} does not exist); the layout is "
            "incomplete, copy or build the image again"
        ) from None
    except NotRegularFileError as e:
        raise ImageError(
            f"{what} {digest}: {path} is not a regular file (a {e.kind}); a layout holds its blobs as "
            "plain files, copy or build the image again"
        ) from None
    except OSError as e:
        raise ImageError(f"{what} {digest}: cannot open {path}: {e.strerror}; check the layout") from None
    with f:
        yield f, os.fstat(f.fileno()).st_size


def _size_mismatch(what: str, digest: str, expected: int, actual: int) -> ImageError:
    return ImageError(
        f"{what} {digest}: size mismatch: the descriptor says {expected} bytes, the blob has {actual}; "
        "the blob is corrupt or truncated, copy or build the image again"
    )


def _read_json_blob(layout_dir: Path, desc: Descriptor, what: str) -> bytes:
    path = _blob_path(layout_dir, desc.digest, what)
    if desc.size > MAX_JSON_BYTES:
        raise ImageError(
            f"{what} {desc.digest} is {desc.size} bytes, more than the {MAX_JSON_BYTES // (1024 * 1024)} MiB "
            f"limit; {_REBUILD}"
        )
    with _open_regular(path, what, desc.digest) as (f, actual_size):
        if actual_size > MAX_JSON_BYTES:
            raise ImageError(
                f"{what} {desc.digest} is {actual_size} bytes, more than the "
                f"{MAX_JSON_BYTES // (1024 * 1024)} MiB limit; {_REBUILD}"
            )
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) != desc.size:
        raise _size_mismatch(what, desc.digest, desc.size, len(data))
    verify_bytes(data, desc.digest, what=f"{what} {desc.digest}")
    return data


def _verify_layer(layout_dir: Path, desc: Descriptor, what: str) -> Path:
    path = _blob_path(layout_dir, desc.digest, what)
    with _open_regular(path, what, desc.digest) as (f, actual_size):
        if actual_size != desc.size:
            raise _size_mismatch(what, desc.digest, desc.size, actual_size)
        read = verify_stream(f, desc.digest, what=f"{what} {desc.digest}", chunk_size=CHUNK_SIZE)
    if read != desc.size:
        raise _size_mismatch(what, desc.digest, desc.size, read)
    return path


def _read_bounded(path: Path, what: str) -> bytes:
    try:
        data = read_regular(path, MAX_JSON_BYTES)
    except FileNotFoundError:
        raise ImageError(
            f"{path} does not exist: {path.parent} is not an OCI image layout (no {what}); pass a "
            "directory written by `skopeo copy … oci:DIR`, `docker save` or `buildah push … oci:DIR`"
        ) from None
    except NotRegularFileError as e:
        raise ImageError(
            f"{path} is not a regular file (a {e.kind}); the {what} of a layout is a plain file, copy or "
            "build the image again"
        ) from None
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}; check the image layout") from None
    if len(data) > MAX_JSON_BYTES:
        raise ImageError(f"{path} is larger than {MAX_JSON_BYTES // (1024 * 1024)} MiB; {_REBUILD}")
    return data


# --- selection ---------------------------------------------------------------------------------------


def _tags(descs: list[Descriptor]) -> str:
    names = sorted({escape(d.ref_name, 100) for d in descs if d.ref_name})
    if len(names) > 20:
        names = [*names[:20], f"and {len(names) - 20} more"]
    return ", ".join(names) if names else "(none)"


def _platform_name(desc: Descriptor) -> str:
    p = desc.platform
    if p is None:
        return "(unspecified)"
    return escape(f"{p.os}/{p.architecture}" + (f"/{p.variant}" if p.variant else ""), 100)


def _select_tagged(index: ImageIndex, tag: str | None, source: LayoutSource, arch: str) -> Descriptor:
    entries = index.manifests
    where = source.name
    if tag is not None:
        chosen = [d for d in entries if d.ref_name == tag]
        if not chosen:
            raise ImageError(f"tag {tag!r} not found in {where}; available tags: {_tags(entries)}")
        return chosen[0]
    if not entries:
        raise ImageError(f"{where} holds no image (index.json lists no manifests)")
    if len(entries) == 1:
        return entries[0]
    # Several untagged per-platform manifests directly in index.json: choose like an image index.
    if all(d.ref_name is None and d.platform is not None for d in entries):
        return select_platform(entries, arch, where)
    raise ImageError(
        f"{where} holds {len(entries)} images; choose one with {source.tag_form} "
        f"(available tags: {_tags(entries)})"
    )


def select_platform(entries: list[Descriptor], arch: str, what: str) -> Descriptor:
    """The linux/``arch`` entry of an index; ImageError listing the platforms there are otherwise."""
    for d in entries:
        p = d.platform
        if p is not None and p.os == "linux" and p.architecture == arch:
            return d
    names = [_platform_name(d) for d in entries[:20]] + (
        [f"and {len(entries) - 20} more"] if len(entries) > 20 else []
    )
    available = ", ".join(names) or "(none)"
    raise ImageError(
        f"{what} has no image for linux/{arch}; available platforms: {available}; "
        f"build or pull the image for linux/{arch}"
    )


def _check_media_type(desc: Descriptor, allowed: frozenset[str], what: str) -> None:
    if desc.media_type not in allowed:
        raise ImageError(
            f"{what} {desc.digest} has unsupported media type {desc.media_type!r} "
            f"(supported: {', '.join(sorted(allowed))}); rebuild or convert the image (e.g. with skopeo)"
        )


class LayoutSource(Protocol):
    """Where the files of an OCI layout come from: a directory (:class:`DirectorySource`) or the
    members of a tar archive (:mod:`bencher_runner.oci.archive`). Every method verifies what it
    returns; :func:`read_layout` does the choosing, the same for both."""

    @property
    def name(self) -> str:
        """How errors name it: ``image layout DIR``, ``archive FILE``."""
        ...

    @property
    def tag_form(self) -> str:
        """How a user chooses a tag in it: ``DIR:TAG``."""
        ...

    @property
    def root(self) -> Path:
        """The directory the verified blobs live under (``LocalImage.layout_dir``)."""
        ...

    def describe(self, name: str) -> str:
        """How errors name the file ``name`` (``oci-layout``, ``index.json``) of the layout."""
        ...

    def read_file(self, name: str) -> bytes:
        """``oci-layout`` or ``index.json``, bounded by :data:`MAX_JSON_BYTES`."""
        ...

    def read_json_blob(self, desc: Descriptor, what: str) -> bytes:
        """A manifest, index or config blob, bounded and checked against size and digest."""
        ...

    def layer(self, desc: Descriptor, what: str) -> Path:
        """The path of the layer blob after its size and digest were checked."""
        ...


@dataclass(frozen=True)
class DirectorySource:
    """An OCI layout directory; its blob files are read (never followed, never blocked on) in place."""

    root: Path

    @property
    def name(self) -> str:
        return f"image layout {self.root}"

    @property
    def tag_form(self) -> str:
        return "DIR:TAG"

    def describe(self, name: str) -> str:
        return "oci-layout file" if name == "oci-layout" else f"{self.root}/{name}"

    def read_file(self, name: str) -> bytes:
        what = "oci-layout file" if name == "oci-layout" else name
        return _read_bounded(self.root / name, what)

    def read_json_blob(self, desc: Descriptor, what: str) -> bytes:
        return _read_json_blob(self.root, desc, what)

    def layer(self, desc: Descriptor, what: str) -> Path:
        return _verify_layer(self.root, desc, what)


def _check_layout_marker(source: LayoutSource) -> None:
    marker = parse_model(_LayoutMarker, source.read_file("oci-layout"), source.describe("oci-layout"))
    if marker.image_layout_version != OCI_LAYOUT_VERSION:
        raise ImageError(
            f"{source.name} has imageLayoutVersion {marker.image_layout_version!r}, "
            f"only {OCI_LAYOUT_VERSION!r} is supported; write the layout again with a current tool"
        )


def open_layout(ref: str, *, arch: str = HOST_ARCH) -> LocalImage:
    """Open ``DIR`` or ``DIR:TAG``, choose the image for linux/``arch``, verify every blob it uses."""
    layout_dir, tag = parse_layout_ref(ref)
    if not layout_dir.is_dir():
        raise ImageError(f"image layout {layout_dir} is not a directory; pass an OCI image layout directory")
    return read_layout(DirectorySource(layout_dir), tag, arch=arch)


def read_layout(source: LayoutSource, tag: str | None, *, arch: str = HOST_ARCH) -> LocalImage:
    """Choose the image tagged ``tag`` (or the only one) for linux/``arch`` from ``source``'s
    index.json, following nested indexes, and verify its manifest, config and every layer."""
    _check_layout_marker(source)
    top = parse_model(ImageIndex, source.read_file("index.json"), source.describe("index.json"))
    desc = _select_tagged(top, tag, source, arch)

    depth = 0
    while desc.media_type in INDEX_TYPES:
        depth += 1
        if depth > MAX_INDEX_DEPTH:
            raise ImageError(
                f"image index {desc.digest} nests more than {MAX_INDEX_DEPTH} indexes; {_REBUILD}"
            )
        what = "image index"
        child = parse_model(ImageIndex, source.read_json_blob(desc, what), f"{what} {desc.digest}")
        if child.media_type is not None and child.media_type != desc.media_type:
            raise ImageError(
                f"{what} {desc.digest} declares media type {child.media_type!r} but its descriptor says "
                f"{desc.media_type!r}; {_REBUILD}"
            )
        desc = select_platform(child.manifests, arch, f"{what} {desc.digest}")

    _check_media_type(desc, MANIFEST_TYPES, "manifest")
    manifest = parse_model(ImageManifest, source.read_json_blob(desc, "manifest"), f"manifest {desc.digest}")
    if manifest.media_type is not None and manifest.media_type != desc.media_type:
        raise ImageError(
            f"manifest {desc.digest} declares media type {manifest.media_type!r} but its descriptor says "
            f"{desc.media_type!r}; {_REBUILD}"
        )

    _check_media_type(manifest.config, CONFIG_TYPES, "image config")
    for layer in manifest.layers:
        _check_media_type(layer, LAYER_TYPES, "layer")
    config = parse_image_config(source.read_json_blob(manifest.config, "image config"))
    layers = tuple(
        LayerRef(
            digest=layer.digest,
            media_type=layer.media_type,
            size=layer.size,
            path=source.layer(layer, "layer"),
        )
        for layer in manifest.layers
    )
    return LocalImage(
        layout_dir=source.root,
        manifest_digest=desc.digest,
        config_digest=manifest.config.digest,
        config=config,
        layers=layers,
    )
