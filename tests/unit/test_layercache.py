"""Incremental root disks (layercache.py): a disk built from a cached base of the lower layers plus the
new layers must be, as the guest sees it, the disk a full unpack of the same image builds.

Each case builds one image of lower + upper layers three ways and compares the guest's view of the
disks (mounted read-only in a private mount namespace): every path, its type, mode, owner, mtime,
size, contents or link target, xattrs and hard-link group.

- reference: every layer unpacked into one tree, WorkingDir created, ``mkfs.ext4 -d`` (the full path);
- job: ``Job._build_template`` on the lower image (cold), then on the whole image (incremental);
- the cold build of the whole image on an empty cache (a base of its lower layers, then its top
  layer applied to a copy, when that layer is small).
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.job import Job, Reporter
from bencher_runner.layercache import (
    MAX_CHAINS,
    ChainCache,
    IncrementalUnavailable,
    apply_layers,
    chain_ids,
    in_private_mounts,
    incremental_supported,
)
from bencher_runner.oci.layout import LayerRef, open_layout
from bencher_runner.oci.unpack import ByteBudget, ensure_directory, unpack_layers
from bencher_runner.rootfs import TemplateCache, build_rootfs, template_key
from bencher_runner.spec.config import make_run_config
from bencher_runner.spec.errors import ImageError
from bencher_runner.spec.units import MIB
from tests.support.oci_builder import (
    Entry,
    RawLayer,
    build_layout,
    directory,
    file,
    hardlink,
    layer_bytes,
    symlink,
)

pytestmark = pytest.mark.skipif(
    incremental_supported() is not None, reason=f"no loop mounts here: {incremental_supported()}"
)

DISK_MIB = 64
XATTRS = {
    "user.note": b"kept",
    "trusted.overlay.x": b"y",
    "security.capability": b"\x01\x00\x00\x02" + bytes(16),
}


# --- the guest's view of a disk ---------------------------------------------------------------------


def _xattrs(path: Path) -> dict[str, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def tree_view(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root``: type and mode, owner, mtime, size, contents/target, xattrs, and
    its hard-link group (the sorted paths sharing its inode)."""
    entries: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            path = Path(dirpath, name)
            entries["/" if path == root else f"/{path.relative_to(root)}"] = path.lstat()
    groups: dict[int, list[str]] = {}
    for rel, st in entries.items():
        groups.setdefault(st.st_ino, []).append(rel)
    out: dict[str, tuple[Any, ...]] = {}
    for rel, st in entries.items():
        path = root / rel.lstrip("/")
        if stat.S_ISREG(st.st_mode):
            data: Any = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            data = os.readlink(path)
        else:
            data = None
        size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
        mtime = st.st_mtime_ns
        group = tuple(sorted(groups[st.st_ino])) if not stat.S_ISDIR(st.st_mode) else None
        out[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, mtime, size, data, _xattrs(path), group)
    return out


def disk_view(disk: Path) -> dict[str, tuple[Any, ...]]:
    def read() -> dict[str, tuple[Any, ...]]:
        mnt = Path(tempfile.mkdtemp(prefix="disk-view-"))
        try:
            subprocess.run(
                ["mount", "-t", "ext4", "-o", "ro,noload,loop", str(disk), str(mnt)],
                check=True,
                capture_output=True,
            )
            try:
                return tree_view(mnt)
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
        finally:
            mnt.rmdir()

    return in_private_mounts(read)


View = dict[str, tuple[Any, ...]]
MTIME = 3  # the field of a view entry


def assert_same(got: View, want: View, built_after: float) -> None:
    """``got`` is ``want`` in everything, but for the mtime of a directory that a later layer or the
    runner changed after its metadata was set (the root, lost+found, a whiteout's parent, a new
    WorkingDir and its parents): that is the time of the build (``want``'s was built after
    ``built_after``, a time.time()), in both."""
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    assert not missing and not extra, f"missing {missing}, extra {extra}"
    since = int(built_after) * 10**9  # mkfs.ext4 -d keeps whole seconds

    def comparable(entry: tuple[Any, ...], build_time: bool) -> tuple[Any, ...]:
        return _without_mtime(entry) if build_time else entry

    differ = {}
    for key in want:
        build_time = want[key][0].startswith("d") and want[key][MTIME] >= since
        if build_time:
            assert got[key][MTIME] >= since, f"{key}: the build's time in a full build, not here: {got[key]}"
        if comparable(got[key], build_time) != comparable(want[key], build_time):
            differ[key] = (got[key], want[key])
    assert not differ, differ


def _without_mtime(entry: tuple[Any, ...]) -> tuple[Any, ...]:
    return entry[:MTIME] + entry[MTIME + 1 :]


# --- building the disks -----------------------------------------------------------------------------


def build_image(layout: Path, layers: Sequence[Sequence[Entry]], config: dict[str, Any], tag: str) -> None:
    """An image in ``layout``: gzip layers written in memory, so equal entries make equal blobs (a
    layer written to a named file carries that name in its gzip header)."""
    build_layout(layout, [RawLayer(layer_bytes(entries)) for entries in layers], config, tag=tag)


def reference_disk(tmp: Path, layers: Sequence[LayerRef], working_dir: str) -> Path:
    """The full path: every layer into one tree (the job's disk budget), WorkingDir, mkfs.ext4 -d."""
    tree = Path(tempfile.mkdtemp(prefix="full-tree-", dir=tmp))
    unpack_layers(layers, tree, budget=ByteBudget(DISK_MIB * MIB, disk_mib=DISK_MIB))
    ensure_directory(tree, working_dir)
    disk = tmp / f"{tree.name}.ext4"
    build_rootfs(tree, disk, DISK_MIB, allocate=False)
    return disk


class Recorder(Reporter):
    def __init__(self) -> None:
        self.phases: list[str] = []
        self.warnings: list[str] = []

    def phase(self, text: str) -> None:
        self.phases.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)


def job_template(tmp: Path, cache: Path, ref: str) -> tuple[Path, dict[str, Any], Recorder]:
    image = open_layout(ref)
    reporter = Recorder()
    job = Job(make_run_config(image=ref, disk_mib=DISK_MIB), cache=cache, reporter=reporter)
    work = Path(tempfile.mkdtemp(prefix="job-", dir=tmp))
    templates = TemplateCache(cache)
    template = job.disks.build_template(work, image, templates, template_key(image.manifest_digest, DISK_MIB))
    meta = job.ctx.metadata["root_disk"]
    assert isinstance(meta, dict)
    return template.disk, meta, reporter


def check_case(
    tmp: Path, lower: Sequence[Sequence[Entry]], upper: Sequence[Sequence[Entry]], config: dict[str, Any]
) -> None:
    layout = tmp / "layout"
    build_image(layout, lower, config, tag="lower")
    build_image(layout, [*lower, *upper], config, tag="upper")
    whole = open_layout(f"{layout}:upper")
    working_dir = config.get("WorkingDir") or "/"
    started = time.time()
    want = disk_view(reference_disk(tmp, whole.layers, working_dir))

    cache = tmp / "cache"
    _, meta, _ = job_template(tmp, cache, f"{layout}:lower")
    assert meta["built"] == "full"
    disk, meta, _ = job_template(tmp, cache, f"{layout}:upper")
    assert meta["built"] == "incremental"
    assert meta["cached_layers"] + meta["applied_layers"] == len(lower) + len(upper)
    if working_dir == "/":  # the lower image's disk is the base of its whole chain
        assert meta["cached_layers"] == len(lower)
    assert_same(disk_view(disk), want, started)

    disk, meta, _ = job_template(tmp, tmp / "cold-cache", f"{layout}:upper")  # nothing cached
    assert meta["built"] == "full"
    assert_same(disk_view(disk), want, started)


# --- the cases ----------------------------------------------------------------------------------------

BASE: list[Entry] = [
    directory("etc"),
    file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nbench:x:1000:1000::/home/bench:/bin/sh\n"),
    file("etc/group", "root:x:0:\nbench:x:1000:\n"),
    directory("usr/lib", mode=0o755),
    file("usr/lib/libc.so", b"\x7fELF" + bytes(5000), mode=0o755),
    file("usr/bin/tool", "#!/bin/sh\n", mode=0o4755, uid=0, gid=0),
    file("big", bytes(300_000) + b"tail"),
]
LOWER_PADDING = [file("padding.bin", os.urandom(256 * 1024))]  # the top layers are small next to it


def test_whiteouts_across_the_layer_boundary(tmp_path: Path) -> None:
    lower = [
        [
            *BASE,
            directory("etc/conf.d"),
            file("etc/conf.d/a", "a"),
            file("etc/conf.d/b", "b"),
            directory("var/cache/apt"),
        ],
        [file("var/cache/apt/pkg.bin", bytes(4096)), file("etc/motd", "hi"), *LOWER_PADDING],
    ]
    upper = [
        [
            file("etc/conf.d/.wh.a"),  # a file of the base
            file("var/cache/.wh.apt"),  # a directory of the base, with what is in it
            file("etc/.wh.never-existed"),
            file("etc/motd", "replaced", mode=0o600, uid=1000, gid=1000),
        ]
    ]
    check_case(tmp_path, lower, upper, {})


def test_opaque_directories_across_the_layer_boundary(tmp_path: Path) -> None:
    lower = [
        [*BASE, directory("opt/app/sub"), file("opt/app/x", "x"), file("opt/app/sub/y", "y"), *LOWER_PADDING],
    ]
    upper = [
        [
            directory("opt/app", mode=0o750, uid=1000),
            file("opt/app/.wh..wh..opq"),
            file("opt/app/new", "new"),
        ],
        [file("opt/app/sub2/z", "z"), file("usr/lib/.wh..wh..opq")],  # a second new layer: opaque again
    ]
    check_case(tmp_path, lower, upper, {})


def test_hard_links_across_the_layer_boundary(tmp_path: Path) -> None:
    lower = [
        [
            *BASE,
            file("data/a", "shared", uid=7, gid=8, mode=0o640),
            hardlink("data/b", "data/a"),
            *LOWER_PADDING,
        ],
    ]
    upper = [
        [
            hardlink("usr/bin/tool2", "usr/bin/tool"),  # a new link to a base file
            hardlink("data/c", "data/b"),
            file("data/.wh.a"),  # one of the base's links goes; the others stay one inode
            file("data/new", "n"),
            hardlink("data/new-link", "data/new"),
        ]
    ]
    check_case(tmp_path, lower, upper, {})


def test_symlinks_across_the_layer_boundary(tmp_path: Path) -> None:
    lower = [
        [
            *BASE,
            symlink("lib", "usr/lib"),
            symlink("abs", "/usr/lib"),
            symlink("dangling", "/nowhere"),
            *LOWER_PADDING,
        ],
    ]
    upper = [
        [
            file("lib/through-relative.so", "r"),  # resolved through the base's symlink: lands in usr/lib
            file("abs/through-absolute.so", "a"),
            symlink("dangling", "usr/bin/tool"),  # a symlink replaced
            symlink("new-link", "../etc/passwd"),
            directory("usr/lib", mode=0o700),  # metadata of a directory reached through links
        ]
    ]
    check_case(tmp_path, lower, upper, {})


def test_metadata_xattrs_replacements_and_the_working_dir(tmp_path: Path) -> None:
    lower = [
        [
            *BASE,
            directory("srv/old-dir"),
            file("srv/old-dir/f", "f"),
            file("srv/old-file", "f"),
            *LOWER_PADDING,
        ],
        [Entry("etc/caps", "file", data=b"c", xattrs=XATTRS)],
    ]
    upper = [
        [
            file("srv/old-dir", "now a file"),  # a base directory replaced by a file
            directory("srv/old-file", mode=0o1777),  # a base file replaced by a directory
            Entry(
                "etc/new-caps",
                "file",
                data=b"n",
                mode=0o2755,
                uid=3,
                gid=4,
                xattrs=XATTRS,
                mtime=1_600_000_000,
            ),
            Entry("ro", "dir", mode=0o555, xattrs={"user.dir": b"1"}),
            file("ro/inside", "filled after its mode"),
            Entry("dev/null", "chardev", devmajor=1, devminor=3),  # skipped, as in a full unpack
            Entry("run/fifo", "fifo", mode=0o620),
        ]
    ]
    check_case(tmp_path, lower, upper, {"WorkingDir": "/home/bench/src"})


def test_the_job_warns_of_skipped_devices_of_the_cached_layers_too(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    lower = [[*BASE, Entry("dev/sda", "blockdev", devmajor=8), *LOWER_PADDING]]
    build_image(layout, lower, {}, tag="lower")
    build_image(layout, [*lower, [Entry("dev/tty", "chardev", devmajor=5)]], {}, tag="upper")
    cache = tmp_path / "cache"
    _, _, cold = job_template(tmp_path, cache, f"{layout}:lower")
    _, meta, incremental = job_template(tmp_path, cache, f"{layout}:upper")
    assert meta["built"] == "incremental"
    assert any("/dev/sda" in w for w in cold.warnings)
    assert any("2 device node(s)" in w and "/dev/sda" in w and "/dev/tty" in w for w in incremental.warnings)


def test_a_new_commit_changing_only_the_top_layer_is_incremental(tmp_path: Path) -> None:
    """The CI case: same lower layers, a new small top layer per commit. The first commit's cold build
    leaves a base of its lower layers, so the second commit applies only its own top layer."""
    layout = tmp_path / "layout"
    lower = [[*BASE, *LOWER_PADDING]]
    build_image(layout, [*lower, [file("app/main.py", "v1")]], {}, tag="v1")
    build_image(layout, [*lower, [file("app/main.py", "v2"), file("app/new.py", "n")]], {}, tag="v2")
    cache = tmp_path / "cache"
    # Before every build compared below, the base included: the v2 disk keeps the base's build time on
    # directories its own layer does not touch (the root's lost+found), the reference its own.
    started = time.time()
    _, meta, _ = job_template(tmp_path, cache, f"{layout}:v1")
    assert meta == {"built": "full", "layers": 2, "base_layers": 1}
    disk, meta, reporter = job_template(tmp_path, cache, f"{layout}:v2")
    assert meta == {"built": "incremental", "cached_layers": 1, "applied_layers": 1}
    assert any(
        "64 MiB ext4 root disk from the cached disk of its lower 1 layer(s) and 1 new" in p
        for p in reporter.phases
    )
    want = disk_view(reference_disk(tmp_path, open_layout(f"{layout}:v2").layers, "/"))
    assert_same(disk_view(disk), want, started)


# --- hostile layers on the incremental path -------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    return tree_view(root)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """world/dest (the mount point of the disk being built) next to world/outside, which hostile
    symlinks aim at; nothing under world/outside may change."""
    dest, outside = tmp_path / "world" / "dest", tmp_path / "world" / "outside"
    dest.mkdir(parents=True)
    (outside / "victim" / "deep").mkdir(parents=True)
    (outside / "victim-file").write_text("precious")
    os.mkfifo(outside / "pipe")
    before = _snapshot(outside)
    yield dest, outside
    assert _snapshot(outside) == before, "something outside the disk changed"


def targets(outside: Path) -> dict[str, str]:
    return {
        "absolute": str(outside),
        "relative": "../outside",
        "climbing": "../" * 12 + str(outside).lstrip("/"),
    }


def incremental_and_full(
    tmp: Path, dest: Path, lower: Sequence[Sequence[Entry]], upper: Sequence[Sequence[Entry]]
) -> tuple[dict[str, tuple[Any, ...]] | str, dict[str, tuple[Any, ...]] | str]:
    """The disk (or error text) of ``upper`` applied onto a base of ``lower``, and of a full unpack."""
    layout = tmp / f"layout-{len(os.listdir(tmp))}"
    build_image(layout, [*lower, *upper], {}, tag="x")
    layers = open_layout(f"{layout}:x").layers
    tree = Path(tempfile.mkdtemp(dir=tmp))
    budget = ByteBudget(DISK_MIB * MIB, disk_mib=DISK_MIB)
    unpack_layers(layers[: len(lower)], tree, budget=budget)
    base = tmp / f"{tree.name}.ext4"
    build_rootfs(tree, base, DISK_MIB, allocate=False)
    built = tmp / f"{tree.name}-incremental.ext4"
    incremental: View | str
    try:
        apply_layers(
            base,
            built,
            dest,
            layers[len(lower) :],
            budget=budget,
            first=len(lower) + 1,
            total=len(layers),
            working_dir="/",
        )
        incremental = disk_view(built)
    except ImageError as err:
        assert not built.exists(), "a failed build leaves no disk behind"
        incremental = str(err)
    full: View | str
    try:
        full = disk_view(reference_disk(tmp, layers, "/"))
    except ImageError as err:
        full = str(err)
    assert os.listdir(dest) == [], "the mount point stays empty in the host's namespace"
    return incremental, full


KINDS = ["absolute", "relative", "climbing"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_symlink_in_the_cached_base_never_leads_outside(
    tmp_path: Path, world: tuple[Path, Path], kind: str
) -> None:
    dest, outside = world
    target = targets(outside)[kind]
    lower = [[directory("a"), symlink("a", target), symlink("b", target)]]
    upper = [
        [
            directory("a/victim", mode=0o777, uid=4242),
            file("a/victim-file", "overwritten", mode=0o777),
            file("a/new", "new"),
            Entry("a/pipe", "fifo"),
            file("b/.wh.victim-file"),
            file("b/.wh..wh..opq"),
        ]
    ]
    started = time.time()
    incremental, full = incremental_and_full(tmp_path, dest, lower, upper)
    assert isinstance(incremental, dict) and isinstance(full, dict)
    assert_same(incremental, full, started)


@pytest.mark.parametrize("kind", KINDS)
def test_a_hard_link_through_a_cached_symlink_names_nothing_outside(
    tmp_path: Path, world: tuple[Path, Path], kind: str
) -> None:
    dest, outside = world
    lower = [[directory("a"), symlink("a", targets(outside)[kind])]]
    incremental, full = incremental_and_full(tmp_path, dest, lower, [[hardlink("stolen", "a/victim-file")]])
    assert isinstance(incremental, str) and "does not exist in the image" in incremental
    assert incremental == full
    assert "layer 2/2" in incremental  # numbered as in the whole image


@pytest.mark.parametrize(
    "entries",
    [
        [file("../escape", "x")],
        [file("/abs", "x")],
        [hardlink("h", "../../etc/shadow")],
        [Entry("a/" * 600 + "deep", "file")],
    ],
    ids=["dotdot", "absolute", "hardlink-climb", "too-deep"],
)
def test_hostile_names_in_the_new_layer_fail_as_in_a_full_unpack(
    tmp_path: Path, world: tuple[Path, Path], entries: list[Entry]
) -> None:
    dest, _ = world
    incremental, full = incremental_and_full(tmp_path, dest, [[*BASE]], [entries])
    assert isinstance(incremental, str)
    assert incremental == full


def test_the_disk_budget_carries_on_from_the_cached_layers(tmp_path: Path, world: tuple[Path, Path]) -> None:
    """The base's 30 MiB count: 40 more MiB in the new layer pass the 64 MiB disk, as in a full unpack."""
    dest, _ = world
    lower = [[Entry("lower.bin", zeros=30 * MIB)]]
    incremental, full = incremental_and_full(tmp_path, dest, lower, [[Entry("upper.bin", zeros=40 * MIB)]])
    assert isinstance(incremental, str) and "64 MiB" in incremental and "--disk" in incremental
    assert incremental == full


# --- the cache ----------------------------------------------------------------------------------------------


def test_chain_ids_follow_ocis_chainid_construction() -> None:
    layers = [LayerRef(f"sha256:{c * 64}", "", 1, Path()) for c in "abc"]
    ids = chain_ids(layers)
    assert ids[0] == layers[0].digest
    assert ids[1] == "sha256:" + hashlib.sha256(f"{ids[0]} {layers[1].digest}".encode()).hexdigest()
    assert ids[2] == "sha256:" + hashlib.sha256(f"{ids[1]} {layers[2].digest}".encode()).hexdigest()
    assert chain_ids(layers[::-1])[-1] != ids[-1]  # order matters


def test_the_cache_keeps_the_most_recently_used_within_its_caps(tmp_path: Path) -> None:
    cache = ChainCache(tmp_path)
    layers = [LayerRef(f"sha256:{i:064x}", "", 1, Path()) for i in range(MAX_CHAINS + 3)]
    for i, layer in enumerate(layers):
        disk = tmp_path / f"d{i}.ext4"
        disk.write_bytes(b"x" * 4096)
        assert cache.put([layer], DISK_MIB, disk, link=False, used_bytes=i, used_inodes=1) is not None
        old = time.time() - 3600 + i  # used an hour ago, in this order
        os.utime(cache.root / f"{cache.name(layer.digest, DISK_MIB)}.json", (old, old))
    cache.prune()
    kept = {b.chain_id for b in cache.entries()}
    assert kept == {layer.digest for layer in layers[3:]}, "the least recently used go first"
    assert cache.longest(layers[3:4], DISK_MIB) is not None
    assert cache.longest(layers[3:4], DISK_MIB + 1) is None, "the disk size is part of the key"
    result = cache.prune(max_bytes=2 * 4096, max_count=None)
    assert len(result.removed) == MAX_CHAINS - 2 and result.kept_count == 2
    assert {b.chain_id for b in cache.entries()} == {layers[4].digest, layers[3].digest} or len(
        cache.entries()
    ) == 2


def test_a_recently_used_base_is_never_pruned(tmp_path: Path) -> None:
    cache = ChainCache(tmp_path)
    disk = tmp_path / "d.ext4"
    disk.write_bytes(b"x")
    cache.put(
        [LayerRef(f"sha256:{'a' * 64}", "", 1, Path())],
        DISK_MIB,
        disk,
        link=False,
        used_bytes=0,
        used_inodes=0,
    )
    assert cache.prune(max_bytes=None, max_count=None).removed == ()
    assert len(cache.prune(max_bytes=None, max_count=None, min_age=0).removed) == 1
    assert cache.entries() == [] and list(cache.root.iterdir()) == []


def test_a_missing_loop_device_falls_back_to_the_full_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bencher_runner.layercache as layercache

    layout = tmp_path / "layout"
    lower = [[*BASE, *LOWER_PADDING]]
    build_image(layout, lower, {}, tag="lower")
    build_image(layout, [*lower, [file("app", "a")]], {}, tag="upper")
    cache = tmp_path / "cache"
    job_template(tmp_path, cache, f"{layout}:lower")

    def no_loop(fd: int, dest: Path) -> tuple[int, int]:
        raise IncrementalUnavailable("no free loop device: No such device")

    monkeypatch.setattr(layercache, "_attach_loop", no_loop)
    started = time.time()  # before both builds compared below
    disk, meta, reporter = job_template(tmp_path, cache, f"{layout}:upper")
    assert meta["built"] == "full"
    assert any("no free loop device" in p and "in full" in p for p in reporter.phases)
    want = disk_view(reference_disk(tmp_path, open_layout(f"{layout}:upper").layers, "/"))
    assert_same(disk_view(disk), want, started)


def test_the_job_restores_the_budget_of_the_cached_layers(tmp_path: Path) -> None:
    """A job's incremental build starts from the base's recorded budget: the same error as cold."""
    layout = tmp_path / "layout"
    lower = [[Entry("lower.bin", zeros=30 * MIB)]]
    build_image(layout, lower, {}, tag="lower")
    build_image(layout, [*lower, [Entry("upper.bin", zeros=40 * MIB)]], {}, tag="upper")
    cache = tmp_path / "cache"
    job_template(tmp_path, cache, f"{layout}:lower")
    with pytest.raises(ImageError) as incremental:
        job_template(tmp_path, cache, f"{layout}:upper")
    with pytest.raises(ImageError) as cold:
        job_template(tmp_path, tmp_path / "cold-cache", f"{layout}:upper")
    assert "64 MiB" in str(cold.value) and "layer 2/2" in str(cold.value)
    assert str(incremental.value) == str(cold.value)
    assert not list((tmp_path / "cache" / "rootfs").glob("*.ext4"))[1:], "no template of the image"


@pytest.mark.parametrize("mtime", [1_600_000_000.5, 1_600_000_000.999999, -0.25])
def test_fractional_mtimes_read_back_as_a_full_build_stores_them(tmp_path: Path, mtime: float) -> None:
    """mkfs.ext4 -d keeps whole seconds; files the kernel writes onto the mounted base must too."""
    lower = [[*BASE, *LOWER_PADDING]]
    upper = [[Entry("frac", "file", data=b"f", mtime=mtime), Entry("frac-dir", "dir", mtime=mtime)]]
    check_case(tmp_path, lower, upper, {})


def test_cache_ls_shows_and_cache_prune_removes_the_chain_disks(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from bencher_runner.cli import main

    cache = ChainCache(tmp_path)
    for c in "ab":
        disk = tmp_path / f"{c}.ext4"
        disk.write_bytes(b"x" * 8192)
        cache.put(
            [LayerRef(f"sha256:{c * 64}", "", 1, Path())], 1024, disk, link=False, used_bytes=0, used_inodes=0
        )
    runner = CliRunner()
    listed = runner.invoke(main, ["cache", "ls", "--cache-dir", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    assert "2 cached root disks of layer chains" in listed.output and "1024 MiB disk" in listed.output
    doc = json.loads(runner.invoke(main, ["cache", "ls", "--json", "--cache-dir", str(tmp_path)]).output)
    assert {d["chain_id"] for d in doc if d["kind"] == "layer-chain"} == {f"sha256:{c * 64}" for c in "ab"}
    kept = runner.invoke(main, ["cache", "prune", "--max-size", "100", "--cache-dir", str(tmp_path)])
    assert "removed 0 layer-chain disks" in kept.output, kept.output  # within the default cap
    pruned = runner.invoke(main, ["cache", "prune", "--all", "--cache-dir", str(tmp_path)])
    assert pruned.exit_code == 0 and "removed 2 layer-chain disks" in pruned.output, pruned.output
    assert cache.entries() == []
