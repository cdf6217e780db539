"""Pulls against a real docker-registry (2.8): tags, digests, indexes, Docker types, zstd, token auth,
corruption on the registry's disk, dropped connections and transient statuses."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from bencher_runner.oci.blobcache import BlobCache
from bencher_runner.oci.credentials import Credentials
from bencher_runner.oci.progress import PullProgress
from bencher_runner.oci.pull import pull_image
from bencher_runner.oci.reference import ImageReference, parse_reference
from bencher_runner.oci.source import open_image
from bencher_runner.oci.unpack import unpack_layers
from bencher_runner.spec.errors import DigestMismatchError, ImageError
from bencher_runner.spec.registry import parse_registry_url
from tests.registry.conftest import (
    JOB_TOKEN,
    PASSWORD,
    USERNAME,
    Faults,
    TokenServer,
)
from tests.support.oci_builder import build_layout, file, manifest_of, read_index
from tests.support.registry import Registry, http_push, skopeo_push

CONFIG = {"Entrypoint": ["/bin/bench"], "Cmd": ["--fast"], "Env": ["A=1"]}


def _job_reference(registry_url: str, repository: str, digest: str) -> ImageReference:
    """What a job's ``config.registry`` + repository + digest become on the daemon's path
    (spec.jobspec.image_reference's parts, without its project-UUID check)."""
    host, insecure = parse_registry_url(registry_url)
    return parse_reference(f"{host}/{repository}@{digest}", insecure=insecure)


def make_layout(tmp_path: Path, name: str, **kw: object) -> Path:
    """A small image whose content is unique to ``name`` (so its blobs are shared with no other test)."""
    layout = tmp_path / name
    layers = [[file("etc/name", name)], [file("bin/bench", f"#!/bin/sh\necho {name}\n", mode=0o755)]]
    build_layout(layout, layers, CONFIG, tag="v1", arch="amd64", **kw)  # type: ignore[arg-type]
    return layout


@pytest.fixture(scope="module")
def pushed(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """repo -> pushed top digest, for the images most tests share."""
    tmp = tmp_path_factory.mktemp("layouts")
    out: dict[str, str] = {}
    out["plain"] = build_and_push(tmp, registry, "plain")
    out["zstd"] = build_and_push(tmp, registry, "zstd", compression="zstd")
    out["multi"] = build_and_push(tmp, registry, "multi", platforms=[("linux", "amd64"), ("linux", "arm64")])
    layout = make_layout(tmp, "dockerv2s2")
    skopeo_push(layout, registry, "dockerv2s2", "v1", fmt="v2s2")
    layout = make_layout(
        tmp, "dockerlist", docker_media_types=True, platforms=[("linux", "arm64"), ("linux", "amd64")]
    )
    out["dockerlist"] = http_push(layout, registry, "dockerlist", "v1")
    return out


def build_and_push(tmp: Path, registry: Registry, repo: str, **kw: object) -> str:
    layout = make_layout(tmp, repo, **kw)
    skopeo_push(layout, registry, repo, "v1")
    return str(read_index(layout)[0]["digest"])


def test_pull_by_tag_then_by_digest_from_cache(
    registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    events: list[PullProgress] = []
    image = pull_image(
        parse_reference(f"{registry.host}/plain:v1", insecure=True), cache_dir=cache, progress=events.append
    )
    assert image.manifest_digest == pushed["plain"]
    assert image.layout_dir == cache
    assert image.config.config.entrypoint == ["/bin/bench"] and image.config.architecture == "amd64"
    assert len(image.layers) == 2
    for layer in image.layers:
        assert layer.path == BlobCache(cache).path(layer.digest) and layer.path.stat().st_size == layer.size
    done = {e.digest for e in events if e.complete and e.kind == "layer"}
    assert done == {layer.digest for layer in image.layers}
    assert not any(e.cached for e in events)
    assert any(not e.complete and e.kind == "layer" and e.done <= e.total for e in events)

    root = tmp_path / "root"
    root.mkdir()
    unpack_layers(image.layers, root)
    assert (root / "etc/name").read_text() == "plain"

    # By digest, everything cached: works without the registry (a port nobody listens on).
    offline = parse_reference(f"127.0.0.1:9/plain@{pushed['plain']}", insecure=True)
    events.clear()
    again = pull_image(offline, cache_dir=cache, progress=events.append)
    assert again == image
    assert all(e.cached for e in events if e.kind != "manifest")


def test_open_image_pulls_registry_refs_and_opens_local_layouts(
    registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    image = open_image(f"{registry.host}/plain@{pushed['plain']}", cache_dir=tmp_path / "c", insecure=True)
    assert image.manifest_digest == pushed["plain"]
    layout = make_layout(tmp_path, "local")
    assert open_image(f"{layout}:v1", cache_dir=tmp_path / "c", insecure=False).layout_dir == layout
    with pytest.raises(ImageError, match="does not start with a registry host"):
        open_image(str(tmp_path / "missing"), cache_dir=tmp_path / "c", insecure=False)


def test_a_job_registry_url_with_http_means_plain_http(
    registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    ref = _job_reference(registry.url, "plain", pushed["plain"])
    assert ref.scheme == "http"
    assert pull_image(ref, cache_dir=tmp_path).manifest_digest == pushed["plain"]


def test_index_picks_host_platform(registry: Registry, pushed: dict[str, str], tmp_path: Path) -> None:
    for repo in ("multi", "dockerlist"):
        ref = parse_reference(f"{registry.host}/{repo}:v1", insecure=True)
        for arch in ("amd64", "arm64"):
            image = pull_image(ref, cache_dir=tmp_path, arch=arch)
            assert image.config.architecture == arch
            assert image.manifest_digest != pushed[repo]  # the platform manifest, not the index
        with pytest.raises(ImageError, match=r"no image for linux/riscv64; available platforms: linux/"):
            pull_image(ref, cache_dir=tmp_path, arch="riscv64")


def test_docker_v2_media_types(registry: Registry, pushed: dict[str, str], tmp_path: Path) -> None:
    image = pull_image(parse_reference(f"{registry.host}/dockerv2s2:v1", insecure=True), cache_dir=tmp_path)
    assert {layer.media_type for layer in image.layers} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }
    root = tmp_path / "root"
    root.mkdir()
    unpack_layers(image.layers, root)
    assert (root / "etc/name").read_text() == "dockerv2s2"


def test_zstd_layers(registry: Registry, pushed: dict[str, str], tmp_path: Path) -> None:
    image = pull_image(parse_reference(f"{registry.host}/zstd:v1", insecure=True), cache_dir=tmp_path / "c")
    assert {layer.media_type for layer in image.layers} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    root = tmp_path / "root"
    root.mkdir()
    unpack_layers(image.layers, root)
    assert (root / "bin/bench").stat().st_mode & 0o777 == 0o755


def test_missing_tag_names_the_repository(registry: Registry, pushed: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(
        ImageError, match=r"registry 127\.0\.0\.1:\d+ has no manifest nope in repository plain \(HTTP 404"
    ):
        pull_image(parse_reference(f"{registry.host}/plain:nope", insecure=True), cache_dir=tmp_path)


# --- token auth ------------------------------------------------------------------------------------


def test_token_challenge_flow_with_job_token(
    auth_registry: Registry, token_server: TokenServer, pushed: dict[str, str], tmp_path: Path
) -> None:
    token_server.requests.clear()
    ref = _job_reference(auth_registry.url, "plain", pushed["plain"])
    image = pull_image(ref, cache_dir=tmp_path, credentials=Credentials(token=JOB_TOKEN))
    assert image.manifest_digest == pushed["plain"]
    assert len(token_server.requests) == 1  # one challenge, the realm's token reused for every blob
    assert token_server.requests[0]["scope"] == "repository:plain:pull"
    assert token_server.requests[0]["auth"] == f"Bearer {JOB_TOKEN}"


def test_token_challenge_flow_with_username_password(
    auth_registry: Registry, token_server: TokenServer, pushed: dict[str, str], tmp_path: Path
) -> None:
    ref = parse_reference(f"{auth_registry.host}/zstd:v1", insecure=True)
    image = pull_image(ref, cache_dir=tmp_path, credentials=Credentials(username=USERNAME, password=PASSWORD))
    assert image.manifest_digest == pushed["zstd"]
    with pytest.raises(
        ImageError, match=r"refused the credentials of user 'alice' for repository zstd \(.*401"
    ):
        pull_image(
            ref, cache_dir=tmp_path / "2", credentials=Credentials(username=USERNAME, password="wrong")
        )


def test_valid_token_directly_as_bearer_needs_no_challenge(
    auth_registry: Registry, token_server: TokenServer, pushed: dict[str, str], tmp_path: Path
) -> None:
    token = token_server.mint("plain")
    token_server.requests.clear()
    ref = _job_reference(auth_registry.url, "plain", pushed["plain"])
    assert (
        pull_image(ref, cache_dir=tmp_path, credentials=Credentials(token=token)).manifest_digest
        == pushed["plain"]
    )
    assert token_server.requests == []


@pytest.mark.parametrize("kind", ["expired", "wrong-scope"])
def test_bad_token_fails_with_clear_401(
    auth_registry: Registry, token_server: TokenServer, pushed: dict[str, str], tmp_path: Path, kind: str
) -> None:
    token = token_server.mint("plain", ttl=-120) if kind == "expired" else token_server.mint("other-project")
    ref = _job_reference(auth_registry.url, "plain", pushed["plain"])
    with pytest.raises(ImageError) as err:
        pull_image(ref, cache_dir=tmp_path, credentials=Credentials(token=token))
    msg = str(err.value)
    assert f"registry {auth_registry.host} refused the pull token for repository plain" in msg
    assert "401" in msg and "may have expired" in msg
    assert token not in msg


def test_anonymous_pull_from_auth_registry_is_refused(
    auth_registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(ImageError, match=r"requires authentication to pull repository plain .*401"):
        pull_image(parse_reference(f"{auth_registry.host}/plain:v1", insecure=True), cache_dir=tmp_path)


# --- corruption and flaky transport ----------------------------------------------------------------


def test_corrupted_blob_on_registry_disk(registry: Registry, tmp_path: Path) -> None:
    layout = make_layout(tmp_path, "corrupt")
    skopeo_push(layout, registry, "corrupt", "v1")
    ref = parse_reference(f"{registry.host}/corrupt:v1", insecure=True)
    _, manifest = manifest_of(layout, "v1")
    bad = manifest["layers"][1]["digest"]
    data = registry.blob_data(bad)
    original = data.read_bytes()
    data.write_bytes(bytes(b ^ 0xFF for b in original))  # same length, different bytes
    cache = tmp_path / "cache"
    with pytest.raises(DigestMismatchError) as err:
        pull_image(ref, cache_dir=cache)
    assert err.value.expected == bad and err.value.actual != bad
    assert f"expected {bad}, got sha256:" in str(err.value)
    blobs = cache / "blobs" / "sha256"
    assert not (blobs / bad.split(":")[1]).exists()
    assert not [p for p in blobs.iterdir() if p.name.startswith(".tmp-")]
    data.write_bytes(original)
    assert pull_image(ref, cache_dir=cache).layers[1].digest == bad


def test_dropped_connection_resumes_with_range(
    registry: Registry, faulty_proxy: tuple[str, Faults], tmp_path: Path
) -> None:
    host, faults = faulty_proxy
    layout = tmp_path / "bigblob"
    big = [file("blob.bin", bytes(range(256)) * 4096)]  # 1 MiB, stored uncompressed
    build_layout(layout, [big], CONFIG, tag="v1", arch="amd64", compression="none")
    skopeo_push(layout, registry, "bigblob", "v1")
    faults.cut_blob_after = 100_000
    faults.cuts_left = 2  # the config (small: cut never reached) and then the layer
    ref = parse_reference(f"{host}/bigblob:v1", insecure=True)
    image = pull_image(ref, cache_dir=tmp_path / "c", backoff=0.01)
    layer = image.layers[0]
    assert layer.size > 1_000_000
    ranges = [r for (_, path, r) in faults.blob_gets() if layer.digest in path]
    assert len(ranges) == 2 and ranges[0] == ""
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 100_000
    root = tmp_path / "root"
    root.mkdir()
    unpack_layers(image.layers, root)
    assert (root / "blob.bin").read_bytes() == bytes(range(256)) * 4096


def test_transient_statuses_are_retried(
    registry: Registry, faulty_proxy: tuple[str, Faults], pushed: dict[str, str], tmp_path: Path
) -> None:
    host, faults = faulty_proxy
    faults.statuses = {"/manifests/": [503], "/blobs/": [429, 502]}
    image = pull_image(parse_reference(f"{host}/plain:v1", insecure=True), cache_dir=tmp_path, backoff=0.01)
    assert image.manifest_digest == pushed["plain"]
    assert faults.statuses == {"/manifests/": [], "/blobs/": []}


def test_persistent_5xx_gives_up_with_status(faulty_proxy: tuple[str, Faults], tmp_path: Path) -> None:
    host, faults = faulty_proxy
    faults.statuses = {"/manifests/": [503] * 10}
    with pytest.raises(ImageError, match=r"failed to serve manifest v1 of repository plain \(HTTP 503"):
        pull_image(
            parse_reference(f"{host}/plain:v1", insecure=True), cache_dir=tmp_path, retries=2, backoff=0.01
        )


def test_concurrent_pulls_share_the_cache(
    faulty_proxy: tuple[str, Faults], pushed: dict[str, str], tmp_path: Path
) -> None:
    host, faults = faulty_proxy
    ref = parse_reference(f"{host}/multi:v1", insecure=True)
    results: list[object] = []

    def pull() -> None:
        try:
            results.append(pull_image(ref, cache_dir=tmp_path, arch="amd64"))
        except Exception as e:  # pragma: no cover - reported below
            results.append(e)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(r == results[0] for r in results), results
    gets = [path for (_, path, _) in faults.blob_gets()]
    assert len(gets) == len(set(gets)) == 3  # config + 2 layers, each downloaded once


def test_a_loopback_registry_without_tls_is_pulled_without_insecure_registry(
    registry: Registry, pushed: dict[str, str], tmp_path: Path
) -> None:
    """Issue #17: HTTPS is tried, the registry answers in plain HTTP, the pull goes on over HTTP."""
    warned: list[str] = []
    image = open_image(
        f"{registry.host}/plain@{pushed['plain']}", cache_dir=tmp_path / "cache", warn=warned.append
    )
    assert image.manifest_digest == pushed["plain"] and len(image.layers) == 2
    assert len(warned) == 1, warned
    assert f"registry {registry.host} does not speak TLS" in warned[0] and "plain HTTP" in warned[0]
    warned.clear()
    open_image(f"{registry.host}/plain:v1", cache_dir=tmp_path / "cache", insecure=True, warn=warned.append)
    assert warned == []  # --insecure-registry: HTTP from the start, nothing to say for loopback
