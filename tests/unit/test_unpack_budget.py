"""The unpack budget is the job's disk: bytes and inodes, as `mkfs.ext4` would lay them out."""

import re
import subprocess
from pathlib import Path

import pytest

from bencher_runner.rootfs import MKFS_FLAGS, ext4_inode_count
from bencher_runner.spec.units import MIB

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
