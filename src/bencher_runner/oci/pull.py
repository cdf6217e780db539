"""Pull an image from a registry into the blob cache and hand it back as a verified ``LocalImage``.

The result has the same shape as :func:`open_layout`'s (layer paths are verified cache blobs), so
everything after "get the image" is one code path. Every manifest is checked against the digest that
names it (a tag's manifest against the registry's Docker-Content-Digest header when given), the
config and every layer are hashed while they stream, and limits are enforced from the manifest before
anything large is downloaded: layer count, and the compressed total against ``max_image_bytes``.
A pull by digest whose blobs are all cached needs no network at all.
"""

from __future__ import annotations

import contextvars
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Literal

from bencher_runner.oci.blobcache import BlobCache
from bencher_runner.oci.credentials import Credentials
from bencher_runner.oci.digest import digest_bytes, is_digest, parse_digest, verify_bytes
from bencher_runner.oci.imageconfig import parse_image_config
from bencher_runner.oci.layout import (
    CONFIG_TYPES,
    HOST_ARCH,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_INDEX_DEPTH,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageIndex,
    ImageManifest,
    LayerRef,
    LocalImage,
    parse_model,
    select_platform,
)
from bencher_runner.oci.progress import ProgressCallback, PullProgress
from bencher_runner.oci.reference import ImageReference
from bencher_runner.oci.registry import MAX_MANIFEST_BYTES, RegistryClient
from bencher_runner.oci.source import DEFAULT_MAX_IMAGE_BYTES
from bencher_runner.oci.untrusted import escape, read_regular
from bencher_runner.spec.errors import DigestMismatchError, ImageError

DEFAULT_MAX_LAYERS = 128
DEFAULT_PARALLEL_LAYERS = 3

_HOSTILE = "the image is malformed or hostile, rebuild it"


def _human(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class _Puller:
    def __init__(
        self,
        ref: ImageReference,
        cache: BlobCache,
        client: RegistryClient,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> None:
        self.ref = ref
        self.cache = cache
        self.client = client
        self.progress = progress
        self.cancel = cancel
        self.touched: set[str] = set()

    def _report(self, event: PullProgress) -> None:
        if self.progress is not None:
            self.progress(event)

    # --- manifests ------------------------------------------------------------------------------------

    def manifest(self, reference: str, desc: Descriptor | None) -> tuple[bytes, str, str]:
        """(body, media type, digest) of the manifest/index named by ``reference`` (tag or digest)."""
        limit = MAX_MANIFEST_BYTES
        if desc is not None and desc.size > limit:
            raise ImageError(
                f"manifest {desc.digest} of {self.ref} is {desc.size} bytes, more than the "
                f"{_human(limit)} limit; {_HOSTILE}"
            )
        header_type = ""
        data: bytes | None = None
        if is_digest(reference):
            cached = self.cache.lookup(reference)
            if cached is not None:
                data = _read_cached(cached, limit)
            if data is not None:
                verify_bytes(data, reference, what=f"cached manifest {reference}")
        if data is None:
            fetched = self.client.get_manifest(reference, max_bytes=limit)
            data, header_type = fetched.data, fetched.media_type
            if is_digest(reference):
                digest = reference
                verify_bytes(data, digest, what=f"manifest {reference} of {self.ref}")
            else:
                digest = digest_bytes(data)
                header = fetched.header_digest
                if header and header.startswith("sha256:") and header != digest:
                    raise DigestMismatchError(
                        f"manifest {self.ref.reference} of {self.ref}", escape(header, 80), digest
                    )
            self.cache.put_bytes(digest, data)
        else:
            digest = reference
        if desc is not None and len(data) != desc.size:
            raise ImageError(
                f"manifest {digest} of {self.ref}: size mismatch: the descriptor says {desc.size} bytes, "
                f"the registry sent {len(data)}; {_HOSTILE}"
            )
        self.touched.add(digest)
        self._report(PullProgress(str(self.ref), "manifest", digest, len(data), len(data), complete=True))
        return data, self._media_type(data, header_type, desc, digest), digest

    def _media_type(self, data: bytes, header_type: str, desc: Descriptor | None, digest: str) -> str:
        try:
            raw: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImageError(f"manifest {digest} of {self.ref} is not valid JSON ({e}); {_HOSTILE}") from None
        declared = raw.get("mediaType") if isinstance(raw, dict) else None
        known = INDEX_TYPES | MANIFEST_TYPES
        candidates = [t for t in (declared, header_type, desc.media_type if desc else None) if t]
        if not candidates and isinstance(raw, dict):
            candidates = [OCI_INDEX if "manifests" in raw else OCI_MANIFEST]
        media_type = candidates[0] if candidates else ""
        if media_type not in known:
            raise ImageError(
                f"manifest {digest} of {self.ref} has unsupported media type {media_type!r} (supported: "
                f"{', '.join(sorted(known))}); push the image as an OCI or Docker v2 image (e.g. with skopeo)"
            )
        if desc is not None and desc.media_type != media_type:
            raise ImageError(
                f"manifest {digest} of {self.ref} is {media_type!r} but its descriptor says "
                f"{desc.media_type!r}; {_HOSTILE}"
            )
        return media_type

    # --- blobs ----------------------------------------------------------------------------------------

    def blob(self, desc: Descriptor, kind: Literal["config", "layer"]) -> Path:
        what = "image config" if kind == "config" else "layer"
        image = str(self.ref)

        def fetch(out: BinaryIO) -> str:
            def on_progress(done: int) -> None:
                self._report(PullProgress(image, kind, desc.digest, done, desc.size))

            return self.client.download_blob(
                desc.digest, out, size=desc.size, what=f"{what} of {image}", on_progress=on_progress
            )

        path, cached = self.cache.ensure(
            desc.digest, desc.size, fetch, what=f"{what} of {image}", cancel=self.cancel
        )
        self.touched.add(desc.digest)
        self._report(
            PullProgress(image, kind, desc.digest, desc.size, desc.size, cached=cached, complete=True)
        )
        return path


def _read_cached(path: Path, limit: int) -> bytes | None:
    """A cached JSON blob of at most ``limit`` bytes; None when it is not a regular file of that size
    any more (never blocks: a FIFO planted in the cache is refused, not opened for a blocking read)."""
    try:
        data = read_regular(path, limit)
    except OSError:
        return None
    return data if len(data) <= limit else None


def _check_media_type(desc: Descriptor, allowed: frozenset[str], what: str, ref: ImageReference) -> None:
    if desc.media_type not in allowed:
        raise ImageError(
            f"{what} {desc.digest} of {ref} has unsupported media type {desc.media_type!r} (supported: "
            f"{', '.join(sorted(allowed))}); rebuild or convert the image (e.g. with skopeo)"
        )


def _resolve_manifest(puller: _Puller, ref: ImageReference, arch: str) -> tuple[ImageManifest, str]:
    """The image manifest of ``ref`` for linux/``arch`` (through at most MAX_INDEX_DEPTH indexes)."""
    data, media_type, digest = puller.manifest(ref.reference, None)
    depth = 0
    while media_type in INDEX_TYPES:
        depth += 1
        if depth > MAX_INDEX_DEPTH:
            raise ImageError(
                f"image index {digest} of {ref} nests more than {MAX_INDEX_DEPTH} indexes; {_HOSTILE}"
            )
        index = parse_model(ImageIndex, data, f"image index {digest} of {ref}")
        desc = select_platform(index.manifests, arch, f"image index {digest} of {ref}")
        parse_digest(desc.digest, what=f"manifest digest in image index {digest} of {ref}")
        data, media_type, digest = puller.manifest(desc.digest, desc)
    return parse_model(ImageManifest, data, f"manifest {digest} of {ref}"), digest


def _check_manifest(
    manifest: ImageManifest, digest: str, ref: ImageReference, max_layers: int, max_image_bytes: int
) -> None:
    """Media types, digests, layer count and sizes, before any blob is fetched."""
    _check_media_type(manifest.config, CONFIG_TYPES, "image config", ref)
    if len(manifest.layers) > max_layers:
        raise ImageError(
            f"manifest {digest} of {ref} has {len(manifest.layers)} layers, more than the limit of "
            f"{max_layers}; {_HOSTILE} (or squash it)"
        )
    for layer in manifest.layers:
        _check_media_type(layer, LAYER_TYPES, "layer", ref)
        parse_digest(layer.digest, what=f"layer digest in manifest {digest} of {ref}")
    if manifest.config.size > MAX_MANIFEST_BYTES:
        raise ImageError(
            f"image config {manifest.config.digest} of {ref} is {manifest.config.size} bytes, more than "
            f"the {_human(MAX_MANIFEST_BYTES)} limit; {_HOSTILE}"
        )
    total = manifest.config.size + sum(layer.size for layer in manifest.layers)
    if total > max_image_bytes:
        raise ImageError(
            f"image {ref} is {total} bytes compressed ({_human(total)}), more than the limit of "
            f"{_human(max_image_bytes)}; use a smaller image or raise the image size limit"
        )


def _fetch_config(puller: _Puller, manifest: ImageManifest, ref: ImageReference) -> bytes:
    config_path = puller.blob(manifest.config, "config")
    config_data = _read_cached(config_path, MAX_MANIFEST_BYTES)
    if config_data is None:
        raise ImageError(
            f"the cached image config {manifest.config.digest} of {ref} vanished or was replaced while "
            "the pull ran; retry the pull"
        )
    return config_data


def _fetch_layers(puller: _Puller, manifest: ImageManifest, parallel: int) -> list[Path]:
    """Every layer into the cache, ``parallel`` at a time; the first failure cancels the rest."""
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="oci-pull") as pool:
        # each in a copy of this context: log lines from the download threads keep the job's uuid
        futures = [
            pool.submit(contextvars.copy_context().run, puller.blob, layer, "layer")
            for layer in manifest.layers
        ]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def pull_image(
    ref: ImageReference,
    *,
    cache_dir: Path,
    credentials: Credentials | None = None,
    arch: str = HOST_ARCH,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_layers: int = DEFAULT_MAX_LAYERS,
    cache_max_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    parallel: int = DEFAULT_PARALLEL_LAYERS,
    retries: int = 4,
    backoff: float = 0.5,
    verify_tls: bool | str = True,
    cancel: threading.Event | None = None,
    warn: Callable[[str], None] | None = None,
) -> LocalImage:
    """Pull ``ref`` (choosing linux/``arch`` from an index) into the blob cache at ``cache_dir``.

    Returns a :class:`LocalImage` whose layer paths are verified cache blobs and whose ``layout_dir``
    is ``cache_dir``. ``cache_max_bytes``: after the pull, prune least recently used blobs (never
    this image's) until the cache is at most that size. ``cancel``: once set, the pull sends no further
    request and its waits (retry backoff, another process's download of a blob) end with
    :class:`CanceledError`. ``warn`` hears that a loopback registry is used over plain HTTP because
    it did not speak TLS.
    """
    cache = BlobCache(cache_dir)
    client = RegistryClient(
        ref, credentials, retries=retries, backoff=backoff, verify=verify_tls, cancel=cancel, warn=warn
    )
    with client, client.redacting():  # no error text carries a secret, whatever the registry echoed
        puller = _Puller(ref, cache, client, progress, cancel)
        manifest, digest = _resolve_manifest(puller, ref, arch)
        _check_manifest(manifest, digest, ref, max_layers, max_image_bytes)
        config = parse_image_config(_fetch_config(puller, manifest, ref))
        paths = _fetch_layers(puller, manifest, parallel)

    if cache_max_bytes is not None:
        cache.prune(cache_max_bytes, keep=puller.touched)
    return LocalImage(
        layout_dir=cache_dir,
        manifest_digest=digest,
        config_digest=manifest.config.digest,
        config=config,
        layers=tuple(
            LayerRef(digest=layer.digest, media_type=layer.media_type, size=layer.size, path=path)
            for layer, path in zip(manifest.layers, paths, strict=True)
        ),
    )
