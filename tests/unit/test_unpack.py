"""Layer application: OCI semantics, and that hostile layers never reach outside ``dest``.

Every test builds its image in tmp_path, unpacks into tmp_path/dest and checks that a canary
directory next to dest (which hostile entries aim at) is byte-for-byte unchanged.
"""

import gzip
import hashlib
import io
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.oci.layout import open_layout
from bencher_runner.oci.unpack import ByteBudget, UnpackStats, unpack_layer_stream, unpack_layers
from bencher_runner.spec.errors import ImageError, UnsafeImageError
from tests.support.oci_builder import (
    OCI_LAYER,
    Entry,
    Layer,
    LayerSpec,
    RawLayer,
    build_layout,
    directory,
    file,
    hardlink,
    layer_bytes,
    layer_from_dir,
    symlink,
)

MIB = 1024 * 1024


def snapshot(root: Path, exclude: Path) -> dict[str, tuple[Any, ...]]:
    """Everything observable about the tree under ``root`` except ``exclude``."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != exclude]
        for name in [*dirnames, *filenames]:
            p = here / name
            st = p.lstat()
            extra: Any = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISDIR(st.st_mode):
                extra = sorted(os.listdir(p))
            out[str(p.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_nlink,
                st.st_size,
                st.st_mtime_ns,
                extra,
            )
    return out


@dataclass
class Env:
    tmp: Path  # layouts and source trees go here
    dest: Path  # world/dest
    canary: Path  # world/canary: what hostile entries aim at

    def layout(self) -> Path:
        return self.tmp / "layouts" / str(len(list((self.tmp / "layouts").glob("*"))))

    def unpack(self, layers: Sequence[LayerSpec], **kw: Any) -> UnpackStats:
        layout = self.layout()
        build_layout(layout, layers, {"Cmd": ["/bin/true"]}, tag=None, **kw)
        return unpack_layers(open_layout(str(layout)).layers, self.dest)

    def unpack_max(self, layers: Sequence[LayerSpec], max_bytes: int) -> UnpackStats:
        layout = self.layout()
        build_layout(layout, layers, {}, tag=None)
        return unpack_layers(open_layout(str(layout)).layers, self.dest, max_bytes=max_bytes)

    def inside(self, host_path: Path | str) -> Path:
        """Where an absolute image path lands in dest."""
        return self.dest / str(host_path).lstrip("/")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    world = tmp_path / "world"
    dest = world / "dest"
    dest.mkdir(parents=True)
    canary = world / "canary"
    canary.mkdir()
    (canary / "victim").write_text("precious")
    (canary / "sub").mkdir()
    (canary / "sub" / "deep").write_text("also precious")
    (canary / "passwd").write_text("root:x:0:0\n")
    (tmp_path / "layouts").mkdir()
    before = snapshot(world, dest)
    parent_before = sorted(os.listdir(tmp_path.parent))
    passwd = os.stat("/etc/passwd")
    yield Env(tmp_path, dest, canary)
    assert snapshot(world, dest) == before, "something outside dest changed"
    assert sorted(os.listdir(tmp_path.parent)) == parent_before
    after = os.stat("/etc/passwd")
    assert (after.st_nlink, after.st_ino, after.st_mtime_ns) == (
        passwd.st_nlink,
        passwd.st_ino,
        passwd.st_mtime_ns,
    )


def all_paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- hostile names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../escaped", "./../escaped", "/etc/bencher-unpack-test", "a/../../escaped"]
)
def test_escaping_entry_names_refused(env: Env, name: str) -> None:
    with pytest.raises(UnsafeImageError) as err:
        env.unpack([[file("ok", "x"), file(name, "pwned")]])
    assert name in str(err.value) and "rebuild" in str(err.value)
    assert not Path("/etc/bencher-unpack-test").exists()
    assert not (env.dest.parent / "escaped").exists()


@pytest.mark.parametrize("kind", ["absolute", "relative", "deep-relative"])
def test_planted_symlink_then_file_under_it(env: Env, kind: str) -> None:
    target = {
        "absolute": str(env.canary),
        "relative": "../canary",  # from dest/evil this would be world/canary on the host
        "deep-relative": "../" * 20 + str(env.canary).lstrip("/"),
    }[kind]
    env.unpack(
        [[symlink("evil", target)], [file("evil/pwned", "gotcha"), file("evil/victim", "overwritten")]]
    )
    assert os.readlink(env.dest / "evil") == target  # stored verbatim
    landed = env.inside(env.canary) if kind != "relative" else env.dest / "canary"
    assert (landed / "pwned").read_text() == "gotcha"
    assert (landed / "victim").read_text() == "overwritten"


def test_whiteout_through_planted_symlink(env: Env) -> None:
    inner = env.inside(env.canary)
    env.unpack(
        [[symlink("evil", str(env.canary)), file(f"{inner.relative_to(env.dest)}/victim", "in-image")]]
    )
    assert (inner / "victim").exists()
    env.unpack([[file("evil/.wh.victim"), file("evil/.wh.sub")]])
    assert not (inner / "victim").exists()  # the whiteout resolved inside dest
    assert (env.canary / "victim").exists() and (env.canary / "sub" / "deep").exists()


def test_whiteout_of_symlink_removes_the_link_not_its_target(env: Env) -> None:
    env.unpack(
        [
            [
                directory("data"),
                file("data/keep", "k"),
                symlink("link", "data"),
                symlink("out", str(env.canary)),
            ]
        ]
    )
    env.unpack([[file(".wh.link"), file(".wh.out")]])
    assert not os.path.lexists(env.dest / "link") and not os.path.lexists(env.dest / "out")
    assert (env.dest / "data" / "keep").exists()


def test_opaque_whiteout_through_planted_symlink(env: Env) -> None:
    env.unpack([[symlink("evil", str(env.canary))], [file("evil/.wh..wh..opq")]])
    env.unpack([[symlink("rel", "../../canary")], [file("rel/.wh..wh..opq"), file("rel/new", "n")]])
    assert (env.dest / "canary" / "new").read_text() == "n"


def test_hardlink_to_absolute_path_refused(env: Env) -> None:
    with pytest.raises(UnsafeImageError, match="absolute"):
        env.unpack([[hardlink("stolen", "/etc/passwd")]])
    with pytest.raises(UnsafeImageError, match="escapes"):
        env.unpack([[hardlink("stolen", "../canary/passwd")]])
    assert not os.path.lexists(env.dest / "stolen")


def test_hardlink_through_planted_symlink_missing_inside(env: Env) -> None:
    with pytest.raises(UnsafeImageError, match="does not exist"):
        env.unpack([[symlink("evil", "/etc")], [hardlink("stolen", "evil/passwd")]])
    assert not os.path.lexists(env.dest / "stolen")


def test_hardlink_through_planted_symlink_links_inside(env: Env) -> None:
    env.unpack([[directory("etc"), file("etc/passwd", "image passwd"), symlink("evil", "/etc")]])
    env.unpack([[hardlink("stolen", "evil/passwd")]])
    stolen = (env.dest / "stolen").lstat()
    assert stolen.st_ino == (env.dest / "etc" / "passwd").lstat().st_ino and stolen.st_nlink == 2
    assert (env.dest / "stolen").read_text() == "image passwd"


def test_hardlink_to_directory_refused(env: Env) -> None:
    with pytest.raises(UnsafeImageError, match="directory"):
        env.unpack([[directory("d"), hardlink("x", "d")]])


def test_hardlink_to_symlink_links_the_symlink(env: Env) -> None:
    env.unpack(
        [
            [
                symlink("s", str(env.canary / "victim")),
                hardlink("h", "s"),
                file("f", "data"),
                hardlink("g", "f"),
            ]
        ]
    )
    assert os.readlink(env.dest / "h") == str(env.canary / "victim")
    assert (env.dest / "g").lstat().st_ino == (env.dest / "f").lstat().st_ino


@pytest.mark.parametrize("links", [[("a", "b"), ("b", "a")], [("loop", "loop")], [("x", "/x")]])
def test_symlink_loop_refused(env: Env, links: list[tuple[str, str]]) -> None:
    first = links[0][0]
    with pytest.raises(UnsafeImageError, match="symbolic links"):
        env.unpack([[symlink(n, t) for n, t in links], [file(f"{first}/inside", "x")]])


def test_new_entry_replaces_symlink_instead_of_writing_through(env: Env) -> None:
    env.unpack([[symlink("f", str(env.canary / "victim")), symlink("d", str(env.canary))]])
    env.unpack([[file("f", "replaced"), directory("d", mode=0o700), file("d/x", "x")]])
    assert stat.S_ISREG((env.dest / "f").lstat().st_mode) and (env.dest / "f").read_text() == "replaced"
    d = (env.dest / "d").lstat()
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o700
    assert (env.dest / "d" / "x").read_text() == "x"


@pytest.mark.parametrize("kind", ["fifo", "symlink", "dir"])
def test_other_types_replace_planted_symlink(env: Env, kind: str) -> None:
    env.unpack([[symlink("p", str(env.canary / "victim"))]])
    new = {"fifo": Entry("p", "fifo"), "symlink": symlink("p", "elsewhere"), "dir": directory("p")}[kind]
    env.unpack([[new]])
    st = (env.dest / "p").lstat()
    assert {"fifo": stat.S_ISFIFO, "symlink": stat.S_ISLNK, "dir": stat.S_ISDIR}[kind](st.st_mode)


def test_oversized_pax_header_refused(env: Env) -> None:
    with pytest.raises(UnsafeImageError, match="metadata header"):
        env.unpack([[Entry("f", xattrs={"user.big": b"x" * (2 * MIB)})]])


# --- node types and metadata -------------------------------------------------------------------------


def test_device_nodes_skipped_and_fifo_created(env: Env) -> None:
    stats = env.unpack(
        [
            [
                directory("dev"),
                Entry("dev/null", "chardev", mode=0o666, devmajor=1, devminor=3),
                Entry("dev/sda", "blockdev", mode=0o660, devmajor=8, devminor=0),
                hardlink("dev/sda-again", "dev/sda"),
                Entry("run/pipe", "fifo", mode=0o620, uid=7, gid=8),
            ]
        ]
    )
    assert stats.skipped_devices == ["/dev/null", "/dev/sda", "/dev/sda-again"]
    assert not os.path.lexists(env.dest / "dev" / "null") and not os.path.lexists(env.dest / "dev" / "sda")
    st = (env.dest / "run" / "pipe").lstat()
    assert (
        stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620 and (st.st_uid, st.st_gid) == (7, 8)
    )


def test_modes_ownership_mtime_xattrs_kept(env: Env) -> None:
    stats = env.unpack(
        [
            [
                directory("usr/bin", mode=0o755, uid=3, gid=4, mtime=1_000_000),
                file("usr/bin/su", "su", mode=0o4755, uid=0, gid=0),
                file("usr/bin/wall", "w", mode=0o2755, uid=1000, gid=5),
                file("home/u/.profile", "p", mode=0o600, uid=1234, gid=5678, mtime=1_234_567_890),
                directory("tmp", mode=0o1777),
                directory("ro", mode=0o555),
                file("ro/inside", "filled after", mode=0o444),
                symlink("home/u/link", "/nowhere", uid=1234, gid=5678),
                Entry("cap", data=b"c", xattrs={"user.note": b"hello", "user.bin": b"\xff\x00"}),
            ]
        ]
    )
    assert (stats.files, stats.dirs, stats.symlinks, stats.bytes) == (5, 3, 1, len("suwpfilled afterc"))

    def mode(p: str) -> int:
        return stat.S_IMODE((env.dest / p).lstat().st_mode)

    assert mode("usr/bin/su") == 0o4755 and mode("usr/bin/wall") == 0o2755
    assert mode("tmp") == 0o1777 and mode("ro") == 0o555 and mode("ro/inside") == 0o444
    assert mode("usr") == 0o755  # implicit parent
    st = (env.dest / "usr/bin/wall").lstat()
    assert (st.st_uid, st.st_gid) == (1000, 5)
    st = (env.dest / "home/u/.profile").lstat()
    assert (st.st_uid, st.st_gid, int(st.st_mtime)) == (1234, 5678, 1_234_567_890)
    st = (env.dest / "home/u/link").lstat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    st = (env.dest / "usr/bin").lstat()
    assert (st.st_uid, st.st_gid, int(st.st_mtime)) == (3, 4, 1_000_000)  # applied after its children
    assert os.getxattr(env.dest / "cap", "user.note") == b"hello"
    assert os.getxattr(env.dest / "cap", "user.bin") == b"\xff\x00"


def test_layer_from_dir_round_trip(env: Env) -> None:
    src = env.tmp / "src-tree"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chmod(src / "bin" / "tool", 0o750)
    os.symlink("bin/tool", src / "alias")
    env.unpack([layer_from_dir(src, prefix="opt")])
    assert (env.dest / "opt/bin/tool").read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE((env.dest / "opt/bin/tool").stat().st_mode) == 0o750
    assert os.readlink(env.dest / "opt/alias") == "bin/tool"


# --- OCI layer semantics -----------------------------------------------------------------------------


def test_whiteouts_across_layers(env: Env) -> None:
    stats = env.unpack(
        [
            [file("a/b/c", "c"), file("a/keep", "k"), file("top", "t"), symlink("ln", "a")],
            [file("a/.wh.b"), file(".wh.top"), file(".wh.ln"), file(".wh.never-existed")],
        ]
    )
    assert all_paths(env.dest) == {"a", "a/keep"}
    assert stats.whiteouts == 4


def test_whiteout_does_not_hide_same_layer_entry(env: Env) -> None:
    env.unpack([[file("x", "old")], [file("x", "new"), file(".wh.x")]])
    assert (env.dest / "x").read_text() == "new"


@pytest.mark.parametrize("opaque_first", [True, False])
def test_opaque_whiteout(env: Env, opaque_first: bool) -> None:
    lower = [
        file("d/old", "o"),
        file("d/sub/old2", "o"),
        file("d/sub/keep-name", "lower"),
        file("other", "x"),
    ]
    upper_entries = [directory("d"), file("d/new", "n"), file("d/sub/keep-name", "upper")]
    opq = file("d/.wh..wh..opq")
    upper = [opq, *upper_entries] if opaque_first else [*upper_entries, opq]
    env.unpack([lower, upper])
    assert all_paths(env.dest) == {"d", "d/new", "d/sub", "d/sub/keep-name", "other"}
    assert (env.dest / "d/sub/keep-name").read_text() == "upper"


def test_opaque_keeps_same_layer_directory_but_hides_its_lower_children(env: Env) -> None:
    env.unpack(
        [[file("d/sub/lower", "l")], [directory("d/sub"), file("d/sub/upper", "u"), file("d/.wh..wh..opq")]]
    )
    assert all_paths(env.dest) == {"d", "d/sub", "d/sub/upper"}


def test_file_replaces_directory_and_back(env: Env) -> None:
    env.unpack(
        [
            [file("x/child", "c"), directory("x/sub"), file("y", "file")],
            [file("x", "now a file"), directory("y"), file("y/inner", "i")],
        ]
    )
    assert (env.dest / "x").read_text() == "now a file"
    assert (env.dest / "y" / "inner").read_text() == "i"


def test_directory_over_directory_keeps_children(env: Env) -> None:
    env.unpack([[directory("d", mode=0o755), file("d/lower", "l")], [directory("d", mode=0o700, uid=9)]])
    st = (env.dest / "d").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 9
    assert (env.dest / "d" / "lower").exists()


def test_dot_slash_names_and_root_entry(env: Env) -> None:
    env.unpack([[directory(".", mode=0o700), directory("./etc"), file("./etc/hostname", "h")]])
    assert (env.dest / "etc" / "hostname").read_text() == "h"
    assert stat.S_IMODE(env.dest.stat().st_mode) == 0o755  # the root's metadata is the runner's


def test_non_directory_root_entry_refused(env: Env) -> None:
    with pytest.raises(UnsafeImageError, match="root"):
        env.unpack([[symlink("./", "/")]])


# --- compression and size limits ---------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compressions(env: Env, compression: str) -> None:
    data = os.urandom(3 * MIB)
    env.unpack([[file("blob", data), file("small", "s")]], compression=compression)
    assert (env.dest / "blob").read_bytes() == data


@pytest.mark.parametrize(
    ("actual", "label"), [("zstd", "gzip"), ("gzip", "zstd"), ("gzip", "none"), ("none", "gzip")]
)
def test_mislabeled_layer_still_works(env: Env, actual: str, label: str) -> None:
    media_type = OCI_LAYER + ("" if label == "none" else f"+{label}")
    env.unpack([Layer([file("f", "content")], compression=actual, media_type=media_type)])  # type: ignore[arg-type]
    assert (env.dest / "f").read_text() == "content"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"this is not a tar archive at all" * 40, "not a readable tar archive"),
        (gzip.compress(b"garbage" * 100), "not a readable tar archive"),
        (layer_bytes([file("f", os.urandom(100_000))])[:5000], "corrupt"),
        (b"BZh91AY&SY" + b"\0" * 100, "bzip2"),
    ],
)
def test_unreadable_layer_fails_clearly(env: Env, data: bytes, match: str) -> None:
    with pytest.raises(ImageError, match=match) as err:
        env.unpack([RawLayer(data)])
    assert "layer 1/1 sha256:" in str(err.value)


def test_empty_layer_is_fine(env: Env) -> None:
    stats = env.unpack(
        [RawLayer(b"", media_type=OCI_LAYER), RawLayer(gzip.compress(b"\0" * 1024)), [file("f")]]
    )
    assert stats.files == 1


def test_decompression_bomb_stops_early(env: Env) -> None:
    layout = env.layout()
    build_layout(layout, [[file("small", "s"), Entry("big", zeros=200 * MIB)]], {}, tag=None)
    image = open_layout(str(layout))
    assert image.layers[0].size < 2 * MIB
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=r"more than 10485760 bytes \(limit 10 MiB") as err:
        unpack_layers(image.layers, env.dest, max_bytes=10 * MIB)
    assert time.monotonic() - t0 < 5
    assert '"big"' in str(err.value)
    assert not os.path.lexists(env.dest / "big")


def test_budget_is_shared_across_layers_and_files(env: Env) -> None:
    layers = [[file(f"f{layer}-{i}", bytes(MIB)) for i in range(4)] for layer in range(4)]
    with pytest.raises(ImageError, match="more than"):
        env.unpack_max(layers, max_bytes=10 * MIB)
    total = sum(p.stat().st_size for p in env.dest.rglob("*") if p.is_file())
    assert total <= 10 * MIB


def test_unpack_layer_stream_directly(env: Env) -> None:
    budget = ByteBudget(MIB)
    blob = layer_bytes([file("a", "1"), directory("d")], "zstd")
    stats = unpack_layer_stream(
        io.BytesIO(blob), OCI_LAYER + "+zstd", env.dest, name="layer x", budget=budget
    )
    assert (stats.files, stats.dirs, budget.used) == (1, 1, 1)
    unpack_layer_stream(
        io.BytesIO(layer_bytes([file("b", "22")], "none")),
        OCI_LAYER,
        env.dest,
        name="y",
        budget=budget,
        stats=stats,
    )
    assert (stats.files, budget.used) == (2, 3)


class TestImageFiles:
    """Reading /etc/passwd and creating the working dir resolve inside the tree, as the guest would."""

    def test_read_follows_symlinks_inside_the_tree(self, tmp_path: Path) -> None:
        from bencher_runner.oci.unpack import read_image_file

        root = tmp_path / "root"
        (root / "real").mkdir(parents=True)
        (root / "real" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        (root / "etc").symlink_to("/real")  # absolute: means <root>/real, not the host's /real
        assert read_image_file(root, "/etc/passwd") == "root:x:0:0::/root:/bin/sh\n"
        (root / "real" / "group").symlink_to("../../../../etc/group")  # climbs stop at the root
        assert read_image_file(root, "/etc/group") is None
        assert read_image_file(root, "/nope/x") is None

    def test_read_never_reads_host_files(self, tmp_path: Path) -> None:
        from bencher_runner.oci.unpack import read_image_file

        root = tmp_path / "root"
        root.mkdir()
        (root / "etc").symlink_to("/etc")
        assert read_image_file(root, "/etc/passwd") is None  # the host's /etc/passwd exists; not read

    def test_working_dir_is_created_inside_the_tree(self, tmp_path: Path) -> None:
        from bencher_runner.oci.unpack import ensure_directory

        root = tmp_path / "root"
        outside = tmp_path / "outside"
        root.mkdir()
        outside.mkdir()
        (root / "work").symlink_to(str(outside))
        ensure_directory(root, "/work/sub")
        assert (root / str(outside).lstrip("/") / "sub").is_dir()
        assert list(outside.iterdir()) == []
