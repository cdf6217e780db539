"""The daemon over many jobs, and as a real process receiving SIGTERM."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bencher_runner.fakeserver import FakeBencher

from .conftest import KEY, Runner, sleeper

Start = Callable[..., Runner]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def disk_use(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


async def test_200_jobs_without_growth(server: FakeBencher, start: Start, tmp_path: Path) -> None:
    runner = start(sleeper(0.0))
    warmup = [server.add_job() for _ in range(10)]
    await server.wait_for(lambda: all(server.job_state(j) == "processed" for j in warmup), timeout=60)
    fds, threads, state = open_fds(), threading.active_count(), disk_use(tmp_path / "state")
    children = len(os.listdir(f"/proc/{os.getpid()}/task"))
    jobs = [server.add_job() for _ in range(200)]
    await server.wait_for(lambda: all(server.job_state(j) == "processed" for j in jobs), timeout=240)
    assert all(server.output_writes(j) == 1 for j in jobs)  # each result recorded exactly once
    await asyncio.sleep(0.5)
    assert open_fds() <= fds + 2
    assert threading.active_count() <= threads + 1
    assert len(os.listdir(f"/proc/{os.getpid()}/task")) <= children + 1
    assert disk_use(tmp_path / "state") <= state  # the outbox is empty again
    assert await runner.stop() == 0


SCRIPT = """
import sys, threading
from collections.abc import Callable
from pathlib import Path
from bencher_runner.daemon import DaemonSettings, run_daemon
from bencher_runner.spec.results import IterationOutput, RunResult

def executor(config, cancel):
    print("job started", flush=True)
    if cancel.wait(60):
        return RunResult("failed", [], None, error="canceled by shutdown")
    return RunResult("completed", [IterationOutput(0, stdout=b"done")], None)

settings = DaemonSettings(host=sys.argv[1], runner=sys.argv[2], key=sys.argv[3], state_dir=Path(sys.argv[4]),
                          poll_timeout=1, auto_update=False)
sys.exit(run_daemon(settings, executor))
"""


async def test_sigterm_cancels_the_job_reports_it_and_exits_0(server: FakeBencher, tmp_path: Path) -> None:
    job = server.add_job()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, server.url, server.runner, KEY, str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await server.wait_for(lambda: server.job_state(job) == "running", timeout=20)
        await asyncio.sleep(1.5)  # a heartbeat or two
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
        assert code == 0, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() - started < 10
        assert server.job_state(job) == "failed"
        assert "canceled by shutdown" in (server.results(job) or {}).get("error", "")
        assert list((tmp_path / "state" / "outbox").glob("*")) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
