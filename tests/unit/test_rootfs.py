import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bencher_runner.rootfs import build_rootfs, copy_disk
from bencher_runner.spec.errors import CanceledError, RootfsError
from bencher_runner.spec.units import MIB


def test_exact_size_fully_allocated_and_populated(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello").write_text("hi\n")
    os.chown(tree / "etc" / "hello", 1000, 1000)
    image = tmp_path / "root.ext4"
    build_rootfs(tree, image, 64)
    st = image.stat()
    assert st.st_size == 64 * MIB
    assert st.st_blocks * 512 >= 64 * MIB  # no holes: the host really reserved the space
    listing = subprocess.run(
        ["debugfs", "-R", "stat /etc/hello", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "User:  1000" in listing and "Group:  1000" in listing
    root = subprocess.run(
        ["debugfs", "-R", "stat /", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "Mode:  0755" in root


def test_too_small_names_both_sizes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    with (tree / "big").open("wb") as f:
        f.write(os.urandom(80 * MIB))
    with pytest.raises(RootfsError) as err:
        build_rootfs(tree, tmp_path / "root.ext4", 64)
    text = str(err.value)
    assert "80 MiB" in text and "64 MiB" in text and "--disk" in text


def test_cancel_stops_a_running_mkfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A canceled job must not wait for mkfs: a slow mkfs.ext4 is killed within a poll interval."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slow = bin_dir / "mkfs.ext4"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    tree = tmp_path / "tree"
    tree.mkdir()
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(CanceledError, match="root disk"):
        build_rootfs(tree, tmp_path / "disk.img", 64, cancel=cancel)
    assert time.monotonic() - t0 < 2


def test_copy_disk_is_byte_exact_and_fully_allocated(tmp_path: Path) -> None:
    src, dest = tmp_path / "template.ext4", tmp_path / "job.ext4"
    size = 64 * MIB
    with src.open("wb") as f:
        f.truncate(size)
        for at, data in ((0, b"boot" * 1024), (20 * MIB, os.urandom(3 * MIB)), (size - 4096, b"\xff" * 4096)):
            f.seek(at)
            f.write(data)
    assert src.stat().st_blocks * 512 < 8 * MIB  # the template is sparse
    copy_disk(src, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_blocks * 512 >= size  # every block reserved for the guest
