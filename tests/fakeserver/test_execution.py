"""Executing state, ported from `plus/api_runners/tests/jobs/websocket.rs` (notes 6.2 "Execution").

One test per bullet of the notes; the upstream tests each covers are named in its docstring.
"""

import asyncio
import contextlib
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from bencher_runner.fakeserver import FakeBencher, default_config, default_spec

from .conftest import (
    HEARTBEAT,
    RUNNING,
    WAIT,
    Clock,
    MakeServer,
    ack,
    assert_closed_with,
    assert_dropped,
    assert_idle,
    assert_silent,
    canceled,
    claim,
    completed,
    exchange,
    failed,
    open_channel,
    ready,
    recv,
    send,
    start_job,
)


@pytest.mark.parametrize("end", ["completed", "failed", "full_spec", "multi_job"])
async def test_full_lifecycles(server: FakeBencher, end: str) -> None:
    """channel_lifecycle_completed, channel_lifecycle_failed, channel_lifecycle_with_full_spec,
    channel_multi_job_cycle: ready -> job -> running -> heartbeat -> terminal, each answered with
    `ack {job}`, the connection kept open, and (multi_job) a second job on the same connection."""
    config = default_config(
        entrypoint=["/bin/sh", "-c"], cmd=["cargo bench"], env={"RUST_LOG": "info"}, file_paths=["/o.json"]
    )
    jobs = [server.add_job(config=config if end == "full_spec" else None)]
    if end == "multi_job":
        jobs.append(server.add_job())
    async with open_channel(server) as ws:
        for job in jobs:
            message = await exchange(ws, ready(5))
            assert message["event"] == "job" and message["uuid"] == job
            if end == "full_spec":
                assert {k: message["config"][k] for k in ("entrypoint", "cmd", "env", "file_paths")} == {
                    "entrypoint": ["/bin/sh", "-c"],
                    "cmd": ["cargo bench"],
                    "env": {"RUST_LOG": "info"},
                    "file_paths": ["/o.json"],
                }
            assert await exchange(ws, RUNNING) == ack(job)
            assert server.job_state(job) == "running"
            assert await exchange(ws, HEARTBEAT) == ack(job)
            if end == "failed":
                assert await exchange(ws, failed(job, "segfault", [{"exit_code": 1}])) == ack(job)
                assert server.job_state(job) == "failed"
                assert server.results(job) == {"results": [{"exit_code": 1}], "error": "segfault"}
            else:
                assert await exchange(ws, completed(job)) == ack(job)
                assert server.job_state(job) == "processed"
        await assert_silent(ws)  # no Close frame after a terminal ack
    assert server.connections == 1


async def test_invalid_json_is_ignored(server: FakeBencher) -> None:
    """channel_invalid_json: unparseable text during a job gets no reply and keeps the connection,
    whatever way it fails to parse (bad JSON, unknown event, missing field, wrong type)."""
    async with open_channel(server) as ws:
        job = await claim(server, ws)
        for text in (
            "not valid json{{{",
            '{"event":"surprise"}',
            '{"event":"completed","job":"' + job + '"}',
            '{"event":"failed","job":"' + job + '","results":[]}',
            '{"event":"completed","job":"not-a-uuid","results":[]}',
            '{"event":"completed","job":"' + job + '","results":[{"exit_code":"0"}]}',
            "[1,2]",
            '{"event":"ready","poll_timeout":0}',
        ):
            await send(ws, text)
            await assert_silent(ws, 0.1)
        assert server.job_state(job) == "claimed"
        assert await exchange(ws, RUNNING) == ack(job)
        assert server.job_state(job) == "running"


async def test_binary_frames_are_ignored(server: FakeBencher) -> None:
    """channel_binary_message: binary frames during a job get no reply; the connection keeps working."""
    async with open_channel(server) as ws:
        job = await claim(server, ws)
        await ws.send(b"\x00\x01\x02\x03")
        assert await exchange(ws, RUNNING) == ack(job)
        await ws.send(b"\xff" * 100)
        await assert_silent(ws, 0.1)
        assert await exchange(ws, HEARTBEAT) == ack(job)


async def test_ping_gets_pong(server: FakeBencher) -> None:
    """channel_ping_pong: a ping during a job is answered with a pong carrying the same data."""
    async with open_channel(server) as ws:
        await claim(server, ws)
        latency = await asyncio.wait_for(await ws.ping(b"hello"), WAIT)
        assert latency >= 0


async def test_pings_do_not_reset_the_heartbeat_timeout(make_server: MakeServer) -> None:
    """channel_ping_does_not_reset_heartbeat_timeout: only protocol messages count as liveness during a
    job, so a runner that only pings is timed out and its job failed."""
    server = await make_server(heartbeat_timeout=1.0)
    async with open_channel(server) as ws:
        job = await start_job(server, ws)

        async def keep_pinging() -> None:
            while True:
                await ws.ping(b"keep-alive")
                await asyncio.sleep(0.1)

        pinger = asyncio.create_task(keep_pinging())
        try:
            await assert_closed_with(ws, 1000, '"heartbeat_timeout"')
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
    assert server.job_state(job) == "failed"


@pytest.mark.parametrize("before", ["claimed", "running"])
async def test_heartbeat_timeout_fails_the_job_and_closes(make_server: MakeServer, before: str) -> None:
    """channel_heartbeat_timeout, channel_close_reason_on_heartbeat_timeout: silence during a job fails
    it and the server sends Close 1000 with the JSON reason `"heartbeat_timeout"` (quotes included),
    whether the job was running or only claimed."""
    server = await make_server(heartbeat_timeout=1.0)
    async with open_channel(server) as ws:
        job = await (start_job(server, ws) if before == "running" else claim(server, ws))
        await assert_closed_with(ws, 1000, '"heartbeat_timeout"')
    assert server.job_state(job) == "failed"
    assert server.results(job) is None


async def test_hard_timeout_on_silence_cancels_and_closes(make_server: MakeServer, clock: Clock) -> None:
    """channel_job_timeout: when the read timeout fires and the job has run past timeout + grace (10 +
    60 s here), it is canceled, not failed, and the Close reason is `"job_timeout_exceeded"`."""
    server = await make_server(heartbeat_timeout=1.0, grace_period=60.0)
    async with open_channel(server) as ws:
        job = await claim(server, ws, server.add_job(timeout=10))
        assert await exchange(ws, RUNNING) == ack(job)
        assert await exchange(ws, HEARTBEAT) == ack(job)
        clock.advance(75)
        await assert_closed_with(ws, 1000, '"job_timeout_exceeded"')
    assert server.job_state(job) == "canceled"


@pytest.mark.parametrize(
    ("send_running", "advance", "reply", "state"),
    [
        (True, 75, "cancel", "canceled"),  # channel_heartbeat_detects_job_timeout
        (True, 71, "cancel", "canceled"),
        (True, 70, "ack", "running"),  # exactly at the limit is not past it
        (True, 69, "ack", "running"),  # channel_heartbeat_no_false_timeout
        (False, 500, "ack", "claimed"),  # channel_heartbeat_timeout_skipped_before_running
    ],
)
async def test_heartbeat_checks_the_hard_limit(
    server: FakeBencher, clock: Clock, send_running: bool, advance: int, reply: str, state: str
) -> None:
    """channel_heartbeat_detects_job_timeout, channel_heartbeat_no_false_timeout,
    channel_heartbeat_timeout_skipped_before_running: a heartbeat more than timeout + grace (10 + 60 s)
    after `running` gets `cancel` and the job is canceled; at or under the limit, or before `running`
    (no start time), it gets `ack`."""
    async with open_channel(server) as ws:
        job = await claim(server, ws, server.add_job(timeout=10))
        if send_running:
            assert await exchange(ws, RUNNING) == ack(job)
            clock.advance(5)
            assert await exchange(ws, HEARTBEAT) == ack(job)
            clock.advance(advance - 5)
        else:
            clock.advance(advance)
        expected = {"event": "cancel"} if reply == "cancel" else ack(job)
        assert await exchange(ws, HEARTBEAT) == expected
        assert server.job_state(job) == state


async def test_cancel_is_detected_on_heartbeat(server: FakeBencher) -> None:
    """channel_heartbeat_cancel, channel_canceled_message_over_ws, channel_canceled_acknowledgment: a job
    canceled meanwhile gets `cancel` on the next heartbeat and stays canceled; the connection stays open
    and is idle again, so a heartbeat now gets no reply and the runner's `canceled` is an idle retry
    acked with its uuid."""
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        server.set_status(job, "canceled")
        assert await exchange(ws, HEARTBEAT) == {"event": "cancel"}
        assert server.job_state(job) == "canceled"
        await send(ws, HEARTBEAT)
        await assert_silent(ws)
        assert await exchange(ws, canceled(job)) == ack(job)
        assert server.job_state(job) == "canceled"


async def test_running_on_a_canceled_job_gets_cancel(server: FakeBencher) -> None:
    """channel_running_cancel_on_concurrent_cancellation: `running` for a job canceled between claim and
    start is answered with `cancel`, not `ack`, and the job stays canceled."""
    async with open_channel(server) as ws:
        job = await claim(server, ws)
        server.cancel(job)
        assert await exchange(ws, RUNNING) == {"event": "cancel"}
        assert server.job_state(job) == "canceled"
        await assert_silent(ws)


async def test_runner_sends_canceled_on_its_own(server: FakeBencher) -> None:
    """channel_runner_sends_canceled: `canceled {job}` without a `cancel` first is acked and cancels a
    running job."""
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        assert await exchange(ws, canceled(job)) == ack(job)
        assert server.job_state(job) == "canceled"


async def test_running_twice_is_idempotent(server: FakeBencher, clock: Clock) -> None:
    """channel_running_twice_idempotent: a second `running` gets `ack`, keeps the job running and only
    refreshes its liveness (the start time does not move)."""
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        started = server.jobs[job].started
        clock.advance(3)
        assert await exchange(ws, RUNNING) == ack(job)
        assert server.job_state(job) == "running"
        assert server.jobs[job].started == started
        assert server.jobs[job].last_heartbeat == clock.now


async def test_completed_before_running_drops_the_connection(make_server: MakeServer, clock: Clock) -> None:
    """channel_completed_before_running, channel_completed_rejects_non_terminal_unexpected_state:
    `completed` while the job is only claimed is an invalid transition: no ack, the connection is
    dropped, the job stays claimed (and the disconnect timeout later fails it)."""
    server = await make_server(heartbeat_timeout=1.0)
    async with open_channel(server) as ws:
        job = await claim(server, ws)
        await send(ws, completed(job))
        await assert_dropped(ws)
    assert server.job_state(job) == "claimed"
    assert server.results(job) is None
    clock.advance(2)  # the server clock passes the heartbeat timeout too
    await server.wait_for(lambda: server.job_state(job) == "failed", timeout=WAIT)


async def test_failed_from_claimed_is_allowed(server: FakeBencher) -> None:
    """channel_failed_from_claimed: `failed` before `running` is acked and fails the job."""
    async with open_channel(server) as ws:
        job = await claim(server, ws)
        reply = await exchange(ws, failed(job, "command not found", [{"exit_code": 127}]))
        assert reply == ack(job)
        assert server.job_state(job) == "failed"
        assert server.results(job) == {"results": [{"exit_code": 127}], "error": "command not found"}


@pytest.mark.parametrize("terminal", ["completed", "failed", "canceled"])
async def test_terminal_messages_get_an_ack_without_a_close(server: FakeBencher, terminal: str) -> None:
    """channel_completed_ack_no_close, channel_failed_ack_no_close, channel_canceled_ack_no_close: after
    the terminal ack the connection stays open and idle."""
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        message = {"completed": completed(job), "failed": failed(job), "canceled": canceled(job)}[terminal]
        assert await exchange(ws, message) == ack(job)
        assert server.job_state(job) == {"completed": "processed"}.get(terminal, terminal)
        await assert_silent(ws)
        await assert_idle(ws)


def _reject_unparseable(results: list[dict[str, Any]]) -> bool:
    """A stand-in for the server's adapter: only `bench <n>` lines parse."""
    texts = [
        text for r in results for text in ([*r["output"].values()] if "output" in r else [r.get("stdout")])
    ]
    return all(text is None or text.startswith("bench ") for text in texts)


@pytest.mark.parametrize(
    ("event", "results", "state"),
    [
        # channel_completed_with_output: stdout plus a file the adapter cannot parse -> failed
        ("completed", [{"exit_code": 0, "stdout": "line\n", "output": {"/o/r.json": "final"}}], "failed"),
        # channel_completed_with_stderr_only
        ("completed", [{"exit_code": 0, "stderr": "warning: variance high\n"}], "processed"),
        # channel_completed_multiple_iterations: three empty iterations -> processed
        ("completed", [{"exit_code": 0}] * 3, "processed"),
        # channel_completed_multiple_iterations_with_file_output: unparseable files -> failed
        ("completed", [{"exit_code": 0, "output": {"/o/1": "x"}}, {"exit_code": 0, "output": {"/2": "y"}}],
         "failed"),
        # channel_completed_result_processing_failure
        ("completed", [{"exit_code": 0, "stdout": "this is not valid benchmark output"}], "failed"),
        # parseable output -> processed
        ("completed", [{"exit_code": 0, "stdout": "bench 42\n"}], "processed"),
        # channel_completed (empty results) -> processed
        ("completed", [], "processed"),
        # channel_failed_with_output, channel_failed_multiple_iterations
        ("failed", [{"exit_code": 1, "stdout": "partial\n", "stderr": "err\n"}], "failed"),
        ("failed", [{"exit_code": 0}, {"exit_code": 1, "stderr": "crashed on 2\n"}], "failed"),
    ],
)  # fmt: skip
async def test_output_variants(
    make_server: MakeServer, event: str, results: list[dict[str, Any]], state: str
) -> None:
    """channel_completed_with_output, channel_failed_with_output, channel_completed_with_stderr_only,
    channel_completed_multiple_iterations*, channel_failed_multiple_iterations,
    channel_completed_result_processing_failure: each is acked; the output is stored as sent; a
    completed job whose results the adapter (here a stand-in) cannot process ends failed, not processed."""
    server = await make_server(result_check=_reject_unparseable)
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        message = completed(job, results) if event == "completed" else failed(job, "crashed", results)
        assert await exchange(ws, message) == ack(job)
    assert server.job_state(job) == state
    stored: dict[str, Any] = {"results": results}
    if event == "failed":
        stored["error"] = "crashed"
    assert server.results(job) == stored


@pytest.mark.parametrize(
    ("meanwhile", "message", "after"),
    [
        ("canceled", "completed", "canceled"),  # channel_completed_after_concurrent_cancel
        ("failed", "completed", "processed"),  # channel_completed_after_concurrent_failure
        ("completed", "completed", "completed"),  # channel_completed_idempotent_duplicate
        ("processed", "completed", "processed"),
        ("canceled", "failed", "canceled"),  # channel_failed_after_concurrent_cancel
        ("completed", "failed", "completed"),  # channel_failed_after_concurrent_completion
        ("failed", "failed", "failed"),  # channel_failed_idempotent_duplicate
        ("canceled", "canceled", "canceled"),
    ],
)
async def test_terminal_races(server: FakeBencher, meanwhile: str, message: str, after: str) -> None:
    """channel_completed_after_concurrent_cancel, channel_completed_after_concurrent_failure,
    channel_completed_idempotent_duplicate, channel_failed_after_concurrent_cancel,
    channel_failed_after_concurrent_completion, channel_failed_idempotent_duplicate: a terminal message
    for a job whose state changed meanwhile is acked; a late `completed` overrides `failed`, every
    other case keeps the state the race left."""
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        server.set_status(job, meanwhile)
        sent = {"completed": completed(job), "failed": failed(job), "canceled": canceled(job)}[message]
        assert await exchange(ws, sent) == ack(job)
        assert server.job_state(job) == after


@pytest.mark.parametrize("meanwhile", ["failed", "completed", "processed"])
async def test_canceled_after_the_job_has_run_drops_the_connection(
    server: FakeBencher, meanwhile: str
) -> None:
    """(PROTOCOL.md, Server-side rules; handle_canceled) `canceled` for a job already failed, completed
    or processed is an invalid transition: no ack, the connection is dropped, the state stays."""
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        server.set_status(job, meanwhile)
        await send(ws, canceled(job))
        await assert_dropped(ws)
    assert server.job_state(job) == meanwhile


async def test_job_duration_is_recorded(server: FakeBencher, clock: Clock) -> None:
    """channel_completed_records_job_duration: the job's start and end times come from the server
    clock at `running` and at `completed`, so its duration is what elapsed between them."""
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        clock.advance(120)
        assert await exchange(ws, completed(job)) == ack(job)
    record = server.jobs[job]
    assert record.started is not None and record.completed is not None
    assert record.completed - record.started == 120


@pytest.mark.parametrize("extra", [1, 1024 * 1024])
async def test_a_message_over_the_size_limit_drops_the_connection(
    make_server: MakeServer, clock: Clock, extra: int
) -> None:
    """channel_large_message: with a 1 MiB limit, a bigger message ends the connection with no Close
    frame (tungstenite's capacity error), and the job in flight gets the disconnect timeout; a message
    of exactly the limit is read (and, being no JSON, ignored)."""
    limit = 1024 * 1024
    server = await make_server(max_message_size=limit, heartbeat_timeout=1.0)
    async with open_channel(server, max_size=None) as ws:
        job = await start_job(server, ws)
        await send(ws, "x" * limit)
        await assert_silent(ws, 0.2)
        assert await exchange(ws, HEARTBEAT) == ack(job)
        with contextlib.suppress(ConnectionClosed):  # already gone is also a close
            await send(ws, "x" * (limit + extra))
        await assert_dropped(ws)
    assert server.job_state(job) == "running"
    clock.advance(2)
    await server.wait_for(lambda: server.job_state(job) == "failed", timeout=WAIT)


async def test_only_valid_messages_reset_the_read_timeout(make_server: MakeServer) -> None:
    """(notes 6.1 item 9) `ready`, unparseable text and binary frames get no liveness credit during a
    job (a stray `ready` is acked with the job's uuid), so a runner sending only those is timed out;
    heartbeats alone keep the same job alive past the timeout."""
    server = await make_server(heartbeat_timeout=1.5)
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        for _ in range(8):  # 2 s of heartbeats, longer than the timeout
            await asyncio.sleep(0.25)
            assert await exchange(ws, HEARTBEAT) == ack(job)
        assert await exchange(ws, ready(5)) == ack(job)
        stop = asyncio.get_running_loop().time() + WAIT
        while asyncio.get_running_loop().time() < stop:
            try:
                await ws.send("{bad json")
                await ws.send(b"\x00")
                await ws.send('{"event":"ready"}')
                assert await recv(ws) == ack(job)
            except ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.reason == '"heartbeat_timeout"'
                break
        else:
            raise AssertionError("the runner was not timed out")
    assert server.job_state(job) == "failed"


async def test_acks_carry_the_current_jobs_uuid(server: FakeBencher) -> None:
    """(notes 3.3; PROTOCOL.md `ack`) a terminal message naming another job is applied to the current
    job and acked with the current job's uuid."""
    other = "00000000-0000-0000-0000-000000000042"
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        assert await exchange(ws, completed(other, [{"exit_code": 0, "stdout": "x"}])) == ack(job)
    assert server.job_state(job) == "processed"
    assert server.results(job) == {"results": [{"exit_code": 0, "stdout": "x"}]}


async def test_job_message_shape(server: FakeBencher) -> None:
    """(notes 2.3, 6.1 item 8) the `job` message: the claimed job flattened beside `event`, `timeout`
    equal to `config.timeout`, a three-segment unpadded base64url JWT, the config as the server
    re-serializes it (absent and unknown fields left out, a bare registry host given its `/`)."""
    config = {**default_config(registry="http://127.0.0.1:5000", timeout=42), "image": None, "x": 1}
    job = server.add_job(config=config, spec=default_spec(cpu=2))
    async with open_channel(server) as ws:
        message = await exchange(ws, ready(5))
    assert list(message) == ["event", "uuid", "spec", "config", "oci_token", "timeout", "created"]
    assert message["uuid"] == job and message["timeout"] == 42 and message["spec"]["cpu"] == 2
    assert message["config"] == {**default_config(registry="http://127.0.0.1:5000/", timeout=42)}
    segments = message["oci_token"].split(".")
    assert len(segments) == 3 and all(s and "=" not in s for s in segments)
