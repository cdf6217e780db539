"""Hostile layers against the unpacker: nothing outside the tree may change, whatever the entry order.

Each test unpacks into ``world/dest`` next to ``world/outside``, a directory the test made that hostile
symlinks point at (absolutely, or relatively so that the host would resolve them there). The fixture
checks afterwards that nothing under ``world`` but ``dest`` changed: no mode, owner, mtime, contents or
xattr, no new or removed entry.
"""

import contextlib
import io
import math
import os
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.oci.layout import open_layout
from bencher_runner.oci.unpack import (
    ByteBudget,
    UnpackStats,
    ensure_directory,
    read_image_file,
    resolve_in_tree,
    unpack_layer_stream,
    unpack_layers,
)
from bencher_runner.spec.errors import ImageError, UnsafeImageError
from tests.support.oci_builder import (
    Entry,
    LayerSpec,
    RawLayer,
    build_layout,
    directory,
    file,
    hardlink,
    symlink,
)

HOSTILE_META: dict[str, Any] = {"mode": 0o777, "uid": 4242, "gid": 4242, "mtime": 86400}


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def snapshot(root: Path, exclude: Path) -> dict[str, tuple[Any, ...]]:
    """Everything observable about ``root`` and below (``exclude`` left out), xattrs included."""
    out: dict[str, tuple[Any, ...]] = {}
    paths = [root]
    while paths:
        p = paths.pop()
        st = p.lstat()
        extra: Any = None
        if stat.S_ISLNK(st.st_mode):
            extra = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            extra = p.read_bytes()
        elif stat.S_ISDIR(st.st_mode):
            children = sorted(c for c in os.listdir(p) if p / c != exclude)
            extra = children
            paths.extend(p / c for c in children)
        out[str(p.relative_to(root))] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_nlink,
            st.st_size,
            st.st_mtime_ns,
            extra,
            _xattrs(p),
        )
    return out


@dataclass
class World:
    tmp: Path
    dest: Path
    outside: Path  # world/outside: what hostile symlinks aim at

    def unpack(self, layers: Sequence[LayerSpec], **kw: Any) -> UnpackStats:
        layout = self.tmp / "layouts" / str(len(list((self.tmp / "layouts").iterdir())))
        build_layout(layout, layers, {}, tag=None)
        return unpack_layers(open_layout(str(layout)).layers, self.dest, **kw)

    def targets(self) -> dict[str, str]:
        """Symlink targets that, followed by the host from dest/<name>, reach ``outside``."""
        return {
            "absolute": str(self.outside),
            "relative": "../outside",
            "climbing": "../" * 12 + str(self.outside).lstrip("/"),
        }


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    top = tmp_path / "world"
    dest, outside = top / "dest", top / "outside"
    dest.mkdir(parents=True)
    (outside / "victim" / "deep").mkdir(parents=True)
    (outside / "victim-file").write_text("precious")
    (outside / "victim" / "deep" / "keep").write_text("also precious")
    os.mkfifo(outside / "pipe")
    (tmp_path / "layouts").mkdir()
    before = snapshot(top, dest)
    above = sorted(os.listdir(tmp_path))
    yield World(tmp_path, dest, outside)
    assert snapshot(top, dest) == before, "something outside the tree changed"
    assert sorted(os.listdir(tmp_path)) == above


KINDS = ["absolute", "relative", "climbing"]


# --- finding 1: directory metadata applied after a symlink replaced a parent ------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_dir_metadata_never_applied_through_a_later_symlink_in_the_same_layer(
    world: World, kind: str
) -> None:
    target = world.targets()[kind]
    world.unpack([[directory("a"), directory("a/victim", **HOSTILE_META), symlink("a", target)]])
    assert os.readlink(world.dest / "a") == target


@pytest.mark.parametrize("kind", KINDS)
def test_deep_dir_metadata_never_applied_through_a_replaced_middle_component(world: World, kind: str) -> None:
    target = "../" + world.targets()[kind] if kind == "relative" else world.targets()[kind]
    world.unpack(
        [
            [
                directory("x/a/victim/deep", **HOSTILE_META),
                directory("x/a/victim", **HOSTILE_META),
                symlink("x/a", target),
            ]
        ]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_dir_xattrs_never_applied_through_a_later_symlink(world: World, kind: str) -> None:
    world.unpack(
        [
            [
                directory("a"),
                Entry("a/victim", "dir", mode=0o755, xattrs={"user.pwned": b"1", "trusted.pwned": b"1"}),
                symlink("a", world.targets()[kind]),
            ]
        ]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_symlink_planted_in_a_later_layer(world: World, kind: str) -> None:
    """Layer 1's fix-ups ran before layer 2 planted the link; layer 2's entries resolve inside dest."""
    target = world.targets()[kind]
    world.unpack(
        [
            [directory("a"), directory("a/victim", **HOSTILE_META)],
            [
                symlink("a", target),
                directory("a/victim", **HOSTILE_META),
                file("a/victim-file", "overwritten", **HOSTILE_META),
                file("a/new", "new"),
            ],
        ]
    )
    landed = world.dest / "outside" if kind == "relative" else world.dest / str(world.outside).lstrip("/")
    assert (landed / "new").read_text() == "new"
    assert stat.S_IMODE((landed / "victim").lstat().st_mode) == 0o777


@pytest.mark.parametrize("kind", KINDS)
def test_files_fifos_and_symlinks_through_a_planted_symlink_land_inside(world: World, kind: str) -> None:
    world.unpack(
        [
            [
                directory("a"),
                symlink("a", world.targets()[kind]),
                file("a/victim-file", "overwritten", **HOSTILE_META),
                file("a/new", "new", **HOSTILE_META),
                Entry("a/pipe", "fifo", **HOSTILE_META),
                symlink("a/victim", "/elsewhere", uid=4242, gid=4242, mtime=86400),
                directory("a/victim/deep", **HOSTILE_META),
            ]
        ]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_hard_links_through_a_planted_symlink(world: World, kind: str) -> None:
    """A hard link's target is resolved inside dest: it cannot name, or be made beside, host files."""
    target = world.targets()[kind]
    with pytest.raises(ImageError, match="does not exist in the image"):
        world.unpack([[directory("a"), symlink("a", target), hardlink("stolen", "a/victim-file")]])
    world.unpack(
        [[file("real", "image data"), directory("a"), symlink("a", target), hardlink("a/h", "real")]]
    )
    landed = world.dest / "outside" if kind == "relative" else world.dest / str(world.outside).lstrip("/")
    assert (landed / "h").read_text() == "image data"
    # the link made while `a` was a real directory goes with it when `a` is replaced
    world.unpack(
        [[file("real2", "r"), directory("b"), hardlink("b/victim-file", "real2"), symlink("b", target)]]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_whiteouts_through_a_planted_symlink(world: World, kind: str) -> None:
    target = world.targets()[kind]
    world.unpack([[directory("a"), symlink("a", target), file("a/.wh.victim"), file("a/.wh.victim-file")]])
    world.unpack([[symlink("b", target)], [file("b/.wh..wh..opq"), file("b/.wh.pipe")]])


def test_root_of_the_tree_is_never_followed(world: World, tmp_path: Path) -> None:
    """dest itself a symlink (a swapped staging dir): refused, nothing written where it points."""
    link = tmp_path / "swapped"
    link.symlink_to(world.outside)
    layout = tmp_path / "layouts" / "swap"
    build_layout(layout, [[file("victim-file", "pwned"), directory("victim", **HOSTILE_META)]], {}, tag=None)
    with pytest.raises(ImageError, match="not a directory"):
        unpack_layers(open_layout(str(layout)).layers, link)
    link.unlink()


# --- the fd walk itself: cache eviction, removal, repeated entries ------------------------------------


def test_entries_spread_over_more_directories_than_the_fd_cache_holds(world: World) -> None:
    dirs = [f"d{i}/sub" for i in range(150)]
    entries = [directory(d) for d in dirs]
    entries += [file(f"{d}/f{round_}", f"{d}-{round_}") for round_ in range(3) for d in dirs]  # interleaved
    stats = world.unpack([entries])
    assert stats.files == 450
    for d in dirs:
        assert sorted(os.listdir(world.dest / d)) == ["f0", "f1", "f2"]
        assert (world.dest / d / "f2").read_text() == f"{d}-2"


def test_a_replaced_directory_takes_its_cached_fds_with_it(world: World) -> None:
    world.unpack(
        [
            [
                file("d/sub/first", "1"),
                file("d", "now a file"),
                directory("d"),
                file("d/sub/second", "2"),
                symlink("e", "d"),
                file("e/sub/third", "3"),
            ]
        ]
    )
    assert sorted(os.listdir(world.dest / "d" / "sub")) == ["second", "third"]


def test_a_hard_link_whose_parents_are_created_past_the_fd_cache(world: World) -> None:
    deep = "/".join(f"n{i}" for i in range(100))
    world.unpack([[file("src", "shared"), hardlink(f"{deep}/link", "src")]])
    assert (world.dest / deep / "link").stat().st_ino == (world.dest / "src").stat().st_ino


def test_the_last_metadata_of_a_directory_listed_twice_wins(world: World) -> None:
    world.unpack([[directory("d", mode=0o700, uid=1), file("d/f"), directory("d", mode=0o750, uid=2)]])
    st = (world.dest / "d").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o750, 2)


def test_too_deep_or_too_long_paths_are_refused_in_one_line(world: World) -> None:
    with pytest.raises(ImageError, match="levels deep") as err:
        world.unpack([[file("/".join(["d"] * 600) + "/f")]])
    assert "\n" not in str(err.value)
    with pytest.raises(ImageError, match="too long") as err:
        world.unpack([[file("/".join(["x" * 200] * 30))]])
    assert "\n" not in str(err.value)


def test_the_deepest_allowed_tree_is_built_removed_and_measured(world: World) -> None:
    from bencher_runner.oci.unpack import MAX_DEPTH
    from bencher_runner.rootfs import tree_usage

    deep = "/".join(["d"] * (MAX_DEPTH - 1))
    world.unpack([[file(f"{deep}/f", "x")]])
    assert tree_usage(world.dest)[0] > 0  # the next step (mkfs) can walk it
    world.unpack([[file(".wh.d")]])
    assert os.listdir(world.dest) == []


# --- findings 7 and 11: every error is one UTF-8 line; out-of-range numbers are errors, not crashes --

BAD = "bad\udcffname\n\u2028x"  # an undecodable byte (as tarfile hands it over), a newline, U+2028


def raw_tar(*infos: tarfile.TarInfo) -> bytes:
    """A PAX tar of header-only entries, numbers written as given (PAX records for what does not fit)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for info in infos:
            tar.addfile(info)
    return buf.getvalue()


def tar_info(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    """A header; a float field that is not finite goes into a PAX record (tarfile cannot write it)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    pax: dict[str, str] = {}
    for key, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            pax[key] = str(value)
        else:
            setattr(info, key, value)
    info.pax_headers = pax
    return info


def assert_one_utf8_line(err: BaseException) -> str:
    text = str(err)
    text.encode("utf-8")  # what json.dumps(..., ensure_ascii=False) and the wire need
    assert len(text.splitlines()) == 1 and "\n" not in text, text
    return text


BAD_NAME_LAYERS: dict[str, list[LayerSpec]] = {
    "absolute": [[file("/" + BAD)]],
    "escaping": [[file("../" + BAD)]],
    "missing link target": [[hardlink("h", BAD)]],
    "link to a directory": [[directory(BAD), hardlink("h", BAD)]],
    "symlink loop": [[symlink(BAD, BAD), file(BAD + "/x")]],
    "not a directory": [[file(BAD), file(BAD + "/x")]],
    "name too long for the filesystem": [[file(BAD + "x" * 300)]],
    "too deep": [[file("/".join([BAD] * 600))]],
    "path too long": [[file("/".join([BAD + "y" * 200] * 25))]],
    "invalid whiteout": [[directory(BAD), file(BAD + "/.wh.")]],
    "unsupported type": [RawLayer(raw_tar(tar_info(BAD, b"Z")))],
    "uid out of range": [[file(BAD, uid=2**40)]],
    "non-directory root": [[symlink(BAD + "/..", "/")]],
}


@pytest.mark.parametrize("case", sorted(BAD_NAME_LAYERS))
def test_error_texts_quote_undecodable_names_on_one_utf8_line(world: World, case: str) -> None:
    with pytest.raises(ImageError) as err:
        world.unpack(BAD_NAME_LAYERS[case])
    text = assert_one_utf8_line(err.value)
    assert "\\xff" in text, text


def test_the_byte_budget_error_quotes_the_name_on_one_line(world: World) -> None:
    with pytest.raises(ImageError, match="more than") as err:
        world.unpack([[Entry(BAD, zeros=2 * 2**20)]], max_bytes=2**20)
    assert "\\xff" in assert_one_utf8_line(err.value)


@pytest.mark.parametrize("data", [b"this is not a tar archive" * 50, b"BZh91AY&SY" + bytes(100)])
def test_a_hostile_media_type_is_quoted_on_one_line(world: World, data: bytes) -> None:
    budget = ByteBudget(2**20)
    with pytest.raises(ImageError) as err:
        unpack_layer_stream(io.BytesIO(data), "x/" + BAD, world.dest, name="layer 1/1", budget=budget)
    assert "\\xff" in assert_one_utf8_line(err.value)


def test_skipped_device_names_are_printable(world: World) -> None:
    stats = world.unpack([[Entry(BAD, "chardev", devmajor=1, devminor=3)]])
    assert len(stats.skipped_devices) == 1
    assert_one_utf8_line(Exception(stats.skipped_devices[0]))


@pytest.mark.parametrize(
    ("field", "value"),
    [("uid", 2**40), ("gid", 2**40), ("uid", 2**32), ("uid", 2**32 - 1), ("uid", -5), ("gid", -1)],
)
@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE])
def test_ids_out_of_range_are_one_line_image_errors(
    world: World, field: str, value: int, kind: bytes
) -> None:
    """chown takes 0..2**32-2 (2**32-1 means "leave unchanged"): refused, as GNU tar reports them."""
    info = tar_info("entry", kind, linkname="target" if kind == tarfile.SYMTYPE else "", **{field: value})
    with pytest.raises(ImageError, match=rf"{field} {value} is out of range") as err:
        world.unpack([RawLayer(raw_tar(info))])
    assert_one_utf8_line(err.value)
    assert not os.path.lexists(world.dest / "entry")


@pytest.mark.parametrize("size", [-1, -(2**62)])
def test_a_negative_size_is_refused_not_refunded(world: World, size: int) -> None:
    with pytest.raises(ImageError, match="size") as err:
        world.unpack([RawLayer(raw_tar(tar_info("f", size=size)))], max_bytes=2**20)
    assert_one_utf8_line(err.value)


def test_a_huge_size_is_a_budget_error(world: World) -> None:
    with pytest.raises(ImageError, match="more than") as err:
        world.unpack([RawLayer(raw_tar(tar_info("f", size=2**70)))])
    assert_one_utf8_line(err.value)


EXT4_MIN_TIME, EXT4_MAX_TIME = -(2**31), 2**34 - 2**31 - 1


@pytest.mark.parametrize(
    ("mtime", "stored"),
    [
        (2**40, EXT4_MAX_TIME),
        (1e300, EXT4_MAX_TIME),
        (float("inf"), EXT4_MAX_TIME),
        (-(2**40), EXT4_MIN_TIME),
        (float("-inf"), EXT4_MIN_TIME),
        (float("nan"), 0),
        (-86400, -86400),  # before 1970 is fine
    ],
)
@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE])
def test_mtimes_are_clamped_to_what_ext4_stores(world: World, mtime: float, stored: int, kind: bytes) -> None:
    """As the kernel does when it writes a timestamp to an ext4 inode (1901-12-13 to 2446-05-10)."""
    info = tar_info("entry", kind, linkname="target" if kind == tarfile.SYMTYPE else "", mtime=mtime)
    world.unpack([RawLayer(raw_tar(info))])
    assert (world.dest / "entry").lstat().st_mtime == stored


# --- finding 5 (part): image files that are FIFOs never block -------------------------------------


def _without_hanging(fn: Callable[[], Any], fifos: Sequence[Path]) -> Any:
    """Run ``fn`` in a thread; fail (after unblocking it through ``fifos``) if it is still blocked."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    hung = thread.is_alive()
    if hung:
        for fifo in fifos:  # a writer lets a blocked open return, so the thread ends
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
    assert not hung, "blocked opening a FIFO"
    if errors:
        raise errors[0]
    return result[0]


@pytest.mark.parametrize("path", ["/etc/passwd", "etc/group", "/etc/../etc/passwd"])
def test_a_fifo_at_an_image_file_reads_as_absent(tmp_path: Path, path: str) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.mkfifo(root / "etc" / "passwd")
    os.mkfifo(root / "etc" / "group")
    fifos = [root / "etc" / "passwd", root / "etc" / "group"]
    assert _without_hanging(lambda: read_image_file(root, path), fifos) is None


def test_a_symlink_to_a_fifo_reads_as_absent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.mkfifo(root / "pipe")
    (root / "etc" / "passwd").symlink_to("/pipe")
    assert _without_hanging(lambda: read_image_file(root, "/etc/passwd"), [root / "pipe"]) is None


def test_an_image_file_is_read_up_to_its_limit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0::/:/bin/sh\n" * 100_000)
    text = read_image_file(root, "/etc/passwd", limit=1000)
    assert text is not None and len(text) == 1000


@pytest.mark.parametrize("working_dir", ["/pipe", "/pipe/sub", "/link/sub"])
def test_a_fifo_as_working_dir_fails_in_one_line_without_blocking(tmp_path: Path, working_dir: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe")
    (root / "link").symlink_to("pipe")
    with pytest.raises(ImageError, match="not a directory") as err:
        _without_hanging(lambda: ensure_directory(root, working_dir), [root / "pipe"])
    assert_one_utf8_line(err.value)


# --- found by tests/fuzz: NULs, empty symlink targets, a directory where a file is read ------------


@pytest.mark.parametrize(
    "info",
    [
        tar_info("a\0b"),
        tar_info("dir\0/x", tarfile.DIRTYPE),
        tar_info("link", tarfile.SYMTYPE, linkname="tar\0get"),
        tar_info("link", tarfile.SYMTYPE, linkname=""),
        tar_info("hard", tarfile.LNKTYPE, linkname="x\0y"),
    ],
    ids=["file name", "dir name", "symlink target", "empty symlink target", "hard link target"],
)
def test_nul_bytes_and_empty_symlink_targets_are_refused_in_one_line(
    world: World, info: tarfile.TarInfo
) -> None:
    info.pax_headers = {"path": info.name, **({"linkpath": info.linkname} if info.linkname else {})}
    with pytest.raises(UnsafeImageError) as err:
        world.unpack([RawLayer(raw_tar(info))])
    assert_one_utf8_line(err.value)


def test_nul_bytes_in_looked_up_paths(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    assert read_image_file(root, "/etc/pass\0wd") is None
    assert resolve_in_tree(root, "/etc\0") is None
    with pytest.raises(ImageError, match="NUL") as err:
        ensure_directory(root, "/work\0dir")
    assert_one_utf8_line(err.value)


def test_a_directory_where_a_file_is_read_reads_as_absent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "passwd").mkdir(parents=True)
    assert read_image_file(root, "/etc/passwd") is None
    assert read_image_file(root, "/") is None


def test_a_name_too_long_to_exist_is_absent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    long = "x" * 256
    assert resolve_in_tree(root, f"/{long}/a") is None
    assert resolve_in_tree(root, f"/{long}") is None
    assert read_image_file(root, f"/{long}/passwd") is None
