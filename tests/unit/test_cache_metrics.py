"""bencher_runner_cache_bytes: each cache's own bytes, a chain base linked to a template counted once."""

import os
from pathlib import Path

from bencher_runner.metrics import _CacheSize
from bencher_runner.spec.units import MIB


def write(path: Path, mib: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, mib * MIB)
    return path


def test_each_cache_is_measured_and_a_linked_chain_base_is_the_templates(tmp_path: Path) -> None:
    template = write(tmp_path / "rootfs" / "t.ext4", 2)
    (tmp_path / "chains").mkdir()
    os.link(template, tmp_path / "chains" / "linked.ext4")  # a template kept as its chain's base
    write(tmp_path / "chains" / "own.ext4", 3)
    write(tmp_path / "spare-disks" / "t.x.ext4", 4)
    (family,) = _CacheSize(tmp_path).collect()
    got = {sample.labels["cache"]: round(sample.value / MIB) for sample in family.samples}
    assert got == {"blob": 0, "template": 2, "chain": 3, "spare": 4}
