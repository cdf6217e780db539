import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.oci.imageconfig import parse_image_config
from bencher_runner.oci.layout import open_layout, parse_layout_ref
from bencher_runner.spec.errors import DigestMismatchError, ImageError
from tests.support.bounded import call_bounded
from tests.support.oci_builder import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    Layer,
    blob_path,
    build_layout,
    file,
    manifest_of,
    read_index,
    read_json_blob,
    replace_manifest,
    write_index,
)

CONFIG = {"Entrypoint": ["/bin/bench"], "Cmd": ["--fast"], "Env": ["A=1"], "WorkingDir": "/w", "User": "1000"}
LAYERS = [[file("a", "one")], [file("b", "two")]]


def make(tmp_path: Path, **kw: Any) -> Path:
    layout = tmp_path / "img"
    build_layout(layout, LAYERS, CONFIG, arch="amd64", **kw)
    return layout


def test_open_by_tag_and_without_tag(tmp_path: Path) -> None:
    layout = make(tmp_path, tag="v1")
    digest = read_index(layout)[0]["digest"]
    for ref in (str(layout), f"{layout}:v1"):
        image = open_layout(ref, arch="amd64")
        assert image.manifest_digest == digest
        assert image.layout_dir == layout
        assert image.config.architecture == "amd64" and image.config.os == "linux"
        cfg = image.config.config
        assert (cfg.entrypoint, cfg.cmd, cfg.env, cfg.working_dir, cfg.user) == (
            ["/bin/bench"],
            ["--fast"],
            ["A=1"],
            "/w",
            "1000",
        )
        assert len(image.layers) == 2
        for layer in image.layers:
            assert layer.path == blob_path(layout, layer.digest) and layer.path.stat().st_size == layer.size
            assert layer.media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
        _, manifest = manifest_of(layout)
        assert image.config_digest == manifest["config"]["digest"]


def test_untagged_single_image(tmp_path: Path) -> None:
    layout = make(tmp_path, tag=None)
    assert open_layout(str(layout), arch="amd64").layers


def test_ambiguous_without_tag_lists_tags(tmp_path: Path) -> None:
    layout = make(tmp_path, tag="one")
    build_layout(layout, LAYERS, CONFIG, arch="amd64", tag="two")
    with pytest.raises(ImageError) as err:
        open_layout(str(layout), arch="amd64")
    assert "one, two" in str(err.value) and "DIR:TAG" in str(err.value)
    assert open_layout(f"{layout}:two", arch="amd64").manifest_digest


def test_unknown_tag_lists_available(tmp_path: Path) -> None:
    layout = make(tmp_path, tag="v1")
    with pytest.raises(ImageError) as err:
        open_layout(f"{layout}:v2", arch="amd64")
    assert "'v2'" in str(err.value) and "available tags: v1" in str(err.value)


def test_parse_layout_ref(tmp_path: Path) -> None:
    odd = tmp_path / "dir:with:colons"
    odd.mkdir()
    assert parse_layout_ref(str(odd)) == (odd, None)
    assert parse_layout_ref(f"{odd}:tag") == (odd, "tag")
    assert parse_layout_ref(f"{tmp_path}:v1.2") == (tmp_path, "v1.2")
    with pytest.raises(ImageError, match=r"image layout not found: .*nowhere"):
        parse_layout_ref(str(tmp_path / "nowhere"))
    with pytest.raises(ImageError, match="image layout not found"):
        parse_layout_ref(str(tmp_path / "nowhere:tag"))


def test_not_a_layout(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not an OCI image layout"):
        open_layout(str(tmp_path))
    layout = make(tmp_path)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "2.0.0"}))
    with pytest.raises(ImageError, match=r"imageLayoutVersion '2\.0\.0'"):
        open_layout(str(layout), arch="amd64")


@pytest.mark.parametrize("docker", [False, True])
def test_index_picks_platform(tmp_path: Path, docker: bool) -> None:
    layout = tmp_path / "img"
    top = build_layout(
        layout, LAYERS, CONFIG, platforms=[("linux", "amd64"), ("linux", "arm64")], docker_media_types=docker
    )
    index = read_json_blob(layout, top)
    assert index["mediaType"] == (DOCKER_LIST if docker else "application/vnd.oci.image.index.v1+json")
    by_arch = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
    amd = open_layout(str(layout), arch="amd64")
    assert amd.manifest_digest == by_arch["amd64"] and amd.config.architecture == "amd64"
    arm = open_layout(str(layout), arch="arm64")
    assert arm.manifest_digest == by_arch["arm64"] and arm.config.architecture == "arm64"
    with pytest.raises(ImageError) as err:
        open_layout(str(layout), arch="s390x")
    assert "linux/s390x" in str(err.value) and "linux/amd64, linux/arm64" in str(err.value)


def test_docker_v2_media_types(tmp_path: Path) -> None:
    layout = make(tmp_path, docker_media_types=True)
    entry, manifest = manifest_of(layout)
    assert entry["mediaType"] == DOCKER_MANIFEST and manifest["config"]["mediaType"] == DOCKER_CONFIG
    image = open_layout(str(layout), arch="amd64")
    assert [layer.media_type for layer in image.layers] == [DOCKER_LAYER_GZIP] * 2


@pytest.mark.parametrize("which", ["layer", "config", "manifest"])
def test_corrupted_blob_names_both_digests(tmp_path: Path, which: str) -> None:
    layout = make(tmp_path)
    entry, manifest = manifest_of(layout)
    digest = {"layer": manifest["layers"][1]["digest"], "config": manifest["config"]["digest"]}.get(
        which, entry["digest"]
    )
    path = blob_path(layout, digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError) as err:
        open_layout(str(layout), arch="amd64")
    assert digest in str(err.value) and err.value.actual in str(err.value) and err.value.actual != digest
    assert which in str(err.value)


def test_missing_blob_names_digest(tmp_path: Path) -> None:
    layout = make(tmp_path)
    _, manifest = manifest_of(layout)
    digest = manifest["layers"][0]["digest"]
    blob_path(layout, digest).unlink()
    with pytest.raises(ImageError) as err:
        open_layout(str(layout), arch="amd64")
    assert digest in str(err.value) and "missing" in str(err.value)


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/octet-stream",
    ],
)
def test_unsupported_layer_media_type(tmp_path: Path, media_type: str) -> None:
    layout = tmp_path / "img"
    build_layout(layout, [Layer([file("a")], media_type=media_type)], CONFIG, arch="amd64")
    with pytest.raises(ImageError, match=media_type.replace("+", r"\+")):
        open_layout(str(layout), arch="amd64")


def test_unsupported_config_and_manifest_media_types(tmp_path: Path) -> None:
    layout = tmp_path / "img"

    def edit(manifest: dict[str, Any]) -> None:
        manifest["config"]["mediaType"] = "application/vnd.example.config+json"

    build_layout(layout, LAYERS, CONFIG, arch="amd64", edit_manifest=edit)
    with pytest.raises(ImageError, match=r"application/vnd\.example\.config\+json"):
        open_layout(str(layout), arch="amd64")

    other = tmp_path / "other"
    build_layout(other, LAYERS, CONFIG, arch="amd64")
    entries = read_index(other)
    entries[0]["mediaType"] = "application/vnd.docker.distribution.manifest.v1+json"
    write_index(other, entries)
    with pytest.raises(ImageError, match=r"manifest\.v1\+json"):
        open_layout(str(other), arch="amd64")


def test_oversized_manifest(tmp_path: Path) -> None:
    layout = make(tmp_path, manifest_annotations={"junk": "x" * (5 * 1024 * 1024)})
    with pytest.raises(ImageError, match="more than the 4 MiB limit"):
        open_layout(str(layout), arch="amd64")


def test_manifest_size_mismatch(tmp_path: Path) -> None:
    layout = make(tmp_path)
    entries = read_index(layout)
    entries[0]["size"] += 1
    write_index(layout, entries)
    with pytest.raises(ImageError, match="size mismatch") as err:
        open_layout(str(layout), arch="amd64")
    assert entries[0]["digest"] in str(err.value)


def test_layer_size_mismatch(tmp_path: Path) -> None:
    layout = make(tmp_path)
    _, manifest = manifest_of(layout)
    manifest["layers"][0]["size"] -= 1
    replace_manifest(layout, manifest)
    with pytest.raises(ImageError, match="size mismatch") as err:
        open_layout(str(layout), arch="amd64")
    assert manifest["layers"][0]["digest"] in str(err.value)


def test_digest_path_injection_refused(tmp_path: Path) -> None:
    layout = make(tmp_path)
    _, manifest = manifest_of(layout)
    (tmp_path / "evil").write_bytes(b"{}")
    manifest["config"]["digest"] = "sha256:../../../evil"
    replace_manifest(layout, manifest)
    with pytest.raises(ImageError, match="not a valid digest"):
        open_layout(str(layout), arch="amd64")


def test_malformed_manifest_json(tmp_path: Path) -> None:
    layout = make(tmp_path)
    _, manifest = manifest_of(layout)
    del manifest["layers"]
    replace_manifest(layout, manifest)
    with pytest.raises(ImageError, match="layers"):
        open_layout(str(layout), arch="amd64")


def test_image_config_nulls_and_unknown_fields() -> None:
    blob = parse_image_config(
        json.dumps(
            {
                "architecture": "arm64",
                "os": "linux",
                "extra": {"x": 1},
                "config": {"Entrypoint": None, "Cmd": None, "Env": None, "Labels": {"a": "b"}},
            }
        ).encode()
    )
    assert blob.config.entrypoint is None and blob.config.cmd is None and blob.config.env == []
    assert parse_image_config(b'{"architecture": "amd64", "os": "linux"}').config.env == []
    for bad in (
        b"not json",
        b"[]",
        b'{"os": "linux"}',
        b'{"architecture": "a", "os": "l", "config": {"Cmd": "x"}}',
    ):
        with pytest.raises(ImageError, match="image config"):
            parse_image_config(bad)


# --- special files where the layout has a file (a FIFO would block the open forever) -----------------


def _special_file(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":  # to a regular file with the same bytes: still refused, never followed
        os.symlink(path.parent / "elsewhere", path)
    else:  # a character device reading zeros forever (/dev/zero's numbers)
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        except PermissionError:
            pytest.skip("mknod needs CAP_MKNOD")


def _target(layout: Path, which: str) -> Path:
    entry, manifest = manifest_of(layout)
    if which == "index.json":
        return layout / "index.json"
    if which == "oci-layout":
        return layout / "oci-layout"
    digest = {
        "manifest": entry["digest"],
        "config": manifest["config"]["digest"],
        "layer": manifest["layers"][-1]["digest"],
    }[which]
    return blob_path(layout, digest)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "chardev"])
@pytest.mark.parametrize("which", ["index.json", "oci-layout", "manifest", "config", "layer"])
def test_special_file_in_layout_is_refused_without_blocking(tmp_path: Path, which: str, kind: str) -> None:
    layout = make(tmp_path)
    target = _target(layout, which)
    (target.parent / "elsewhere").write_bytes(target.read_bytes())
    _special_file(target, kind)
    with pytest.raises(ImageError) as err:
        call_bounded(lambda: open_layout(str(layout), arch="amd64"), fifos=[target])
    text = str(err.value)
    assert "not a regular file" in text and target.name in text, text
    assert "\n" not in text


def test_fifo_at_a_nested_index_blob(tmp_path: Path) -> None:
    layout = tmp_path / "img"
    top = build_layout(layout, LAYERS, CONFIG, platforms=[("linux", "amd64"), ("linux", "arm64")])
    target = blob_path(layout, top)
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(ImageError, match="not a regular file") as err:
        call_bounded(lambda: open_layout(str(layout), arch="amd64"), fifos=[target])
    assert top in str(err.value)


# --- image config values the guest cannot take: one line naming the field, at open time --------------


@pytest.mark.parametrize(
    "config,field,shown",
    [
        ({"WorkingDir": "/w\x00x"}, "WorkingDir", r"'/w\\x00x'"),
        ({"WorkingDir": "relative/dir"}, "WorkingDir", "'relative/dir'"),
        ({"WorkingDir": "/a/../b"}, "WorkingDir", "'/a/../b'"),
        ({"WorkingDir": ".."}, "WorkingDir", "'..'"),
        ({"User": "bench\x00"}, "User", r"'bench\\x00'"),
        ({"User": "a\nb"}, "User", r"'a\\nb'"),
        ({"Env": ["A=1", "B=b\x00c"]}, r"Env\[1\]", r"'B=b\\x00c'"),
        ({"Env": ["\ud800=x"]}, r"Env\[0\]", r"'\\ud800=x'"),
        ({"Entrypoint": ["/bin/sh", "a\x00"]}, r"Entrypoint\[1\]", r"'a\\x00'"),
        ({"Cmd": ["\ud800"]}, r"Cmd\[0\]", r"'\\ud800'"),
        ({"WorkingDir": "/\udcff"}, "WorkingDir", r"'/\\udcff'"),
    ],
)
def test_image_config_values_the_guest_cannot_take(config: dict[str, Any], field: str, shown: str) -> None:
    blob = json.dumps({"architecture": "amd64", "os": "linux", "config": config}).encode()
    with pytest.raises(ImageError, match=rf"image config field config\.{field}: .*{shown}") as err:
        parse_image_config(blob)
    text = str(err.value)
    assert "\n" not in text and "\x00" not in text
    text.encode()  # UTF-8 encodable: no lone surrogate reaches the error text


def test_image_config_values_that_stay_accepted() -> None:
    config = {"WorkingDir": "/a/b/", "User": "1000:1000", "Env": ["JUNK", "A=", "B=x=y"], "Cmd": [""]}
    blob = json.dumps({"architecture": "amd64", "os": "linux", "config": config}).encode()
    cfg = parse_image_config(blob).config
    assert (cfg.working_dir, cfg.user, cfg.env, cfg.cmd) == ("/a/b/", "1000:1000", config["Env"], [""])


def test_image_config_error_surfaces_when_the_layout_is_opened(tmp_path: Path) -> None:
    layout = tmp_path / "img"
    build_layout(layout, LAYERS, {**CONFIG, "WorkingDir": "/x\x00"}, arch="amd64")
    with pytest.raises(ImageError, match=r"config\.WorkingDir"):
        open_layout(str(layout), arch="amd64")


# --- strings from the layout in error texts: one line, UTF-8-encodable, bounded -----------------------


def _assert_clean(text: str) -> None:
    text.encode()
    assert "\n" not in text and "\x1b" not in text and len(text) < 2000, text


def test_hostile_tags_and_platforms_in_errors(tmp_path: Path) -> None:
    layout = make(tmp_path, tag="v1")
    entries = read_index(layout)
    odd = [
        {**entries[0], "annotations": {"org.opencontainers.image.ref.name": f"t\ud800{i}\n\x1b[2J"}}
        for i in range(30)
    ]
    write_index(layout, odd)
    with pytest.raises(ImageError, match="available tags") as err:
        open_layout(f"{layout}:nope", arch="amd64")
    _assert_clean(str(err.value))
    assert "and 10 more" in str(err.value)
    bare = {k: v for k, v in entries[0].items() if k != "annotations"}
    plat = [{**bare, "platform": {"os": "li\ud800nux", "architecture": f"\x1b{i}\n"}} for i in range(3)]
    write_index(layout, plat)
    with pytest.raises(ImageError, match="no image for linux/amd64") as err:
        open_layout(str(layout), arch="amd64")
    _assert_clean(str(err.value))


def test_hostile_keys_and_digests_in_errors(tmp_path: Path) -> None:
    layout = make(tmp_path, tag="v1")
    entries = read_index(layout)
    write_index(layout, [{**entries[0], "annotations": {"k\ud800\n": 5}}])  # loc names the bad key
    with pytest.raises(ImageError, match=r"index\.json: field") as err:
        open_layout(str(layout), arch="amd64")
    _assert_clean(str(err.value))
    write_index(layout, [{**entries[0], "digest": "sha256:\ud800\n" + "x" * 4_000_000}])
    with pytest.raises(ImageError, match="not a valid digest") as err:
        open_layout(str(layout), arch="amd64")
    _assert_clean(str(err.value))
    blob = json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {"Labels": {"a\ud800\n": 1}, "Cmd": 5}}
    )
    with pytest.raises(ImageError, match=r"config\.Cmd") as err:
        parse_image_config(blob.encode())
    _assert_clean(str(err.value))
