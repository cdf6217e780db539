"""Drain, pause and one runner per host with a real daemon and the fake server (issue #17)."""

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bencher_runner.daemon import Daemon, DaemonSettings, Executor
from bencher_runner.daemon.preflight import HostPreflight
from bencher_runner.fakeserver import FakeBencher
from bencher_runner.host.maintenance import drain, take_daemon_lock, undrain
from bencher_runner.spec.config import HostSettings
from tests.support.kernel import fake_bundle

from .conftest import KEY, sleeper


def drained_daemon(server: FakeBencher, tmp_path: Path, executor: Executor) -> Daemon:
    """A daemon whose preflight is the real one (a stand-in kernel, TCG) over tmp_path/run."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    fake_bundle(cache)
    settings = DaemonSettings(host=server.url, runner=server.runner, key=KEY, state_dir=tmp_path / "state",
                              poll_timeout=1, auto_update=False, run_dir=run)  # fmt: skip
    return Daemon(settings, executor, host_check=HostPreflight(cache, HostSettings(accel="tcg"), run_dir=run))


@pytest.fixture
async def patient_server() -> AsyncIterator[FakeBencher]:
    """A paused runner sends nothing but pings (every 20 s): give idle connections the real 90 s."""
    srv = FakeBencher(key=KEY, heartbeat_timeout=90.0, grace_period=60.0)
    await srv.start()
    yield srv
    await srv.close()


async def test_a_marker_during_a_job_lets_it_finish_then_pauses_until_removed(
    patient_server: FakeBencher, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = patient_server
    caplog.set_level(logging.INFO, logger="bencher_runner")
    run = tmp_path / "run"
    daemon = drained_daemon(server, tmp_path, sleeper(2.0))
    task = asyncio.create_task(daemon.run())
    try:
        first = server.add_job()
        await server.wait_for(lambda: server.job_state(first) == "running", timeout=20)
        drain(run, "kernel-update")
        second = server.add_job()
        await server.wait_for(lambda: server.job_state(first) == "processed", timeout=20)
        readies = len(server.events("ready"))
        await asyncio.sleep(3)
        assert len(server.events("ready")) == readies  # nothing asked for while drained
        assert server.job_state(second) == "pending"
        assert caplog.text.count("paused, asking for no job") == 1
        assert "maintenance.kernel-update" in caplog.text
        status = json.loads((run / "daemon.json").read_text())
        assert status["state"] == "paused"
        t0 = time.monotonic()
        undrain(run, "kernel-update")
        await server.wait_for(lambda: len(server.events("ready")) > readies, timeout=5)
        assert time.monotonic() - t0 < 1.5  # resumes within about a second
        await server.wait_for(lambda: server.job_state(second) == "processed", timeout=20)
        assert "pause over" in caplog.text
    finally:
        daemon.request_shutdown()
        assert await asyncio.wait_for(task, 10) == 0


async def test_runner_drain_wait_returns_after_the_job(server: FakeBencher, tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = take_daemon_lock(run)  # as `runner up` does
    daemon = drained_daemon(server, tmp_path, sleeper(3.0))
    task = asyncio.create_task(daemon.run())
    try:
        job = server.add_job()
        await server.wait_for(lambda: server.job_state(job) == "running", timeout=20)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bencher_runner", "drain", "--wait", "--timeout", "30",
            env={**os.environ, "BENCHER_RUNNER_RUN_DIR": str(run)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 40)
        assert proc.returncode == 0, err
        assert server.job_state(job) == "processed"  # it returned only after the job ended
        assert b"waiting for" in err
    finally:
        daemon.request_shutdown()
        assert await asyncio.wait_for(task, 10) == 0
        lock.release()


async def test_a_second_runner_up_on_the_host_exits_2_naming_the_first(
    server: FakeBencher, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "BENCHER_RUNNER_RUN_DIR": str(tmp_path / "run"),
        "BENCHER_RUNNER_CACHE_DIR": str(tmp_path / "cache"),
        "BENCHER_RUNNER_KERNEL": str(tmp_path / "no-kernel"),  # claims nothing: only the lock matters
        "BENCHER_RUNNER_KEY": KEY,
    }
    argv = [sys.executable, "-m", "bencher_runner", "up", "--host", server.url, "--runner", server.runner,
            "--no-auto-update", "--no-tuning"]  # fmt: skip
    first = subprocess.Popen(argv, env={**env, "BENCHER_RUNNER_STATE_DIR": str(tmp_path / "s1")},
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        await server.wait_for(lambda: server.connections >= 1, timeout=20)
        second = await asyncio.to_thread(
            subprocess.run, argv, env={**env, "BENCHER_RUNNER_STATE_DIR": str(tmp_path / "s2")},
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 10) == 0
