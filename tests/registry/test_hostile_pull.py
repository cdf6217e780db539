"""Hostile images over the registry path: every bad answer is an ImageError naming the value, and
nothing unverified is left in the cache. Most cases use a scriptable fake registry (exact bytes and
headers); truncation on disk uses the real docker-registry."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.oci.blobcache import BlobCache
from bencher_runner.oci.pull import pull_image
from bencher_runner.oci.reference import parse_reference
from bencher_runner.oci.unpack import unpack_layers
from bencher_runner.spec.errors import DigestMismatchError, ImageError
from tests.registry.conftest import FakeRegistry
from tests.support.bounded import call_bounded
from tests.support.oci_builder import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Entry,
    RawLayer,
    blob_path,
    build_layout,
    file,
    manifest_of,
    sha256,
)
from tests.support.registry import Registry, skopeo_push

CONFIG = {"Cmd": ["/bin/true"]}


def serve_layout(fake: FakeRegistry, tmp_path: Path, layers: Any = None, **kw: Any) -> str:
    layout = tmp_path / "img"
    build_layout(layout, layers or [[file("a", "x")]], CONFIG, tag="v1", arch="amd64", **kw)
    return fake.load_layout(layout, "hostile", "v1")


def pull(fake: FakeRegistry, tmp_path: Path, ref: str = "v1", **kw: Any) -> Any:
    sep = "@" if ref.startswith("sha256:") else ":"
    return pull_image(
        parse_reference(f"{fake.host}/hostile{sep}{ref}", insecure=True),
        cache_dir=tmp_path / "cache",
        retries=1,
        backoff=0.01,
        **kw,
    )


def cached_blobs(tmp_path: Path) -> list[str]:
    return [e.digest for e in BlobCache(tmp_path / "cache").entries()]


def blob_requests(fake: FakeRegistry) -> list[str]:
    return [p for p in fake.log if "/blobs/" in p]


def manifest_json(layers: list[dict[str, Any]], config: dict[str, Any] | None = None) -> bytes:
    cfg = config or {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": sha256(b"{}"),
        "size": 2,
    }
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": layers}
    return json.dumps(doc).encode()


def test_fake_registry_serves_a_good_image(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    digest = serve_layout(fake_registry, tmp_path)
    assert pull(fake_registry, tmp_path).manifest_digest == digest


@pytest.mark.parametrize("declared", [True, False])
def test_manifest_over_4_mib(fake_registry: FakeRegistry, tmp_path: Path, declared: bool) -> None:
    body = manifest_json([], None)[:-1] + b', "annotations": {"pad": "' + b"x" * (4 * 2**20) + b'"}}'
    if declared:
        fake_registry.manifest("hostile", "v1", body, OCI_MANIFEST)
    else:  # no Content-Length: the limit must hold while streaming
        fake_registry.manifest("hostile", "v1", body, OCI_MANIFEST, Connection="close")
    with pytest.raises(ImageError, match=r"manifest v1 from registry .* more than the 4194304 byte limit"):
        pull(fake_registry, tmp_path)
    assert blob_requests(fake_registry) == []


def test_manifest_descriptor_over_limit_in_index(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    big = sha256(b"big")
    child = {
        "mediaType": OCI_MANIFEST,
        "digest": big,
        "size": 5 * 2**20,
        "platform": {"os": "linux", "architecture": "amd64"},
    }
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]}).encode()
    fake_registry.manifest("hostile", "v1", index, OCI_INDEX)
    with pytest.raises(ImageError, match=r"is 5242880 bytes, more than the 4\.0 MiB limit"):
        pull(fake_registry, tmp_path)
    assert not any(big in p for p in fake_registry.log)


def test_config_over_limit(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    cfg = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(b"c"), "size": 5 * 2**20}
    fake_registry.manifest("hostile", "v1", manifest_json([], cfg), OCI_MANIFEST)
    with pytest.raises(
        ImageError, match=r"image config sha256:\w+ of .* is 5242880 bytes, more than the 4\.0 MiB"
    ):
        pull(fake_registry, tmp_path)
    assert blob_requests(fake_registry) == []


@pytest.mark.parametrize(
    "media_type",
    ["application/vnd.docker.distribution.manifest.v1+prettyjws", "text/html", "application/json"],
)
def test_wrong_manifest_media_type(fake_registry: FakeRegistry, tmp_path: Path, media_type: str) -> None:
    body = json.dumps({"schemaVersion": 1, "name": "hostile", "fsLayers": []}).encode()
    fake_registry.manifest("hostile", "v1", body, media_type)
    with pytest.raises(ImageError, match=re.escape(f"unsupported media type '{media_type}'")):
        pull(fake_registry, tmp_path)


def test_manifest_declaring_a_different_type_than_its_descriptor(
    fake_registry: FakeRegistry, tmp_path: Path
) -> None:
    digest = serve_layout(fake_registry, tmp_path, platforms=[("linux", "amd64")])
    index = json.loads(fake_registry.routes["/v2/hostile/manifests/v1"][2])  # type: ignore[index]
    child = index["manifests"][0]
    child["mediaType"] = DOCKER_MANIFEST
    body = json.dumps(index).encode()
    fake_registry.manifest("hostile", "v1", body, OCI_INDEX)
    with pytest.raises(
        ImageError, match=r"is 'application/vnd.oci.image.manifest.v1\+json' but its descriptor says"
    ):
        pull(fake_registry, tmp_path)
    assert digest != child["digest"]


def test_foreign_layer_media_type(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    layer = RawLayer(b"junk", media_type="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
    serve_layout(fake_registry, tmp_path, layers=[layer])
    with pytest.raises(ImageError, match=r"layer sha256:\w+ of .* has unsupported media type .*foreign"):
        pull(fake_registry, tmp_path)
    assert blob_requests(fake_registry) == []


def test_manifest_digest_mismatch_by_digest(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    digest = serve_layout(fake_registry, tmp_path)
    route = fake_registry.routes[f"/v2/hostile/manifests/{digest}"]
    status, headers, body = route  # type: ignore[misc]
    tampered = body.replace(b'"layers"', b'"layers" ')
    fake_registry.routes[f"/v2/hostile/manifests/{digest}"] = (status, headers, tampered)
    with pytest.raises(DigestMismatchError, match=rf"expected {digest}, got {sha256(tampered)}"):
        pull(fake_registry, tmp_path, digest)
    assert cached_blobs(tmp_path) == []


def test_tag_manifest_contradicting_its_content_digest_header(
    fake_registry: FakeRegistry, tmp_path: Path
) -> None:
    serve_layout(fake_registry, tmp_path)
    status, headers, body = fake_registry.routes["/v2/hostile/manifests/v1"]  # type: ignore[misc]
    fake_registry.routes["/v2/hostile/manifests/v1"] = (
        status,
        {**headers, "Docker-Content-Digest": sha256(b"something else")},
        body,
    )
    with pytest.raises(
        DigestMismatchError, match=rf"expected {sha256(b'something else')}, got {sha256(body)}"
    ):
        pull(fake_registry, tmp_path)


def test_layer_digest_mismatch_leaves_nothing_in_cache(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    serve_layout(fake_registry, tmp_path)
    _, manifest = manifest_of(tmp_path / "img", "v1")
    layer = manifest["layers"][0]
    path = f"/v2/hostile/blobs/{layer['digest']}"
    status, headers, body = fake_registry.routes[path]  # type: ignore[misc]
    evil = bytes([body[0] ^ 1]) + body[1:]
    fake_registry.routes[path] = (status, headers, evil)
    with pytest.raises(DigestMismatchError) as err:
        pull(fake_registry, tmp_path)
    assert (err.value.expected, err.value.actual) == (layer["digest"], sha256(evil))
    assert layer["digest"] not in cached_blobs(tmp_path)
    assert not list((tmp_path / "cache" / "blobs" / "sha256").glob(".tmp-*"))


def test_blob_larger_than_descriptor(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    serve_layout(fake_registry, tmp_path)
    _, manifest = manifest_of(tmp_path / "img", "v1")
    layer = manifest["layers"][0]
    path = f"/v2/hostile/blobs/{layer['digest']}"
    status, headers, body = fake_registry.routes[path]  # type: ignore[misc]
    fake_registry.routes[path] = (status, headers, body + b"\0" * 10_000_000)
    with pytest.raises(ImageError, match=rf"{layer['digest']} is larger than the {layer['size']} bytes"):
        pull(fake_registry, tmp_path)
    assert layer["digest"] not in cached_blobs(tmp_path)


def test_truncated_blob_from_fake(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    serve_layout(fake_registry, tmp_path)
    _, manifest = manifest_of(tmp_path / "img", "v1")
    layer = manifest["layers"][0]
    path = f"/v2/hostile/blobs/{layer['digest']}"
    status, headers, body = fake_registry.routes[path]  # type: ignore[misc]
    fake_registry.routes[path] = (status, headers, body[:-5])
    with pytest.raises(
        ImageError, match=rf"{layer['digest']} is truncated: .* sent {layer['size'] - 5} of the"
    ):
        pull(fake_registry, tmp_path)
    assert layer["digest"] not in cached_blobs(tmp_path)


def test_truncated_blob_on_real_registry_disk(registry: Registry, tmp_path: Path) -> None:
    layout = tmp_path / "trunc"
    build_layout(layout, [[file("t", "truncated on disk " * 100)]], CONFIG, tag="v1", arch="amd64")
    skopeo_push(layout, registry, "trunc", "v1")
    _, manifest = manifest_of(layout, "v1")
    layer = manifest["layers"][0]
    data = registry.blob_data(layer["digest"])
    data.write_bytes(data.read_bytes()[:-7])
    with pytest.raises(ImageError, match=r"truncated|digest mismatch|size mismatch") as err:
        pull_image(
            parse_reference(f"{registry.host}/trunc:v1", insecure=True),
            cache_dir=tmp_path / "cache",
            retries=1,
            backoff=0.01,
        )
    assert layer["digest"] in str(err.value)
    assert layer["digest"] not in cached_blobs(tmp_path)


def test_layer_count_over_limit(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    layers = [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha256(str(i).encode()),
            "size": 1,
        }
        for i in range(129)
    ]
    fake_registry.manifest("hostile", "v1", manifest_json(layers), OCI_MANIFEST)
    with pytest.raises(ImageError, match=r"has 129 layers, more than the limit of 128"):
        pull(fake_registry, tmp_path)
    assert blob_requests(fake_registry) == []


def test_compressed_total_over_image_limit(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    layers = [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha256(b"1"),
            "size": 3 * 2**30,
        },
    ]
    fake_registry.manifest("hostile", "v1", manifest_json(layers), OCI_MANIFEST)
    with pytest.raises(ImageError, match=r"compressed \(3\.0 GiB\), more than the limit of 2\.0 GiB"):
        pull(fake_registry, tmp_path, max_image_bytes=2 * 2**30)
    assert blob_requests(fake_registry) == []


def test_decompression_bomb_is_bounded_by_unpack(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    bomb = [Entry("zeros", zeros=64 * 2**20)]  # 64 MiB of zeros, ~64 KiB gzipped
    serve_layout(fake_registry, tmp_path, layers=[bomb])
    image = pull(fake_registry, tmp_path, max_image_bytes=1 * 2**20)  # compressed it is small: pulls
    assert image.layers[0].size < 2**20
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ImageError, match="decompression bomb"):
        unpack_layers(image.layers, root, max_bytes=8 * 2**20)


@pytest.mark.parametrize("bad", ["sha256:../../../etc/passwd", "md5:abc", "sha256:" + "A" * 64])
def test_hostile_layer_digest_never_becomes_a_path(
    fake_registry: FakeRegistry, tmp_path: Path, bad: str
) -> None:
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": bad, "size": 1}]
    fake_registry.manifest("hostile", "v1", manifest_json(layers), OCI_MANIFEST)
    with pytest.raises(ImageError, match="is not a valid digest"):
        pull(fake_registry, tmp_path)
    assert blob_requests(fake_registry) == []


def test_index_without_host_platform_and_too_deep(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    serve_layout(fake_registry, tmp_path, platforms=[("linux", "s390x"), ("windows", "amd64")])
    with pytest.raises(
        ImageError, match=r"no image for linux/amd64; available platforms: linux/s390x, windows/amd64"
    ):
        pull(fake_registry, tmp_path, arch="amd64")

    # an index that points at itself (by a digest the fake serves) nests forever
    entries = []
    body = b""
    for _ in range(6):
        child = {
            "mediaType": OCI_INDEX,
            "digest": sha256(body) if body else sha256(b"leaf"),
            "size": len(body) if body else 4,
            "platform": {"os": "linux", "architecture": "amd64"},
        }
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]}).encode()
        entries.append(body)
    for b in entries:
        fake_registry.manifest("hostile", sha256(b), b, OCI_INDEX)
    fake_registry.manifest("hostile", "deep", entries[-1], OCI_INDEX)
    with pytest.raises(ImageError, match=r"nests more than 4 indexes"):
        pull(fake_registry, tmp_path, "deep")


def test_not_found_and_server_errors(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    with pytest.raises(
        ImageError, match=r"has no manifest v1 in repository hostile \(HTTP 404: NOT_FOUND unknown\)"
    ):
        pull(fake_registry, tmp_path)
    fake_registry.routes["/v2/hostile/manifests/v1"] = (500, {}, b"<html>oops</html>")
    with pytest.raises(ImageError, match=r"failed to serve manifest v1 .*HTTP 500: <html>oops</html>"):
        pull(fake_registry, tmp_path)
    fake_registry.routes["/v2/hostile/manifests/v1"] = (401, {}, b"")
    with pytest.raises(ImageError, match=r"requires authentication to pull repository hostile \(HTTP 401\)"):
        pull(fake_registry, tmp_path)


# --- special files in the blob cache (a FIFO blocks a plain open forever) ----------------------------


@pytest.mark.parametrize("which", ["manifest", "config", "layer"])
@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_special_file_in_the_cache_does_not_block_the_pull(
    fake_registry: FakeRegistry, tmp_path: Path, which: str, kind: str
) -> None:
    digest = serve_layout(fake_registry, tmp_path)
    _, manifest = manifest_of(tmp_path / "img", "v1")
    blob = {
        "manifest": digest,
        "config": manifest["config"]["digest"],
        "layer": manifest["layers"][0]["digest"],
    }
    planted = BlobCache(tmp_path / "cache").path(blob[which])
    planted.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(planted)
    else:  # the right bytes, but behind a link: never followed, fetched again
        (tmp_path / "outside").write_bytes(blob_path(tmp_path / "img", blob[which]).read_bytes())
        os.symlink(tmp_path / "outside", planted)
    image = call_bounded(lambda: pull(fake_registry, tmp_path, digest), fifos=[planted])
    assert image.manifest_digest == digest
    assert stat.S_ISREG(os.lstat(planted).st_mode)
    assert f"/v2/hostile/{'manifests' if which == 'manifest' else 'blobs'}/{blob[which]}" in fake_registry.log
