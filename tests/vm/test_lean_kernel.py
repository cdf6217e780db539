"""The lean kernel (`runner kernel build`) runs jobs end to end, and each kernel's memory floor holds.

The lean kernel is found at BENCHER_RUNNER_LEAN_KERNEL or in the cache's ``kernel-lean/`` (`make
lean-kernel` builds it); its tests are skipped without it. The cloud kernel is the shared fetched one.
"""

import os
import shutil
from pathlib import Path

import pytest

from bencher_runner.paths import cache_dir
from bencher_runner.sandbox.kernel import CLOUD_MEMORY_FLOOR_MIB, LEAN_MEMORY_FLOOR_MIB
from tests.vm.conftest import runner

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples/hello/oci"
CLOUD = Path.home() / ".cache" / "bencher-runner" / "kernel"
LEAN = Path(os.environ.get("BENCHER_RUNNER_LEAN_KERNEL") or cache_dir() / "kernel-lean" / "vmlinux")
MIN_CLI_MEMORY = 64

pytestmark = pytest.mark.vm
needs_lean = pytest.mark.skipif(not LEAN.is_file(), reason=f"no lean kernel at {LEAN} (make lean-kernel)")
needs_cloud = pytest.mark.skipif(not (CLOUD / "vmlinux").is_file(), reason="no cloud kernel (make setup)")


def lean(*args: str) -> list[str]:
    return ["--kernel", str(LEAN), "--accel", "tcg", "--json", *args]


@needs_lean
def test_lean_kernel_runs_the_example_in_64_mib() -> None:
    """The issue's goal: a 64 MiB guest boots and runs the example (the CLI's minimum --memory)."""
    run = runner(
        "--image", f"{EXAMPLE}:latest", *lean("--memory", str(max(MIN_CLI_MEMORY, LEAN_MEMORY_FLOOR_MIB)))
    )
    assert run.returncode == 0, run.stderr
    result = run.doc["results"][0]
    assert result["exit_code"] == 0
    assert "hello from inside the microVM" in str(result["stdout"])
    assert "load module" not in run.stderr and "scandir" not in run.stderr  # no module step


@needs_lean
def test_lean_guest_has_few_processes(plain_image: str) -> None:
    """At most 30 numeric /proc entries in a 1-vCPU guest running `ls /proc` (the issue's goal)."""
    run = runner("--image", plain_image, *lean("--vcpus", "1", "--", "/bin/sh", "-c", "ls /proc"))
    assert run.returncode == 0, run.stderr
    pids = [w for w in str(run.doc["results"][0]["stdout"]).split() if w.isdigit()]
    assert 0 < len(pids) <= 30, pids


@needs_lean
def test_lean_guest_env_user_outputs_and_exit_code(make_image: object, tmp_path: Path) -> None:
    """What jobs rely on besides the command: env, uid/gid, output files, exit codes, /dev/shm, /tmp."""
    image = make_image({"Env": ["PATH=/bin", "FROM_IMAGE=1"], "User": "1000:1000"})  # type: ignore[operator]
    script = (  # /dev/shm: the tmpfs (mode 1777) the agent mounts, writable by any user
        "id -u; id -g; echo $FROM_IMAGE $FROM_JOB; echo out > /dev/shm/kept; "
        "mount | grep -c -E ' /dev/shm | /run | /dev/pts '; exit 3"
    )
    args = lean("--env", "FROM_JOB=2", "--output", "/dev/shm/kept", "--", "/bin/sh", "-c", script)
    run = runner("--image", image, *args)
    result = run.doc["results"][0]
    assert result["exit_code"] == 3, run.stderr
    lines = str(result["stdout"]).split()
    assert lines == ["1000", "1000", "1", "2", "3"]
    assert result["output"]["/dev/shm/kept"] == "out\n"


@needs_lean
def test_lean_guest_user_network(plain_image: str) -> None:
    """Network jobs: the agent configures eth0 (virtio-net built in) and the default route."""
    run = runner(
        "--image", plain_image, *lean("--network", "--", "/bin/sh", "-c", "ip -4 addr show eth0; ip route"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = str(run.doc["results"][0]["stdout"])
    assert "inet " in out and "default via" in out


@needs_cloud
def test_cloud_kernel_runs_the_example_at_its_floor() -> None:
    run = runner(
        "--image", f"{EXAMPLE}:latest", "--kernel", str(CLOUD / "vmlinux"), "--kernel-modules",
        str(CLOUD / "modules"), "--accel", "tcg", "--json", "--memory", str(CLOUD_MEMORY_FLOOR_MIB),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.doc["results"][0]["exit_code"] == 0


@needs_cloud
def test_below_the_cloud_floor_is_refused_before_any_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (fetched cloud) kernel's floor: refused with the numbers, before the image is read."""
    monkeypatch.delenv("BENCHER_RUNNER_KERNEL", raising=False)  # the cache's default kernel
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "kernel").symlink_to(CLOUD)  # read only: the refusal happens before any VM file is made
    run = runner(
        "--image", str(tmp_path / "no-such-image") + ":latest", "--cache-dir", str(cache), "--accel", "tcg",
        "--memory", str(CLOUD_MEMORY_FLOOR_MIB - 1),
    )  # fmt: skip
    assert run.returncode != 0
    assert f"the guest kernel needs {CLOUD_MEMORY_FLOOR_MIB} MiB to boot" in run.stderr, run.stderr
    assert "no-such-image" not in run.stderr
    shutil.rmtree(cache / "work", ignore_errors=True)
