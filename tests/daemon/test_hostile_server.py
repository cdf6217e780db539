"""The daemon against servers that misbehave: an ack withheld, a `ready` never answered, a huge frame,
and a terminal ack withheld at shutdown (issue #12 finding 3 and 12, issue #13 shutdown spin).

A small scripted WebSocket server on loopback plays the Bencher side; the first connection misbehaves,
later ones behave, so the daemon must recover by itself, use little CPU meanwhile and deliver the result.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bencher_runner.daemon import Daemon, DaemonSettings
from bencher_runner.fakeserver import default_config, default_spec
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.results import IterationOutput, RunResult

from .conftest import KEY

JOB = "550e8400-e29b-41d4-a716-446655440000"


@dataclass
class Scripted:
    """Serves one job; `misbehave(conn_number, event) -> bool` withholds the reply to that event."""

    misbehave: Any = None
    huge_frame_on_first: bool = False
    connections: int = 0
    received: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    job_sent: bool = False
    url: str = ""

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        conn = self.connections
        job_uuid: str | None = None
        try:
            async for frame in ws:
                msg = json.loads(frame)
                event = msg["event"]
                self.received.append((conn, msg))
                if self.misbehave is not None and self.misbehave(conn, event):
                    continue
                if event == "ready":
                    if conn == 1 and self.huge_frame_on_first:
                        await ws.send("x" * (2 * 1024 * 1024))
                        continue
                    if not self.job_sent:
                        self.job_sent = True
                        job_uuid = JOB
                        await ws.send(json.dumps({"event": "job", "uuid": JOB, "spec": default_spec(),
                                                  "config": default_config(), "timeout": 60}))  # fmt: skip
                    else:
                        await asyncio.sleep(min(msg.get("poll_timeout", 30), 1))
                        await ws.send('{"event":"no_job"}')
                elif event in ("running", "heartbeat"):
                    if job_uuid is not None:
                        await ws.send(json.dumps({"event": "ack", "job": job_uuid}))
                elif event in ("completed", "failed", "canceled"):
                    await ws.send(json.dumps({"event": "ack", "job": msg["job"]}))
                    job_uuid = None
        except ConnectionClosed:
            pass

    def terminal(self) -> list[tuple[int, dict[str, Any]]]:
        return [(c, m) for c, m in self.received if m["event"] in ("completed", "failed", "canceled")]


@contextlib.asynccontextmanager
async def scripted(server: Scripted) -> AsyncIterator[Scripted]:
    async with serve(server.handler, "127.0.0.1", 0, max_size=None) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        server.url = f"http://127.0.0.1:{port}"
        yield server


def worker(seconds: float) -> Any:
    def run(config: RunConfig, cancel: threading.Event) -> RunResult:
        if cancel.wait(seconds):
            return RunResult("failed", [], None, error="canceled")
        return RunResult("completed", [IterationOutput(0, stdout=b"ok")], None)

    return run


def settings(url: str, tmp_path: Path, **overrides: Any) -> DaemonSettings:
    fields: dict[str, Any] = {
        "host": url,
        "runner": "r1",
        "key": KEY,
        "state_dir": tmp_path / "state",
        "poll_timeout": 1,
        "auto_update": False,
        "ack_timeout": 1.5,
        "poll_margin": 1.0,
        "backoff_base": 0.2,
        "backoff_cap": 0.5,
    }
    fields.update(overrides)
    return DaemonSettings(**fields)


async def until(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_withheld_heartbeat_ack_reconnects_with_little_cpu_and_delivers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (issue #12 finding 3): the daemon spun at 100% CPU logging "no reply to `heartbeat`"
    ~10,000 times a second, never reconnected and never delivered the result."""
    caplog.set_level(logging.INFO, logger="bencher_runner")
    server = Scripted(misbehave=lambda conn, event: conn == 1 and event == "heartbeat")
    async with scripted(server):
        daemon = Daemon(settings(server.url, tmp_path), worker(4.0))
        task = asyncio.create_task(daemon.run())
        cpu0 = time.process_time()
        await until(lambda: server.connections >= 2, 10)
        await until(lambda: bool(server.terminal()), 15)
        cpu = time.process_time() - cpu0
        daemon.request_shutdown()
        assert await asyncio.wait_for(task, 10) == 0
    assert server.terminal()[0][1] == {
        "event": "completed",
        "job": JOB,
        "results": [{"exit_code": 0, "stdout": "ok"}],
    }
    assert server.terminal()[0][0] >= 2
    assert cpu < 1.5, f"{cpu:.2f} s of CPU in the test process while waiting"
    assert caplog.text.count("no reply to `heartbeat`") <= 3
    assert not list((tmp_path / "state" / "outbox").glob("*.json"))


async def test_ready_never_answered_reconnects_after_the_poll_deadline(tmp_path: Path) -> None:
    server = Scripted(misbehave=lambda conn, event: conn == 1 and event == "ready")
    async with scripted(server):
        daemon = Daemon(settings(server.url, tmp_path), worker(0.1))
        task = asyncio.create_task(daemon.run())
        cpu0 = time.process_time()
        t0 = time.monotonic()
        await until(lambda: server.connections >= 2, 10)
        waited = time.monotonic() - t0
        await until(lambda: bool(server.terminal()), 10)
        cpu = time.process_time() - cpu0
        daemon.request_shutdown()
        assert await asyncio.wait_for(task, 10) == 0
    assert 1.5 <= waited < 6  # poll_timeout 1 + margin 1, then the backoff
    assert cpu < 1.5


async def test_a_huge_frame_is_refused_without_the_memory(tmp_path: Path) -> None:
    """Regression (issue #12 finding 12): max_size=None let one 300 MB frame take 654 MB."""
    server = Scripted(huge_frame_on_first=True)
    async with scripted(server):
        daemon = Daemon(settings(server.url, tmp_path), worker(0.1))
        task = asyncio.create_task(daemon.run())
        await until(lambda: server.connections >= 2, 10)
        await until(lambda: bool(server.terminal()), 10)
        daemon.request_shutdown()
        assert await asyncio.wait_for(task, 10) == 0
    assert server.terminal()[0][1]["event"] == "completed"


SCRIPT = """
import sys, threading
from pathlib import Path
from bencher_runner.daemon import DaemonSettings, run_daemon
from bencher_runner.spec.results import IterationOutput, RunResult

def executor(config, cancel):
    print("job started", flush=True)
    cancel.wait(1.0)
    return RunResult("completed", [IterationOutput(0, stdout=b"done")], None)

settings = DaemonSettings(host=sys.argv[1], runner="r1", key=sys.argv[2], state_dir=Path(sys.argv[3]),
                          poll_timeout=1, auto_update=False, on_shutdown="finish")
sys.exit(run_daemon(settings, executor))
"""


async def test_sigterm_with_the_terminal_ack_withheld_exits_in_time_and_keeps_the_result(
    tmp_path: Path,
) -> None:
    """Regression (issue #13, "shutdown spin"): 246,624 log lines in 11 s, a full core, never exited."""
    server = Scripted(misbehave=lambda conn, event: event == "completed")
    state = tmp_path / "state"
    async with scripted(server):
        proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, server.url, KEY, str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            await until(lambda: any(m["event"] == "running" for _, m in server.received), 20)
            proc.send_signal(signal.SIGTERM)  # finish the job, then deliver within one ack timeout
            t0 = time.monotonic()
            code = await asyncio.to_thread(proc.wait, 20)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
        assert code == 0, stderr
        assert took < 7, (took, stderr[-2000:])
        lines = stderr.splitlines()
        assert len(lines) < 40 and max(lines.count(line) for line in lines) <= 3, stderr[-2000:]
        assert [m["event"] for _, m in server.terminal()] == ["completed"]
        assert len(list((state / "outbox").glob("*.json"))) == 1  # kept for the next start

        # The next start sends it first, before `ready`.
        server.misbehave = None
        server.job_sent = True
        before = len(server.received)
        daemon = Daemon(settings(server.url, tmp_path), worker(0.1))
        task = asyncio.create_task(daemon.run())
        await until(lambda: len(server.terminal()) >= 2, 10)
        await until(lambda: not list((state / "outbox").glob("*.json")), 5)
        daemon.request_shutdown()
        assert await asyncio.wait_for(task, 10) == 0
        first = server.received[before][1]
        assert first["event"] == "completed" and first["job"] == JOB
