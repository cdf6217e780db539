"""Settings this host cannot satisfy are refused before any work, with one line naming value and fix
(issue 12: findings 9 and 14)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.capacity import DISK_MARGIN, METADATA_FRACTION, check_host_capacity
from bencher_runner.fakeserver import default_config, default_spec
from bencher_runner.job import run_job
from bencher_runner.rootfs import free_bytes, mount_point
from bencher_runner.sandbox.outputdisk import MAX_OUTPUT_LIMIT, output_disk_size
from bencher_runner.sparedisk import SpareDisks
from bencher_runner.spec.config import DEFAULT_MAX_DISK_MIB, HostSettings, RunConfig, make_run_config
from bencher_runner.spec.errors import RootfsError, SpecError
from bencher_runner.spec.jobspec import build_config_from_job, parse_job
from bencher_runner.spec.units import MIB

MISSING_IMAGE = "/nonexistent/oci-layout"


def config(**fields: Any) -> RunConfig:
    return make_run_config(image=MISSING_IMAGE, **fields)


class FakeStatvfs:
    def __init__(self, free: int) -> None:
        self.f_bavail, self.f_frsize = free // 4096, 4096


@pytest.fixture
def free_space(monkeypatch: pytest.MonkeyPatch) -> Any:
    def set_free(free: int) -> None:
        monkeypatch.setattr(os, "statvfs", lambda path: FakeStatvfs(free))

    return set_free


def need(cfg: RunConfig) -> int:
    disk = cfg.job.disk_mib * MIB
    output = output_disk_size(len(cfg.job.output_paths), cfg.host.max_output_bytes)
    return disk + disk // METADATA_FRACTION + output + DISK_MARGIN


def test_the_disks_must_fit_in_the_free_space(tmp_path: Path, free_space: Any) -> None:
    cfg = config(disk_mib=4096)
    free_space(need(cfg))
    check_host_capacity(cfg, tmp_path)  # exactly enough
    free_space(need(cfg) - 4096)
    with pytest.raises(RootfsError) as err:
        check_host_capacity(cfg, tmp_path)
    text = str(err.value)
    assert "4096 MiB root disk" in text and f"{need(cfg) // MIB} MiB free" in text
    assert str(tmp_path / "work") in text and "--disk" in text and "--cache-dir" in text
    assert "\n" not in text


def test_spare_disks_count_as_free_space(tmp_path: Path, free_space: Any) -> None:
    cfg = config(disk_mib=64)
    spare = SpareDisks(tmp_path).root / "sha256-aa-64M-v1.x.ext4"
    spare.parent.mkdir(parents=True)
    with spare.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, 64 * MIB)  # what a refill leaves: fully allocated
    free_space(need(cfg) - 32 * MIB)
    check_host_capacity(cfg, tmp_path)  # the spare is this job's, or dropped before it needs room
    spare.unlink()
    with pytest.raises(RootfsError):
        check_host_capacity(cfg, tmp_path)


def test_the_output_disk_counts_too(tmp_path: Path, free_space: Any) -> None:
    """255 files of 25 MiB: a hostile guest can fill 6.4 GB of output disk on the host."""
    many = config(output_paths=tuple(f"f{i}" for i in range(255)))
    assert need(many) > 6 * 1024 * MIB
    free_space(need(config()) + 100 * MIB)
    check_host_capacity(config(), tmp_path)
    with pytest.raises(RootfsError, match="output disk"):
        check_host_capacity(many, tmp_path)


def test_a_huge_disk_is_refused_on_the_real_filesystem(tmp_path: Path) -> None:
    with pytest.raises(RootfsError, match="2097152 MiB root disk"):
        check_host_capacity(config(disk_mib=2097152), tmp_path / "not" / "created" / "yet")
    assert not (tmp_path / "not").exists()


def test_memory_beyond_the_host_is_refused(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8000000 kB\nMemFree:         100 kB\n")
    check_host_capacity(config(memory_mib=7812), tmp_path, meminfo=meminfo)
    for memory in (7813, 999999999, 10**30):
        with pytest.raises(SpecError, match=f"asks for {memory} MiB of memory but this host has 7812 MiB"):
            check_host_capacity(config(memory_mib=memory), tmp_path, meminfo=meminfo)


def test_a_comma_in_the_work_path_is_refused_for_qemu(tmp_path: Path) -> None:
    cache = tmp_path / "a,b"
    with pytest.raises(SpecError, match="comma"):
        check_host_capacity(config(), cache)
    check_host_capacity(config(backend="firecracker"), cache)  # takes paths as JSON


def test_no_sandbox_needs_no_vm_resources(tmp_path: Path) -> None:
    check_host_capacity(config(backend="none", disk_mib=10**12, memory_mib=10**12), tmp_path / "a,b")


def test_mount_point_and_free_bytes(tmp_path: Path) -> None:
    assert os.path.ismount(mount_point(tmp_path))
    free, where = free_bytes(tmp_path / "missing" / "deeper")
    assert free is not None and free > 0 and where == mount_point(tmp_path)


@pytest.mark.parametrize(
    ("fields", "cache_name", "expected"),
    [
        ({"disk_mib": 2097152}, "cache", "2097152 MiB root disk"),
        ({"memory_mib": 999999999}, "cache", "asks for 999999999 MiB of memory"),
        ({}, "with,comma", "contains a comma"),
    ],
    ids=["disk", "memory", "comma"],
)
def test_a_job_refuses_before_any_work(
    tmp_path: Path, fields: dict[str, Any], cache_name: str, expected: str
) -> None:
    """The old runner pulled (here: failed to find the image), unpacked and ran mkfs first."""
    cache = tmp_path / cache_name
    result = run_job(config(**fields), cache=cache)
    assert result.status == "failed"
    assert result.error is not None and expected in result.error
    assert not (cache / "rootfs").exists() and not (cache / "blobs").exists()


def daemon_job(**spec: Any) -> dict[str, Any]:
    return {"event": "job", "uuid": "550e8400-e29b-41d4-a716-446655440000", "spec": default_spec(**spec),
            "config": default_config()}  # fmt: skip


@pytest.mark.parametrize("disk", [10**30, 2**63, DEFAULT_MAX_DISK_MIB * MIB + 1])
def test_a_job_message_disk_beyond_max_disk_is_a_spec_error(disk: int) -> None:
    with pytest.raises(SpecError) as err:
        build_config_from_job(parse_job(daemon_job(disk=disk)), HostSettings())
    assert f"spec.disk={disk} bytes" in str(err.value) and "--max-disk" in str(err.value)


def test_max_disk_is_the_operators_choice() -> None:
    job = parse_job(daemon_job(disk=8 * 1024 * MIB))
    assert build_config_from_job(job, HostSettings()).job.disk_mib == 8192
    with pytest.raises(SpecError, match=r"\(4096 MiB, --max-disk\)"):
        build_config_from_job(job, HostSettings(max_disk_mib=4096))


def test_a_job_message_memory_of_10_30_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="larger than any disk or memory"):
        build_config_from_job(parse_job(daemon_job(memory=10**30)), HostSettings())


def runner(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bencher_runner", *args], capture_output=True, text=True, timeout=120
    )


def one_line_usage_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--disk", "2097152"], "2097152 MiB is more than --max-disk (1048576 MiB)"),
        (["--disk", "5000", "--max-disk", "4096"], "5000 MiB is more than --max-disk (4096 MiB)"),
        (["--max-output-size", str(10**15)], f"0<=x<={MAX_OUTPUT_LIMIT}"),
    ],
    ids=["disk-over-default", "disk-over-flag", "max-output-size"],
)
def test_run_refuses_impossible_flags_up_front(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = runner("run", "--image", MISSING_IMAGE, "--cache-dir", str(tmp_path), *args, "--", "true")
    assert expected in one_line_usage_error(proc)
    assert not (tmp_path / "work").exists()


def test_run_refuses_memory_the_host_lacks_before_the_image(tmp_path: Path) -> None:
    proc = runner("run", "--image", MISSING_IMAGE, "--cache-dir", str(tmp_path), "--json", "--memory",
                  "999999999", "--", "true")  # fmt: skip
    one_line_usage_error(proc)
    assert "asks for 999999999 MiB of memory" in json.loads(proc.stdout)["error"]


def test_the_daemon_takes_the_shared_limits() -> None:
    text = runner("daemon", "--help").stdout
    assert "--max-disk" in text and "--max-output-size" in text
    proc = runner("daemon", "--runner", "r", "--key", "k", "--max-output-size", str(10**15))
    assert f"0<=x<={MAX_OUTPUT_LIMIT}" in one_line_usage_error(proc)
