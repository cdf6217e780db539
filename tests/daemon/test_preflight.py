"""A host that cannot run a job sends no `ready` (issue #13 "never claim what cannot run")."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bencher_runner.daemon import Daemon, DaemonSettings
from bencher_runner.fakeserver import FakeBencher

from .conftest import KEY, sleeper


async def test_no_ready_until_the_host_check_passes(server: FakeBencher, tmp_path: Path) -> None:
    job = server.add_job()
    verdicts = ["no guest kernel bundle in /x; run `runner kernel fetch`"] * 2 + [None] * 100
    checks: list[float] = []

    def check() -> str | None:
        checks.append(time.monotonic())
        return verdicts.pop(0)

    settings = DaemonSettings(host=server.url, runner=server.runner, key=KEY, state_dir=tmp_path / "state",
                              poll_timeout=1, auto_update=False)  # fmt: skip
    daemon = Daemon(settings, sleeper(0.1), host_check=check)
    task = asyncio.create_task(daemon.run())
    try:
        await server.wait_for(lambda: len(checks) >= 1, timeout=10)
        await asyncio.sleep(1.0)
        assert server.events("ready") == [] and server.job_state(job) == "pending"
        # re-checked with backoff (or at once on a new connection): the third check passes, the job runs
        await server.wait_for(lambda: server.job_state(job) == "processed", timeout=30)
        assert len(checks) >= 3
        assert checks[2] - checks[0] >= 1.0  # never a tight loop of checks
        first_ready = server.events("ready")[0][0]
        assert first_ready >= checks[2] - 0.5
    finally:
        daemon.request_shutdown()
        assert await asyncio.wait_for(task, 10) == 0


async def test_runner_up_without_a_kernel_claims_nothing(server: FakeBencher, tmp_path: Path) -> None:
    """Regression (issue #13 finding 2): with an empty cache the daemon sent `ready`, took a job and
    failed it with "no guest kernel bundle". BENCHER_RUNNER_KERNEL names a missing kernel, so nothing
    can be fetched: the daemon must stay connected, say why once, and claim nothing."""
    job = server.add_job()
    env = {
        **os.environ,
        "BENCHER_RUNNER_CACHE_DIR": str(tmp_path / "cache"),
        "BENCHER_RUNNER_STATE_DIR": str(tmp_path / "state"),
        "BENCHER_RUNNER_KERNEL": str(tmp_path / "no-such-vmlinux"),
        "BENCHER_RUNNER_KEY": KEY,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bencher_runner",
            "up",
            "--host",
            server.url,
            "--runner",
            server.runner,
            "--poll-timeout",
            "1",
            "--no-auto-update",
            "--no-tuning",
            "--accel",
            "tcg",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await server.wait_for(lambda: server.connections >= 1, timeout=20)
        await asyncio.sleep(3)
        assert proc.poll() is None
        assert server.events("ready") == []
        assert server.job_state(job) == "pending"
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert code == 0, stderr
    assert stderr.count("not asking for jobs") == 1, stderr
    assert "no-such-vmlinux" in stderr
