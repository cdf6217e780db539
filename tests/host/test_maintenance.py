"""host/maintenance.py: drain markers, the one-daemon-per-host lock, the job lock, the drain wait."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bencher_runner.host.maintenance import (
    HostBusyError,
    daemon_pid,
    drain,
    job_lock,
    job_lock_holder,
    markers,
    take_daemon_lock,
    undrain,
    wait_until_idle,
    write_status,
)
from bencher_runner.spec.errors import SpecError

ROOT = Path(__file__).resolve().parents[2]


def test_markers_drain_and_undrain(tmp_path: Path) -> None:
    assert markers(tmp_path / "missing") == []
    drain(tmp_path)
    drain(tmp_path, "raid-check", "md0 check")
    assert markers(tmp_path) == ["", "raid-check"]
    assert "md0 check" in (tmp_path / "maintenance.raid-check").read_text()
    assert undrain(tmp_path, "raid-check") == ["raid-check"]
    assert undrain(tmp_path, "raid-check") == []
    drain(tmp_path, "b")
    assert sorted(undrain(tmp_path, every=True)) == ["", "b"]
    assert markers(tmp_path) == []


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x" * 65, "-a", "a b"])
def test_marker_names_are_checked(tmp_path: Path, name: str) -> None:
    with pytest.raises(SpecError, match="--name"):
        drain(tmp_path, name)


def test_a_second_daemon_lock_names_the_holder(tmp_path: Path) -> None:
    held = take_daemon_lock(tmp_path)
    try:
        assert daemon_pid(tmp_path) == os.getpid()
        with pytest.raises(HostBusyError, match=f"pid {os.getpid()}"):
            take_daemon_lock(tmp_path)
    finally:
        held.release()
    assert daemon_pid(tmp_path) is None
    take_daemon_lock(tmp_path).release()  # free again


def test_job_lock_waits_refuses_or_is_canceled(tmp_path: Path) -> None:
    waited: list[str] = []
    started = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with job_lock(tmp_path):
            started.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    started.wait(5)
    assert job_lock_holder(tmp_path) == f"pid {os.getpid()}"
    with pytest.raises(HostBusyError, match="drop --no-wait"), job_lock(tmp_path, wait=False):
        pass
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with (
        pytest.raises(HostBusyError, match="canceled"),
        job_lock(tmp_path, cancel=cancel, on_wait=waited.append),
    ):
        pass
    assert time.monotonic() - t0 < 2 and "waiting for the job of pid" in waited[0]
    threading.Timer(0.3, release.set).start()
    with job_lock(tmp_path, on_wait=waited.append):
        assert job_lock_holder(tmp_path) is not None
    thread.join()
    assert job_lock_holder(tmp_path) is None


def test_wait_until_idle_waits_for_the_job_and_for_a_fresh_pause(tmp_path: Path) -> None:
    said: list[str] = []
    assert wait_until_idle(tmp_path, 1, say=said.append) is None  # no daemon, no job
    lock = take_daemon_lock(tmp_path)
    try:
        write_status(tmp_path, {"state": "paused"})
        time.sleep(0.02)
        drain(tmp_path)  # newer than the status: the daemon has not seen it yet
        assert wait_until_idle(tmp_path, 0.5, say=said.append) is not None
        threading.Timer(0.3, lambda: write_status(tmp_path, {"state": "paused"})).start()
        assert wait_until_idle(tmp_path, 5, say=said.append) is None
        write_status(tmp_path, {"state": "job"})
        threading.Timer(0.3, lambda: write_status(tmp_path, {"state": "paused"})).start()
        assert wait_until_idle(tmp_path, 5, say=said.append) is None
    finally:
        lock.release()
    assert any("to stop asking for jobs" in s for s in said)


def test_runner_run_no_wait_refuses_while_a_job_holds_the_host(tmp_path: Path) -> None:
    env = {**os.environ, "BENCHER_RUNNER_RUN_DIR": str(tmp_path)}
    with job_lock(tmp_path):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bencher_runner",
                "run",
                "--no-wait",
                "--image",
                str(ROOT / "examples/hello/oci") + ":latest",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr


def test_runner_drain_and_undrain_commands(tmp_path: Path) -> None:
    env = {**os.environ, "BENCHER_RUNNER_RUN_DIR": str(tmp_path)}
    run = [sys.executable, "-m", "bencher_runner"]
    proc = subprocess.run(
        [*run, "drain", "--name", "kernel", "--wait"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "no job runs" in proc.stdout and markers(tmp_path) == ["kernel"]
    proc = subprocess.run([*run, "undrain", "--name", "kernel"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and markers(tmp_path) == []
    proc = subprocess.run([*run, "drain", "--name", "../x"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "--name" in proc.stderr
