import stat
import subprocess
from pathlib import Path

from bencher_runner.sandbox.initramfs import (
    CpioEntry,
    base_initramfs,
    newc_archive,
    write_job_initramfs,
)


def cpio_list(archive: Path) -> list[str]:
    proc = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=archive.open("rb"), capture_output=True, check=True
    )
    return proc.stdout.decode().split()


def test_newc_is_read_by_cpio(tmp_path: Path) -> None:
    data = newc_archive(
        [CpioEntry("dir", stat.S_IFDIR | 0o755), CpioEntry("dir/file", stat.S_IFREG | 0o600, b"abc")]
    )
    assert len(data) % 4 == 0
    archive = tmp_path / "a.cpio"
    archive.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], cwd=out, stdin=archive.open("rb"), check=True)
    assert (out / "dir" / "file").read_bytes() == b"abc"
    assert stat.S_IMODE((out / "dir" / "file").stat().st_mode) == 0o600


def test_base_is_cached_and_job_is_appended(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF fake agent")
    mod = tmp_path / "virtio.ko"
    mod.write_bytes(b"module")
    base = base_initramfs(tmp_path / "cache", agent, [mod])
    assert base_initramfs(tmp_path / "cache", agent, [mod]) == base
    assert "init" in cpio_list(base)
    assert "bencher/modules/00-virtio.ko" in cpio_list(base)

    job = tmp_path / "job.cpio"
    write_job_initramfs(base, b"version=1\0arg=/bin/true\0", job)
    extracted = tmp_path / "x"
    extracted.mkdir()
    # GNU cpio reads one archive per call; the kernel reads the concatenation. Check the second part.
    second = job.read_bytes()[len(base.read_bytes()) :]
    (tmp_path / "second.cpio").write_bytes(second)
    subprocess.run(
        ["cpio", "-id", "--quiet"], cwd=extracted, stdin=(tmp_path / "second.cpio").open("rb"), check=True
    )
    assert (extracted / "bencher" / "job").read_bytes() == b"version=1\0arg=/bin/true\0"


def test_cache_key_changes_with_agent(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    agent.write_bytes(b"one")
    first = base_initramfs(tmp_path, agent, [])
    agent.write_bytes(b"two")
    assert base_initramfs(tmp_path, agent, []) != first
