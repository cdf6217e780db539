"""The unpack budget is the job's disk: bytes and inodes, as `mkfs.ext4` would lay them out."""

import io
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bencher_runner import staging
from bencher_runner.job import Job, Reporter
from bencher_runner.oci.layout import open_layout
from bencher_runner.oci.unpack import ByteBudget, unpack_layer_stream
from bencher_runner.rootfs import (
    EXT4_RESERVED_INODES,
    MKFS_FLAGS,
    build_rootfs,
    ext4_inode_count,
    min_disk_mib,
)
from bencher_runner.spec.config import make_run_config
from bencher_runner.spec.errors import ImageError
from bencher_runner.spec.units import MIB
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
    sparse_tar,
    symlink,
)

_DRY_RUN_FLAGS = ["-n", *(f for f in MKFS_FLAGS if f != "-q")]  # -n: print the layout, write nothing


def _sparse(path: Path, mib: int) -> Path:
    with path.open("wb") as f:
        f.truncate(mib * MIB)
    return path


@pytest.mark.parametrize("mib", [64, 256, 511, 512, 1024, 4096])
def test_inode_count_matches_a_real_mkfs(tmp_path: Path, mib: int) -> None:
    image = _sparse(tmp_path / "disk.img", mib)
    subprocess.run(["mkfs.ext4", *MKFS_FLAGS, str(image)], check=True, capture_output=True)
    header = subprocess.run(["dumpe2fs", "-h", str(image)], check=True, capture_output=True, text=True)
    found = re.search(r"^Inode count:\s+(\d+)$", header.stdout, re.MULTILINE)
    assert found is not None, header.stdout
    assert ext4_inode_count(mib) == int(found.group(1))


@pytest.mark.parametrize(
    "mib",
    [1, 2, 3, 4, 63, 100, 300, 513, 514, 520, 1025, 2047, 2049, 3000, 8193, 10000, 65536, 100000],
)
def test_inode_count_matches_mkfs_dry_runs(tmp_path: Path, mib: int) -> None:
    """Odd sizes too: the last block group is dropped when it is too small for its own metadata."""
    image = _sparse(tmp_path / "disk.img", mib)
    out = subprocess.run(["mkfs.ext4", *_DRY_RUN_FLAGS, str(image)], capture_output=True, text=True)
    found = re.search(r"blocks and (\d+) inodes", out.stdout)
    assert found is not None, out.stdout + out.stderr
    assert ext4_inode_count(mib) == int(found.group(1))


@pytest.mark.parametrize("mib", [(4 << 20) - 1, 4 << 20, 16 << 20, 20 << 20])
def test_inode_count_of_big_and_huge_disks(mib: int) -> None:
    """The `big` (>= 4 TiB) and `huge` (>= 16 TiB) usage types, checked in a tmpfs (sparse files)."""
    image = Path("/dev/shm") / f"bencher-runner-test-inodes-{mib}.img"
    try:
        try:
            _sparse(image, mib)
        except OSError as e:
            pytest.skip(f"cannot make a {mib} MiB sparse file in /dev/shm: {e}")
        out = subprocess.run(["mkfs.ext4", *_DRY_RUN_FLAGS, str(image)], capture_output=True, text=True)
        found = re.search(r"blocks and (\d+) inodes", out.stdout)
        assert found is not None, out.stdout + out.stderr
        assert ext4_inode_count(mib) == int(found.group(1))
    finally:
        image.unlink(missing_ok=True)


# --- finding 8: bombs are bounded by the job's disk, while they unpack ------------------------------


def _job(tmp_path: Path, layout: Path, disk_mib: int, reporter: Reporter | None = None) -> Job:
    cfg = make_run_config(image=f"{layout}:latest", disk_mib=disk_mib)
    return Job(cfg, cache=tmp_path / "cache", reporter=reporter or Reporter())


def _work(root: Path) -> Path:
    """A fresh job work dir under ``root``."""
    return Path(tempfile.mkdtemp(prefix="job-budget-", dir=root))


def _tree_bytes(root: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in root.rglob("*"))


@pytest.fixture
def on_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No tmpfs staging (a tmp_path with no tmpfs), so that the test sees what the budget alone does."""
    monkeypatch.setattr(staging, "SHM", tmp_path / "no-shm")


@pytest.fixture
def fast_work() -> Iterator[Path]:
    """A root for work dirs in /dev/shm: tens of thousands of files in seconds, not minutes."""
    root = Path(tempfile.mkdtemp(prefix="bencher-runner-test-", dir="/dev/shm"))
    try:
        yield root
    finally:
        shutil.rmtree(root)


BOMBS: dict[str, Callable[[Path], list[LayerSpec]]] = {
    "sparse tar": lambda tmp: [RawLayer(sparse_tar("hole", 512 * MIB, tmp / "src"), media_type=OCI_LAYER)],
    "gzip": lambda tmp: [[Entry("zeros", zeros=300 * MIB)]],
    "zstd": lambda tmp: [Layer([Entry("zeros", zeros=300 * MIB)], compression="zstd")],
    "many files": lambda tmp: [[file(f"f/{i:03}", bytes(2 * MIB)) for i in range(40)]],
}


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_bomb_stops_at_the_disk_size(tmp_path: Path, on_disk: None, bomb: str) -> None:
    layout = tmp_path / "layout"
    build_layout(layout, BOMBS[bomb](tmp_path))
    assert sum(layer.size for layer in open_layout(f"{layout}:latest").layers) < 4 * MIB
    job = _job(tmp_path, layout, disk_mib=64)
    work = _work(tmp_path)
    with pytest.raises(ImageError) as err:
        job.disks.unpack(work, open_layout(f"{layout}:latest"))
    text = str(err.value)
    assert "64 MiB" in text and "--disk" in text and len(text.splitlines()) == 1, text
    total = {"many files": 80, "sparse tar": 512}.get(bomb)
    if total is not None:  # counted to the end (a hole costs nothing to skip): says which disk it needs
        needed = min_disk_mib(total * MIB)
        assert (
            f"files take {total} MiB and need a disk of at least {needed} MiB, but the disk is 64 MiB" in text
        )
        assert f"pass --disk {needed} or more" in text
    else:  # counting stops after reading as much again as the disk: a bomb
        assert "more than 300 MiB, far more than its 64 MiB disk holds" in text
        assert "decompression bomb" in text
    assert _tree_bytes(work) <= 64 * MIB + MIB  # never more than the disk


def test_a_sparse_member_counts_its_apparent_size(tmp_path: Path) -> None:
    """tarfile hands a GNU sparse member over at its full size and it is written dense: that is what
    the tree (and so tmpfs) holds, so it is what is charged."""
    root = tmp_path / "root"
    root.mkdir()
    data = sparse_tar("hole", 3 * MIB, tmp_path / "src", data=b"head")
    budget = ByteBudget(64 * MIB)
    unpack_layer_stream(io.BytesIO(data), OCI_LAYER, root, name="layer", budget=budget)
    assert budget.used == 3 * MIB and (root / "hole").stat().st_size == 3 * MIB
    assert (root / "hole").read_bytes()[:4] == b"head"


def test_too_many_files_for_the_disks_inodes(tmp_path: Path, on_disk: None, fast_work: Path) -> None:
    usable = ext4_inode_count(64) - EXT4_RESERVED_INODES
    layout = tmp_path / "layout"
    build_layout(layout, [[file(f"d{i // 1000}/f{i}") for i in range(usable + 10)]])
    with pytest.raises(ImageError) as err:
        _job(tmp_path, layout, disk_mib=64).disks.unpack(_work(fast_work), open_layout(f"{layout}:latest"))
    text = str(err.value)
    assert "more files than an ext4 disk of 64 MiB holds" in text, text
    assert f"{usable + 10 + 17} files, directories and links for its {usable} inodes" in text  # + 17 dirs
    needed = int(re.search(r"pass --disk (\d+) or more", text).group(1))  # type: ignore[union-attr]
    assert ext4_inode_count(needed) - EXT4_RESERVED_INODES >= usable + 10 + 17  # + its 17 directories
    assert ext4_inode_count(needed * 63 // 64) - EXT4_RESERVED_INODES < usable + 10
    assert len(text.splitlines()) == 1


def test_the_inode_budget_is_exactly_what_mkfs_holds(tmp_path: Path, on_disk: None, fast_work: Path) -> None:
    """The last entry that fits the budget also fits mkfs.ext4; one more is refused while unpacking."""
    usable = ext4_inode_count(64) - EXT4_RESERVED_INODES
    dirs = 16
    entries = [directory(f"d{i}") for i in range(dirs)]
    entries += [file(f"d{i % dirs}/f{i}") for i in range(usable - dirs - 2)]
    entries += [symlink("link", "d0"), Entry("pipe", "fifo"), hardlink("shares-an-inode", "d0/f0")]
    layout = tmp_path / "layout"
    build_layout(layout, [entries])
    job = _job(tmp_path, layout, disk_mib=64)
    work = _work(fast_work)
    tree, _, _ = job.disks.unpack(work, open_layout(f"{layout}:latest"))
    build_rootfs(tree, tmp_path / "disk.img", 64, allocate=False)  # mkfs.ext4 -d takes every inode
    build_layout(layout, [[*entries, file("one-more")]])
    with pytest.raises(ImageError, match="more files"):
        _job(tmp_path, layout, disk_mib=64).disks.unpack(_work(fast_work), open_layout(f"{layout}:latest"))


def test_removed_and_replaced_entries_are_refunded(tmp_path: Path, on_disk: None, fast_work: Path) -> None:
    """Layers that rewrite the same files, or delete and re-add many, fit the disk they fit."""
    big = 40 * MIB
    layers: list[LayerSpec] = [
        [Entry("data/a.bin", zeros=big)],
        [Entry("data/a.bin", zeros=big)],  # replaced: the first copy is gone
        [file("data/.wh.a.bin"), Entry("data/b.bin", zeros=big)],
        [directory(f"many{i // 1000}") for i in range(0, 12000, 1000)]
        + [file(f"many{i // 1000}/f{i}") for i in range(12000)],
        [file(f".wh.many{i}") for i in range(12)] + [file(f"again/f{i}") for i in range(12000)],
        [file("again/.wh..wh..opq")] + [file(f"again/g{i}") for i in range(3000)],
    ]
    layout = tmp_path / "layout"
    build_layout(layout, layers)
    tree, _, _ = _job(tmp_path, layout, disk_mib=64).disks.unpack(
        _work(fast_work), open_layout(f"{layout}:latest")
    )
    assert sorted(os.listdir(tree / "data")) == ["b.bin"] and len(os.listdir(tree / "again")) == 3000


@pytest.mark.parametrize(
    ("layers", "fits"),
    [
        ([[file(".wh.d"), Entry("new", zeros=40 * MIB)]], True),  # both links in one removed directory
        ([[file("d/.wh.f")], [file("d/.wh.g"), Entry("new", zeros=40 * MIB)]], True),  # one by one
        ([[file("d/.wh.f")], [Entry("new", zeros=40 * MIB)]], False),  # d/g still holds the 40 MiB
        ([[Entry("d/f", zeros=40 * MIB)], [Entry("new", zeros=10 * MIB)]], False),  # d/g too
    ],
)
def test_a_file_is_refunded_when_its_last_link_goes(
    tmp_path: Path, on_disk: None, layers: list[LayerSpec], fits: bool
) -> None:
    lower: LayerSpec = [Entry("d/f", zeros=40 * MIB), hardlink("d/g", "d/f")]
    layout = tmp_path / "layout"
    build_layout(layout, [lower, *layers])
    job = _job(tmp_path, layout, disk_mib=64)
    if fits:
        tree, _, _ = job.disks.unpack(_work(tmp_path), open_layout(f"{layout}:latest"))
        assert (tree / "new").stat().st_size == 40 * MIB
    else:
        with pytest.raises(ImageError, match="the disk is 64 MiB"):
            job.disks.unpack(_work(tmp_path), open_layout(f"{layout}:latest"))


def test_hard_links_share_their_targets_inode(tmp_path: Path, on_disk: None, fast_work: Path) -> None:
    usable = ext4_inode_count(64) - EXT4_RESERVED_INODES
    entries = [file(f"f{i}") for i in range(usable // 2)]
    entries += [hardlink(f"h{i}", f"f{i}") for i in range(usable // 2)]
    layout = tmp_path / "layout"
    build_layout(layout, [entries])
    tree, _, _ = _job(tmp_path, layout, disk_mib=64).disks.unpack(
        _work(fast_work), open_layout(f"{layout}:latest")
    )
    assert (tree / "h0").stat().st_nlink == 2


def test_the_tmpfs_allowance_is_checked_as_uncompressed_bytes_arrive(
    tmp_path: Path, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 40 MiB gzip bomb looks small compressed; it moves to disk once it passes the tmpfs allowance,
    long before the tmpfs is full, and fits the 256 MiB disk there."""
    monkeypatch.setattr(staging, "SHM", small_tmpfs)
    monkeypatch.setattr(staging, "HEADROOM", 56 * MIB)  # 64 MiB tmpfs: an allowance of 8 MiB
    layout = tmp_path / "layout"
    build_layout(layout, [[file("etc/passwd", "root:x:0:0::/:/bin/sh\n"), Entry("zeros", zeros=40 * MIB)]])
    warnings: list[str] = []

    class Record(Reporter):
        def warn(self, text: str) -> None:
            warnings.append(text)

    job = _job(tmp_path, layout, disk_mib=256, reporter=Record())
    work = _work(tmp_path)
    tree, passwd, _ = job.disks.unpack(work, open_layout(f"{layout}:latest"))
    assert tree == work / "tree" and (tree / "zeros").stat().st_size == 40 * MIB
    assert passwd is not None
    assert any("did not fit" in w and "8 MiB" in w for w in warnings), warnings
    assert not any("No space left" in w for w in warnings), warnings  # stopped by the allowance


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 MiB tmpfs standing in for /dev/shm."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "shm"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
