"""Helpers for driving the fake server with a plain `websockets` client, as the upstream channel tests
drive the real one with tokio-tungstenite: exact frames, close codes and job states.

Timing rules (the machine is shared): a test waits for what must happen with a generous bound, and only
asserts that something does not happen over a short window that the server's own timers cannot reach
sooner. Long server timeouts (the hard limit) are simulated by advancing the injected clock.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from bencher_runner.fakeserver import FakeBencher

KEY = "bencher_runner_Ab3xY9mN2pQ7rS4tU8vW1zK5jL0fGh"
WAIT = 5.0  # upper bound for something that must happen (loaded machine)
QUIET = 0.3  # window in which something must not happen


class Clock:
    """The server clock, advanced by hand (like the upstream tests' mock clock)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakeServer = Callable[..., Awaitable[FakeBencher]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_server(clock: Clock) -> AsyncIterator[MakeServer]:
    servers: list[FakeBencher] = []

    async def make(**options: Any) -> FakeBencher:
        settings: dict[str, Any] = {
            "key": KEY,
            "heartbeat_timeout": 30.0,
            "poll_interval": 0.05,
            "clock": clock,
            "close_timeout": 1.0,
        }
        settings.update(options)
        server = FakeBencher(**settings)
        servers.append(server)
        return await server.start()

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def server(make_server: MakeServer) -> FakeBencher:
    return await make_server()


def channel_url(server: FakeBencher, runner: str | None = None) -> str:
    return f"ws://127.0.0.1:{server.port}/v0/runners/{runner or server.runner}/channel"


def open_channel(
    server: FakeBencher,
    key: str | None = KEY,
    *,
    runner: str | None = None,
    authorization: str | None = None,
    max_size: int | None = None,
) -> Any:
    """`async with open_channel(server) as ws`: a plain client, no pings, no compression."""
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return connect(
        channel_url(server, runner),
        additional_headers=headers,
        ping_interval=None,
        compression=None,
        max_size=max_size,
        open_timeout=WAIT,
        close_timeout=1.0,
    )


async def send(ws: ClientConnection, message: dict[str, Any] | str) -> None:
    await ws.send(message if isinstance(message, str) else json.dumps(message))


async def recv(ws: ClientConnection, timeout: float = WAIT) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(frame, str), frame
    message = json.loads(frame)
    assert isinstance(message, dict)
    return message


async def exchange(ws: ClientConnection, message: dict[str, Any] | str) -> dict[str, Any]:
    await send(ws, message)
    return await recv(ws)


async def assert_silent(ws: ClientConnection, seconds: float = QUIET) -> None:
    """Nothing arrives for `seconds`, and the connection is still open."""
    try:
        frame = await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return
    raise AssertionError(f"expected silence, got {frame!r}")


async def assert_dropped(ws: ClientConnection, timeout: float = WAIT) -> None:
    """The server ends the connection without a message and without a Close frame."""
    try:
        frame = await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosedError as exc:
        assert exc.rcvd is None, f"expected no Close frame, got {exc.rcvd}"
        return
    except ConnectionClosed as exc:
        raise AssertionError(f"expected an abrupt end, got a clean close {exc.rcvd}") from None
    raise AssertionError(f"expected the connection to be dropped, got {frame!r}")


async def assert_closed_with(ws: ClientConnection, code: int, reason: str, timeout: float = WAIT) -> None:
    """The server sends a Close frame with exactly this code and reason (and nothing before it)."""
    try:
        frame = await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, "expected a Close frame, the connection was dropped"
        assert (exc.rcvd.code, exc.rcvd.reason) == (code, reason)
        return
    raise AssertionError(f"expected a Close frame, got {frame!r}")


UNKNOWN_JOB = "00000000-0000-0000-0000-0000000000ff"


async def assert_idle(ws: ClientConnection) -> None:
    """The connection is open and idle on the server: only Idle acks a terminal message with the
    message's own uuid (during a job the ack names the current job; while polling nothing answers)."""
    await send(ws, completed(UNKNOWN_JOB))
    assert await recv(ws) == ack(UNKNOWN_JOB)


def ready(poll_timeout: int | None = 5, **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"event": "ready"}
    if poll_timeout is not None:
        message["poll_timeout"] = poll_timeout
    message.update(extra)
    return message


RUNNING = {"event": "running"}
HEARTBEAT = {"event": "heartbeat"}


def completed(job: str, results: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"event": "completed", "job": job, "results": [{"exit_code": 0}] if results is None else results}


def failed(job: str, error: str = "boom", results: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"event": "failed", "job": job, "results": results or [], "error": error}


def canceled(job: str) -> dict[str, Any]:
    return {"event": "canceled", "job": job}


def ack(job: str) -> dict[str, Any]:
    return {"event": "ack", "job": job}


async def claim(server: FakeBencher, ws: ClientConnection, job: str | None = None) -> str:
    """`setup_claimed_job`: queue a job (unless given), send `ready`, receive it."""
    job = job or server.add_job()
    message = await exchange(ws, ready(5))
    assert message["event"] == "job" and message["uuid"] == job, message
    assert server.job_state(job) == "claimed"
    return job


async def start_job(server: FakeBencher, ws: ClientConnection) -> str:
    job = await claim(server, ws)
    assert await exchange(ws, RUNNING) == ack(job)
    assert server.job_state(job) == "running"
    return job
