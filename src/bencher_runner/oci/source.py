"""One entry point for "get me this image": a local OCI layout or archive, or a registry pull.

``job.py`` calls :func:`open_image` with whatever the user or the job named, and says whether a local
image is allowed at all (``JobRequest.allow_local_image``): for ``runner run``, ``oci-archive:FILE`` /
``docker-archive:FILE`` and an existing regular file (``FILE[:TAG]``) are archives
(:mod:`~bencher_runner.oci.archive`), an existing directory (or ``DIR:TAG`` whose DIR exists) is a
local layout, so a directory that happens to look like a reference still works; anything else must
parse as a registry reference and is pulled into the blob cache. A server's job never names a host
path: its image is a registry reference, and the filesystem is not even looked at for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from bencher_runner.oci.archive import PREFIXES as ARCHIVE_PREFIXES
from bencher_runner.oci.archive import open_archive, parse_archive_ref
from bencher_runner.oci.credentials import Credentials
from bencher_runner.oci.layout import HOST_ARCH, LocalImage, open_layout
from bencher_runner.oci.progress import ProgressCallback
from bencher_runner.oci.reference import ImageReference, may_fall_back_to_http, parse_reference
from bencher_runner.oci.untrusted import quote
from bencher_runner.spec.config import JobRequest
from bencher_runner.spec.errors import ImageError

DEFAULT_MAX_IMAGE_BYTES = 16 * 2**30  # compressed: config + layers as the manifest declares them


def is_local_layout(image: str) -> bool:
    """Whether ``image`` names a local path: it exists, or it is ``DIR:TAG`` with DIR existing."""
    if not image:
        return False
    if Path(image).exists():
        return True
    head, sep, _ = image.rpartition(":")
    return bool(sep and head and "/" not in image[len(head) :] and Path(head).exists())


def is_loopback(registry: str) -> bool:
    """Whether ``host[:port]`` names this machine: ``localhost``, 127.0.0.0/8 or ``[::1]``, literally
    (the same strict test as the HTTPS -> HTTP fallback's)."""
    return may_fall_back_to_http(registry)


def plain_http_warning(ref: ImageReference) -> str | None:
    """The warning for a pull over plain HTTP from another host (None for HTTPS or loopback).

    Like Docker's ``insecure-registries``, plain HTTP stays the user's (or the server's) explicit
    choice and is not refused, but it is said once per pull, naming the host.
    """
    if not ref.insecure or is_loopback(ref.registry):
        return None
    return (
        f"pulling from {ref.registry} over plain HTTP: the registry token and the image travel "
        "unencrypted, and a pull by tag can be tampered with on the way; use HTTPS unless the network "
        "is trusted"
    )


def credentials_for(config: JobRequest) -> Credentials:
    """The registry credentials a job request carries (token and/or username/password)."""
    return Credentials(
        token=config.token.get_secret_value() if config.token else None,
        username=config.registry_username,
        password=config.registry_password.get_secret_value() if config.registry_password else None,
    )


def open_image(
    image: str,
    *,
    cache_dir: Path,
    credentials: Credentials | None = None,
    insecure: bool = False,
    allow_local: bool = True,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    warn: Callable[[str], None] | None = None,
    arch: str = HOST_ARCH,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    cache_max_bytes: int | None = None,
) -> LocalImage:
    """Open a local archive (``oci-archive:FILE[:TAG]``, ``docker-archive:FILE[:NAME:TAG]``,
    ``FILE[:TAG]``) or layout (``DIR[:TAG]``), or pull ``[http://]host[:port]/repo[:tag][@digest]``.

    ``cache_dir`` is the blob cache root (see :func:`~bencher_runner.oci.blobcache.image_cache_dir`);
    ``insecure`` pulls over plain HTTP. ``allow_local=False`` (a server's job): ``image`` must be a
    registry reference, whatever exists on this host under that name. ``cancel``: the pull ends with
    CanceledError soon after it is set, wherever it waits. ``warn`` hears about plain HTTP to another
    host, and about a loopback registry used over plain HTTP because it did not speak TLS.
    """
    if allow_local:
        archive = parse_archive_ref(image)
        if archive is not None:
            return open_archive(
                archive,
                cache_dir=cache_dir,
                arch=arch,
                max_image_bytes=max_image_bytes,
                progress=progress,
                cancel=cancel,
            )
        if is_local_layout(image):
            return open_layout(image, arch=arch)
    elif image.startswith(ARCHIVE_PREFIXES):
        raise ImageError(
            f"image {quote(image, 100)} names an archive on this host; a job's image comes from a "
            "registry only, never a local file"
        )
    ref = parse_reference(image, insecure=insecure, layouts=allow_local)
    warning = plain_http_warning(ref)
    if warning is not None and warn is not None:
        warn(warning)
    from bencher_runner.oci.pull import pull_image  # the HTTP stack, only for registry images

    return pull_image(
        ref,
        cache_dir=cache_dir,
        credentials=credentials,
        arch=arch,
        max_image_bytes=max_image_bytes,
        cache_max_bytes=cache_max_bytes,
        progress=progress,
        cancel=cancel,
        warn=warn,
    )
