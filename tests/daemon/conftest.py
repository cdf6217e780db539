import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.daemon import Daemon, DaemonSettings
from bencher_runner.fakeserver import FakeBencher
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.errors import CanceledError
from bencher_runner.spec.results import IterationOutput, RunResult

KEY = "bencher_runner_" + "a1" * 15


def sleeper(
    seconds: float = 0.2, stdout: bytes = b"bench 42\n"
) -> Callable[[RunConfig, threading.Event], RunResult]:
    def run(config: RunConfig, cancel: threading.Event) -> RunResult:
        if cancel.wait(seconds):
            return RunResult("failed", [], None, error=str(CanceledError("job canceled")))
        return RunResult("completed", [IterationOutput(0, stdout=stdout)], None)

    return run


def blocker(started: threading.Event | None = None) -> Callable[[RunConfig, threading.Event], RunResult]:
    """Holds the worker thread (busy, GIL-heavy) until canceled."""

    def run(config: RunConfig, cancel: threading.Event) -> RunResult:
        if started is not None:
            started.set()
        while not cancel.is_set():
            sum(range(20_000))
        return RunResult("failed", [], None, error="job canceled")

    return run


@pytest.fixture
async def server() -> AsyncIterator[FakeBencher]:
    srv = FakeBencher(key=KEY, heartbeat_timeout=3.0, grace_period=60.0)
    await srv.start()
    yield srv
    await srv.close()


class Runner:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.task: asyncio.Task[int] = asyncio.create_task(daemon.run())

    async def stop(self, timeout: float = 5.0) -> int:
        self.daemon.request_shutdown()
        return await asyncio.wait_for(self.task, timeout)


@pytest.fixture
async def start(server: FakeBencher, tmp_path: Path) -> AsyncIterator[Callable[..., Runner]]:
    runners: list[Runner] = []

    def make(executor: Callable[[RunConfig, threading.Event], RunResult], **overrides: Any) -> Runner:
        fields: dict[str, Any] = {
            "host": server.url,
            "runner": server.runner,
            "key": KEY,
            "state_dir": tmp_path / "state",
            "poll_timeout": 1,
            "auto_update": False,
            "ack_timeout": 2.0,
            "backoff_base": 0.05,
            "backoff_cap": 0.3,
        }
        fields.update(overrides)
        runner = Runner(Daemon(DaemonSettings(**fields), executor))
        runners.append(runner)
        return runner

    yield make
    for r in runners:
        if not r.task.done():
            r.daemon.request_shutdown()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(r.task, 5)
        if not r.task.done():
            r.task.cancel()


def elapsed(t0: float) -> float:
    return time.monotonic() - t0
