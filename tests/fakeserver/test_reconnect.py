"""Reconnects and idle retries, ported from `plus/api_runners/tests/jobs/websocket.rs` (notes 6.2
"Reconnect and idle retries"), plus the disconnect timeout of notes 3.4 and 6.1 item 16.

One test per bullet of the notes; the upstream tests each covers are named in its docstring.
"""

import asyncio

import pytest

from bencher_runner.fakeserver import FakeBencher

from .conftest import (
    RUNNING,
    WAIT,
    Clock,
    MakeServer,
    ack,
    assert_dropped,
    assert_idle,
    canceled,
    claim,
    completed,
    exchange,
    failed,
    open_channel,
    send,
    start_job,
)


def _owned(server: FakeBencher, status: str) -> str:
    """A job this runner claimed earlier, now in `status` (upstream: set_job_runner_id + set_job_status)."""
    job = server.add_job()
    server.jobs[job].runner = server.runner_uuid
    server.set_status(job, status)
    return job


@pytest.mark.parametrize(
    ("status", "message", "after"),
    [
        ("running", "completed", "processed"),  # channel_completed_during_idle
        ("running", "failed", "failed"),  # channel_failed_during_idle
        ("processed", "completed", "processed"),  # channel_completed_during_idle_idempotent
        ("failed", "completed", "processed"),  # channel_completed_overrides_failed
        ("failed", "failed", "failed"),
        ("canceled", "completed", "canceled"),
        ("running", "canceled", "canceled"),
        ("canceled", "canceled", "canceled"),
    ],
)
async def test_terminal_messages_before_ready_are_idle_retries(
    server: FakeBencher, status: str, message: str, after: str
) -> None:
    """channel_completed_during_idle, channel_failed_during_idle, channel_completed_during_idle_idempotent,
    channel_completed_overrides_failed: a terminal message on a new connection before `ready` is looked
    up by uuid, handled by the same rules as during a job and acked with its uuid; the connection stays
    idle."""
    job = _owned(server, status)
    sent = {
        "completed": completed(job, [{"exit_code": 0, "stdout": "late"}]),
        "failed": failed(job),
        "canceled": canceled(job),
    }
    async with open_channel(server) as ws:
        assert await exchange(ws, sent[message]) == ack(job)
        assert server.job_state(job) == after
        await assert_idle(ws)
    if (status, message) == ("failed", "completed"):
        assert server.results(job) == {"results": [{"exit_code": 0, "stdout": "late"}]}


@pytest.mark.parametrize("whose", ["unknown", "foreign", "uppercase"])
async def test_idle_retry_for_an_unknown_job_is_acked_with_its_uuid(server: FakeBencher, whose: str) -> None:
    """channel_completed_wrong_job_uuid_during_idle, channel_failed_wrong_job_uuid_during_idle: a retry
    for a job the server does not know, or that another runner claimed, changes nothing and is still
    acked with the message's uuid (as the uuid crate writes it)."""
    if whose == "foreign":
        other = server.add_runner("other")
        job = server.add_job()
        server.jobs[job].runner = other.uuid
        server.set_status(job, "running")
    else:
        job = (
            "00000000-0000-0000-0000-0000000000AB"
            if whose == "uppercase"
            else "00000000-0000-0000-0000-000000000099"
        )
    async with open_channel(server) as ws:
        assert await exchange(ws, completed(job)) == ack(job.lower())
        assert await exchange(ws, failed(job, "pretend failure")) == ack(job.lower())
        assert await exchange(ws, canceled(job)) == ack(job.lower())
    if whose == "foreign":
        assert server.job_state(job) == "running"


@pytest.mark.parametrize(
    ("status", "message"), [("failed", "canceled"), ("processed", "canceled"), ("claimed", "completed")]
)
async def test_idle_retry_of_an_invalid_transition_drops_the_connection(
    server: FakeBencher, status: str, message: str
) -> None:
    """(notes 3.6, 9.2) idle retries follow the same rules: `canceled` after failed/completed and
    `completed` for a job still claimed drop the connection with no ack."""
    job = _owned(server, status)
    async with open_channel(server) as ws:
        await send(ws, canceled(job) if message == "canceled" else completed(job))
        await assert_dropped(ws)
    assert server.job_state(job) == status


async def test_disconnect_during_a_job_fails_it_after_the_heartbeat_timeout(
    make_server: MakeServer, clock: Clock
) -> None:
    """(notes 3.4, 6.1 item 16; upstream `spawn_heartbeat_timeout_fails_running_job`) a runner that
    drops mid-job leaves it running until `heartbeat_timeout` has passed, then it is failed; heartbeats
    on a new connection are ignored (idle) and do not save it; a late `completed` still overrides."""
    server = await make_server(heartbeat_timeout=1.0)
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
    assert server.job_state(job) == "running"
    clock.advance(2)  # by the server clock too, the last heartbeat is older than the timeout
    async with open_channel(server) as ws:
        await send(ws, {"event": "heartbeat"})
        await server.wait_for(lambda: server.job_state(job) == "failed", timeout=WAIT)
    async with open_channel(server) as ws:  # (the idle one above times out as fast as the job)
        assert await exchange(ws, completed(job)) == ack(job)
    assert server.job_state(job) == "processed"


async def test_disconnect_past_the_hard_limit_cancels(make_server: MakeServer, clock: Clock) -> None:
    """(notes 3.4) the disconnect timeout cancels, rather than fails, a job past timeout + grace."""
    server = await make_server(heartbeat_timeout=1.0)
    async with open_channel(server) as ws:
        job = await claim(server, ws, server.add_job(timeout=10))
        assert await exchange(ws, RUNNING) == ack(job)
    clock.advance(71)  # past 10 + 60 s
    await server.wait_for(lambda: server.job_state(job) == "canceled", timeout=WAIT)


async def test_disconnect_check_waits_while_the_job_is_heard_from(
    make_server: MakeServer, clock: Clock
) -> None:
    """(notes 3.4) when the disconnect check finds a heartbeat newer than `heartbeat_timeout` (here: the
    server clock has not moved), it checks again later instead of failing the job."""
    server = await make_server(heartbeat_timeout=1.0)
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
    await asyncio.sleep(2.2)  # two checks or more: each finds the heartbeat fresh
    assert server.job_state(job) == "running"
    clock.advance(1)
    await server.wait_for(lambda: server.job_state(job) == "failed", timeout=WAIT)
