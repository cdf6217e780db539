"""Server shutdown, ported from `plus/api_runners/tests/jobs/websocket.rs` (notes 6.2 "Shutdown"), plus
the startup recovery that follows it (notes 3.4)."""

import asyncio

import pytest

from .conftest import (
    WAIT,
    Clock,
    MakeServer,
    ack,
    assert_closed_with,
    claim,
    completed,
    exchange,
    open_channel,
    ready,
    send,
    start_job,
)


@pytest.mark.parametrize("state", ["idle", "polling", "claimed", "running"])
async def test_close_1001_on_server_shutdown(make_server: MakeServer, clock: Clock, state: str) -> None:
    """channel_closes_on_server_shutdown, channel_shutdown_midjob_preserves_job: on shutdown the server
    sends Close 1001 `server shutting down` whatever the connection is doing; a job in flight is left
    as it was (claimed or running) and no disconnect timeout is scheduled for it."""
    server = await make_server(heartbeat_timeout=1.0)
    job = None
    async with open_channel(server) as ws:
        if state == "polling":
            await send(ws, ready(30))
            await server.wait_for(lambda: any(s.state == "polling" for s in server._sessions.values()))
        elif state == "claimed":
            job = await claim(server, ws)
        elif state == "running":
            job = await start_job(server, ws)
        stopping = asyncio.create_task(server.stop())
        await assert_closed_with(ws, 1001, "server shutting down")
        await asyncio.wait_for(stopping, WAIT)
    if job is not None:
        clock.advance(5)
        await asyncio.sleep(1.3)  # past the heartbeat timeout: nothing fails the job
        assert server.job_state(job) == state


async def test_restart_recovers_jobs_left_in_flight(make_server: MakeServer, clock: Clock) -> None:
    """(notes 3.4, `spawn_job_recovery`) after a restart the running job is failed once
    `heartbeat_timeout` passes without its result; a runner that delivers the result on a new
    connection first gets it processed instead."""
    server = await make_server(heartbeat_timeout=1.0)
    async with open_channel(server) as ws:
        lost = await start_job(server, ws)
        await server.restart()
    clock.advance(2)
    await server.wait_for(lambda: server.job_state(lost) == "failed", timeout=WAIT)

    saved = server.add_job()
    async with open_channel(server) as ws:
        await claim(server, ws, saved)
        await exchange(ws, {"event": "running"})
        await server.restart()
    async with open_channel(server) as ws:
        assert await exchange(ws, completed(saved)) == ack(saved)
    assert server.job_state(saved) == "processed"
    clock.advance(2)
    await asyncio.sleep(1.3)  # past the recovery check: the result stays
    assert server.job_state(saved) == "processed"


async def test_restart_fails_orphaned_claims(make_server: MakeServer, clock: Clock) -> None:
    """(notes 3.4, `recover_orphaned_claimed_jobs`) a job claimed more than `heartbeat_timeout` before
    the restart (by the server clock) is failed at start."""
    server = await make_server(heartbeat_timeout=5.0)
    async with open_channel(server) as ws:
        job = await claim(server, ws)
        await server.stop()
    clock.advance(6)
    await server.start(server.port)
    assert server.job_state(job) == "failed"
