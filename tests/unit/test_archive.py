"""Images from tar archives (issue #17): OCI archives, Docker archives, plain tars; hostile outer tars.

Archives are built here with tarfile from layouts written by tests.support.oci_builder (and, where
skopeo is installed, by skopeo itself from the example image). Nothing is ever extracted: a hostile
archive is refused before any of its members is read, and nothing appears outside the blob cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.oci.blobcache import BlobCache
from bencher_runner.oci.layout import open_layout
from bencher_runner.oci.progress import PullProgress
from bencher_runner.oci.source import open_image
from bencher_runner.spec.errors import DigestMismatchError, ImageError
from tests.support.bounded import call_bounded
from tests.support.oci_builder import build_layout, file, layer_bytes, read_index

CONFIG = {"Entrypoint": ["/bin/bench"], "Cmd": ["--fast"], "Env": ["A=1"]}
LAYERS = [[file("a", "one")], [file("b", "two")]]
EXAMPLE = Path(__file__).parents[2] / "examples" / "hello" / "oci"


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw: Any) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def tar_dir(src: Path, out: Path, extra: list[tuple[str, bytes, dict[str, Any]]] = ()) -> Path:  # type: ignore[assignment]
    """``src``'s files as a tar (names relative to ``src``) plus ``extra`` members, written verbatim."""
    with tarfile.open(out, "w") as tar:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                add(tar, str(path.relative_to(src)), path.read_bytes())
        for name, data, kw in extra:
            add(tar, name, data, **kw)
    return out


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    dest = tmp_path / "img"
    build_layout(dest, LAYERS, CONFIG, arch="amd64", tag="v1")
    return dest


def oci_archive(layout: Path, tmp_path: Path, **kw: Any) -> Path:
    return tar_dir(layout, tmp_path / "oci.tar", **kw)


def docker_archive(
    tmp_path: Path,
    *,
    name: str = "docker.tar",
    layers: list[bytes] | None = None,
    diff_ids: list[str] | None = None,
    repo_tags: list[str] | None = None,
    names: list[str] | None = None,
    arch: str = "amd64",
    extra: list[tuple[str, bytes, dict[str, Any]]] = (),  # type: ignore[assignment]
) -> Path:
    """The older `docker save` shape: manifest.json, <config>.json, <id>/layer.tar (uncompressed)."""
    layers = layers if layers is not None else [layer_bytes(entries, "none") for entries in LAYERS]
    ids = diff_ids or ["sha256:" + hashlib.sha256(data).hexdigest() for data in layers]
    config = json.dumps(
        {"architecture": arch, "os": "linux", "config": CONFIG, "rootfs": {"type": "layers", "diff_ids": ids}}
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_names = names or [f"{i:064x}/layer.tar" for i in range(len(layers))]
    manifest = [{"Config": config_name, "RepoTags": repo_tags or ["bench:v1"], "Layers": layer_names}]
    out = tmp_path / name
    with tarfile.open(out, "w") as tar:
        add(tar, "manifest.json", json.dumps(manifest).encode())
        add(tar, config_name, config)
        for layer_name, data in zip(layer_names, layers, strict=True):
            add(tar, layer_name, data)
        for member, data, kw in extra:
            add(tar, member, data, **kw)
    return out


def open_(ref: str, cache: Path, events: list[PullProgress] | None = None, **kw: Any) -> Any:
    return open_image(
        ref, cache_dir=cache, arch="amd64", progress=events.append if events is not None else None, **kw
    )


# --- OCI archives -----------------------------------------------------------------------------------


def test_an_oci_archive_opens_like_its_layout_and_is_warm_the_second_time(
    layout: Path, tmp_path: Path
) -> None:
    archive = oci_archive(layout, tmp_path)
    cache = tmp_path / "cache"
    from_layout = open_layout(f"{layout}:v1", arch="amd64")
    for i, ref in enumerate(
        (f"oci-archive:{archive}", f"oci-archive:{archive}:v1", str(archive), f"{archive}:v1")
    ):
        events: list[PullProgress] = []
        image = open_(ref, cache, events)
        assert image.manifest_digest == from_layout.manifest_digest == read_index(layout)[0]["digest"]
        assert image.config_digest == from_layout.config_digest and image.layout_dir == cache
        assert image.config.config.entrypoint == ["/bin/bench"]
        assert [la.digest for la in image.layers] == [la.digest for la in from_layout.layers]
        for la in image.layers:
            assert (
                la.path == BlobCache(cache).path(la.digest)
                and la.path.read_bytes()
                == (layout / "blobs" / "sha256" / la.digest.split(":")[1]).read_bytes()
            )
        done = [e for e in events if e.kind == "layer" and e.complete]
        assert len(done) == 2 and all(e.cached is (i > 0) for e in done), done  # warm after the first


def test_an_unknown_tag_in_an_oci_archive_lists_the_tags(layout: Path, tmp_path: Path) -> None:
    archive = oci_archive(layout, tmp_path)
    with pytest.raises(ImageError, match=r"tag 'v2' not found in archive .*available tags: v1"):
        open_(f"oci-archive:{archive}:v2", tmp_path / "cache")


def test_a_corrupt_blob_in_an_oci_archive_names_both_digests_and_stays_out_of_the_cache(
    layout: Path, tmp_path: Path
) -> None:
    index = read_index(layout)
    manifest = json.loads((layout / "blobs" / "sha256" / index[0]["digest"].split(":")[1]).read_bytes())
    victim = layout / "blobs" / "sha256" / manifest["layers"][1]["digest"].split(":")[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    archive = oci_archive(layout, tmp_path)
    with pytest.raises(DigestMismatchError) as err:
        open_(f"oci-archive:{archive}", tmp_path / "cache")
    assert manifest["layers"][1]["digest"] in str(err.value) and str(archive) in str(err.value)
    assert BlobCache(tmp_path / "cache").lookup(manifest["layers"][1]["digest"]) is None


def test_a_truncated_archive_is_refused_naming_the_member(layout: Path, tmp_path: Path) -> None:
    archive = oci_archive(layout, tmp_path)
    with tarfile.open(archive) as tar:
        biggest = max(tar.getmembers(), key=lambda m: m.size)
        cut = biggest.offset_data + biggest.size // 2
    data = archive.read_bytes()[:cut]
    archive.write_bytes(data)
    with pytest.raises(ImageError) as err:
        open_(f"oci-archive:{archive}", tmp_path / "cache")
    assert str(archive) in str(err.value) and "Traceback" not in str(err.value)


def test_not_a_tar_and_not_an_image_archive(layout: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar\n" * 100)
    with pytest.raises(ImageError, match="is not a tar archive"):
        open_(f"oci-archive:{junk}", tmp_path / "cache")
    empty = tar_dir(tmp_path / "nothing", tmp_path / "other.tar", extra=[("readme", b"hi", {})])
    with pytest.raises(ImageError, match="it is no image archive"):
        open_(str(empty), tmp_path / "cache")
    with pytest.raises(ImageError, match="has no oci-layout: it is not an OCI archive"):
        open_(f"oci-archive:{empty}", tmp_path / "cache")
    with pytest.raises(ImageError, match="image archive not found"):
        open_(f"oci-archive:{tmp_path / 'missing.tar'}", tmp_path / "cache")


def test_a_fifo_named_as_the_archive_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "image.tar"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        call_bounded(lambda: open_(f"oci-archive:{fifo}", tmp_path / "cache"), fifos=[fifo])


def test_a_jobs_image_never_names_an_archive(layout: Path, tmp_path: Path) -> None:
    archive = oci_archive(layout, tmp_path)
    for ref in (f"oci-archive:{archive}", f"docker-archive:{archive}"):
        with pytest.raises(ImageError, match="a job's image comes from a registry only"):
            open_(ref, tmp_path / "cache", allow_local=False)
    with pytest.raises(ImageError, match="registry only"):
        open_(str(archive), tmp_path / "cache", allow_local=False)
    assert not (tmp_path / "cache").exists()


# --- hostile outer tars -----------------------------------------------------------------------------

HOSTILE: list[tuple[str, bytes, dict[str, Any], str]] = [
    ("../evil", b"x", {}, "climbs out"),
    ("blobs/../../evil", b"x", {}, "climbs out"),
    ("/etc/evil", b"x", {}, "absolute name"),
    ("escape", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "absolute path"),
    ("blobs/escape", b"", {"type": tarfile.SYMTYPE, "linkname": "../../../etc/passwd"}, "links outside"),
    ("hard", b"", {"type": tarfile.LNKTYPE, "linkname": "../etc/passwd"}, "links outside"),
    ("fifo", b"", {"type": tarfile.FIFOTYPE}, "a FIFO"),
    ("tty", b"", {"type": tarfile.CHRTYPE, "devmajor": 5, "devminor": 0}, "a character device"),
    ("disk", b"", {"type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0}, "a block device"),
    ("index.json", b"{}", {}, "appears more than once"),
    ("./oci-layout", b"{}", {}, "appears more than once"),
]


@pytest.mark.parametrize(("name", "data", "kw", "why"), HOSTILE, ids=[h[0] + "-" + h[3] for h in HOSTILE])
@pytest.mark.parametrize("prefix", ["oci-archive:", "docker-archive:", ""])
def test_a_hostile_outer_tar_is_refused_whole_and_nothing_is_written(
    layout: Path, tmp_path: Path, name: str, data: bytes, kw: dict[str, Any], why: str, prefix: str
) -> None:
    archive = oci_archive(layout, tmp_path, extra=[(name, data, kw)])
    cache = tmp_path / "cache"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ImageError) as err:
        open_(f"{prefix}{archive}", cache)
    text = str(err.value)
    assert why in text and str(archive) in text and "malformed or hostile" in text, text
    assert "\n" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache, nothing extracted
    assert not (tmp_path.parent / "evil").exists() and not Path("/etc/evil").exists()


def test_a_member_larger_than_the_image_limit_is_refused_before_it_is_read(
    layout: Path, tmp_path: Path
) -> None:
    archive = oci_archive(layout, tmp_path, extra=[("big", b"z" * 5000, {})])
    with pytest.raises(ImageError, match=r"member 'big' is 5000 bytes, more than the image limit of 4096"):
        open_(f"oci-archive:{archive}", tmp_path / "cache", max_image_bytes=4096)


def test_an_oversized_index_json_is_refused_with_a_memory_bound(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (src / "index.json").write_bytes(b" " * (4 * 1024 * 1024 + 1))
    archive = tar_dir(src, tmp_path / "big.tar")
    with pytest.raises(
        ImageError, match=r"member 'index.json' \(index.json\) is 4194305 bytes, more than the 4 MiB"
    ):
        open_(f"oci-archive:{archive}", tmp_path / "cache")


def test_too_many_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bencher_runner.oci import archive as archive_mod

    monkeypatch.setattr(archive_mod, "MAX_MEMBERS", 5)
    out = tar_dir(tmp_path / "none", tmp_path / "many.tar", extra=[(f"f{i}", b"", {}) for i in range(6)])
    with pytest.raises(ImageError, match="more than 5 members"):
        open_(str(out), tmp_path / "cache")


# --- Docker archives --------------------------------------------------------------------------------


def test_a_docker_archive_opens_with_a_content_derived_identity_and_is_warm_the_second_time(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    first = docker_archive(tmp_path)
    renamed = docker_archive(tmp_path, name="renamed.tar", names=["a.tar", "sub/b.tar"], repo_tags=["x/y:z"])
    digests = set()
    for i, ref in enumerate((f"docker-archive:{first}", str(first), f"docker-archive:{first}:bench:v1",
                             f"docker-archive:{renamed}")):  # fmt: skip
        events: list[PullProgress] = []
        image = open_(ref, cache, events)
        digests.add(image.manifest_digest)
        assert image.config.config.entrypoint == ["/bin/bench"] and len(image.layers) == 2
        for la in image.layers:
            assert la.media_type == "application/vnd.oci.image.layer.v1.tar"
            assert la.path == BlobCache(cache).path(la.digest)
        manifest = json.loads(BlobCache(cache).path(image.manifest_digest).read_bytes())
        assert [la["digest"] for la in manifest["layers"]] == [la.digest for la in image.layers]
        assert manifest["config"]["digest"] == image.config_digest
        done = [e for e in events if e.kind == "layer" and e.complete]
        assert len(done) == 2 and all(e.cached is (i > 0) for e in done)
    assert len(digests) == 1  # member names and tags do not change what the image is


def test_skopeos_legacy_symlinks_inside_a_docker_archive_are_resolved_by_name(tmp_path: Path) -> None:
    """skopeo writes <id>/layer.tar as a symlink to ../<diffid>.tar; Docker links repeated layers."""
    data = layer_bytes(LAYERS[0], "none")
    link = {"type": tarfile.SYMTYPE, "linkname": "../real.tar"}
    archive = docker_archive(
        tmp_path,
        layers=[data, data],
        names=["real.tar", "other/real.tar"],
        extra=[("id/layer.tar", b"", link)],
    )
    image = open_(f"docker-archive:{archive}", tmp_path / "cache")
    assert image.layers[0].digest == image.layers[1].digest
    # the manifest may name the link itself: it is followed inside the archive, never on the host
    shutil.rmtree(tmp_path / "cache")
    archive2 = tmp_path / "via-link.tar"
    with tarfile.open(archive) as src, tarfile.open(archive2, "w") as dst:
        for m in src.getmembers():
            body = src.extractfile(m) if m.isreg() else None
            if m.name == "manifest.json" and body is not None:
                doc = json.loads(body.read())
                doc[0]["Layers"] = ["id/layer.tar", "real.tar"]
                add(dst, m.name, json.dumps(doc).encode())
            else:
                dst.addfile(m, body)
    assert open_(f"docker-archive:{archive2}", tmp_path / "cache").layers[0].digest == image.layers[0].digest


def test_a_docker_layer_that_does_not_hash_to_its_diff_id_is_refused(tmp_path: Path) -> None:
    layers = [layer_bytes(entries, "none") for entries in LAYERS]
    wrong = ["sha256:" + hashlib.sha256(layers[0]).hexdigest(), "sha256:" + "0" * 64]
    archive = docker_archive(tmp_path, layers=layers, diff_ids=wrong)
    with pytest.raises(DigestMismatchError) as err:
        open_(f"docker-archive:{archive}", tmp_path / "cache")
    assert "0" * 64 in str(err.value) and "layer 2" in str(err.value) and str(archive) in str(err.value)
    assert BlobCache(tmp_path / "cache").lookup("sha256:" + "0" * 64) is None


def test_a_compressed_docker_layer_is_named_by_the_digest_of_its_bytes(tmp_path: Path) -> None:
    gz = layer_bytes(LAYERS[0], "gzip")
    plain = layer_bytes(LAYERS[0], "none")
    archive = docker_archive(tmp_path, layers=[gz], diff_ids=["sha256:" + hashlib.sha256(plain).hexdigest()])
    image = open_(str(archive), tmp_path / "cache")
    assert image.layers[0].digest == "sha256:" + hashlib.sha256(gz).hexdigest()
    assert image.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.mark.parametrize(
    ("kw", "ref_tail", "match"),
    [
        ({"diff_ids": ["sha256:" + "1" * 64]}, "", "names 2 layers but the image config lists 1 diff_ids"),
        ({"arch": "s390x"}, "", "is for 'linux'/'s390x', not linux/amd64"),
        ({}, ":other:v1", r"tag 'other:v1' not found in archive .* available: 'bench:v1'"),
        ({"names": ["../up.tar", "b.tar"]}, "", "climbs out"),
    ],
)
def test_docker_archive_errors_name_the_archive_and_the_fix(
    tmp_path: Path, kw: dict[str, Any], ref_tail: str, match: str
) -> None:
    archive = docker_archive(tmp_path, **kw)
    with pytest.raises(ImageError, match=match) as err:
        open_(f"docker-archive:{archive}{ref_tail}", tmp_path / "cache")
    assert str(archive) in str(err.value) and "\n" not in str(err.value)


def test_a_manifest_json_naming_a_missing_member(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path)
    with tarfile.open(archive) as src, tarfile.open(tmp_path / "broken.tar", "w") as dst:
        for m in src.getmembers():
            if not m.name.endswith("1/layer.tar"):
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(ImageError, match=r"has no member '0+1/layer.tar' \(layer 2 of the image"):
        open_(f"docker-archive:{tmp_path / 'broken.tar'}", tmp_path / "cache")


# --- archives written by skopeo from the example image ----------------------------------------------


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_archives_of_the_example_image(tmp_path: Path) -> None:
    oci, docker = tmp_path / "hello-oci.tar", tmp_path / "hello-docker.tar"
    for dest in (f"oci-archive:{oci}", f"docker-archive:{docker}:hello:latest"):
        res = subprocess.run(
            ["skopeo", "copy", "--quiet", f"oci:{EXAMPLE}:latest", dest],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
    config_blob = EXAMPLE / "blobs" / "sha256" / _config_digest(EXAMPLE).split(":")[1]
    arch = str(json.loads(config_blob.read_bytes())["architecture"])
    layout = open_layout(f"{EXAMPLE}:latest", arch=arch)
    cache = tmp_path / "cache"
    from_oci = open_image(f"oci-archive:{oci}", cache_dir=cache, arch=arch)
    assert from_oci.manifest_digest == layout.manifest_digest
    for ref in (f"docker-archive:{docker}", f"docker-archive:{docker}:hello:latest", str(docker)):
        from_docker = open_image(ref, cache_dir=cache, arch=arch)
        assert from_docker.config_digest == layout.config_digest
        assert from_docker.config.config == layout.config.config


def _config_digest(layout: Path) -> str:
    top = read_index(layout)[0]
    manifest = json.loads((layout / "blobs" / "sha256" / top["digest"].split(":")[1]).read_bytes())
    return str(manifest["config"]["digest"])
