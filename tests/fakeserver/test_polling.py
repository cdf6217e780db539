"""Idle and Polling states, ported from `plus/api_runners/tests/jobs/main.rs` and `websocket.rs` (notes
6.2 "Polling and claiming"), plus the idle rules of notes 3.1 and 6.1 items 4-6.

One test per bullet of the notes; the upstream tests each covers are named in its docstring.
"""

import asyncio
import time

import pytest

from bencher_runner.fakeserver import FakeBencher, Priority, default_config, default_spec

from .conftest import (
    HEARTBEAT,
    KEY,
    RUNNING,
    WAIT,
    Clock,
    MakeServer,
    ack,
    assert_dropped,
    assert_idle,
    assert_silent,
    claim,
    completed,
    exchange,
    failed,
    open_channel,
    ready,
    recv,
    send,
)

SPEC_B = default_spec(uuid="00000000-0000-0000-0000-00000000000b", slug="fake-b")


async def test_no_jobs_gives_no_job(server: FakeBencher) -> None:
    """claim_job_no_jobs: a `ready` with nothing to claim ends with `no_job` (and no ack for `ready`)."""
    async with open_channel(server) as ws:
        assert await exchange(ws, ready(1)) == {"event": "no_job"}


async def test_no_job_arrives_only_at_the_deadline(server: FakeBencher) -> None:
    """poll_timeout_delays_nojob: nothing arrives before `poll_timeout` (1 s) has passed, then
    `no_job`; the connection is idle again and the next `ready` polls again."""
    async with open_channel(server) as ws:
        t0 = time.monotonic()
        await send(ws, ready(1))
        await assert_silent(ws, 0.7)
        assert await recv(ws) == {"event": "no_job"}
        assert time.monotonic() - t0 >= 1.0
        assert await exchange(ws, ready(1)) == {"event": "no_job"}


@pytest.mark.parametrize("form", ["absent", "null"])
async def test_ready_without_poll_timeout(make_server: MakeServer, form: str) -> None:
    """channel_ready_no_poll_timeout: `ready` without `poll_timeout` (absent or null) still claims a job
    at once; with nothing to claim the server's default poll timeout (30 s upstream, 1 s here) ends
    the poll."""
    assert FakeBencher().default_poll_timeout == 30
    server = await make_server(default_poll_timeout=1)
    message = '{"event":"ready"}' if form == "absent" else '{"event":"ready","poll_timeout":null}'
    job = server.add_job()
    async with open_channel(server) as ws:
        reply = await exchange(ws, message)
        assert reply["event"] == "job" and reply["uuid"] == job
        assert await exchange(ws, {"event": "failed", "job": job, "results": [], "error": "x"}) == ack(job)
        t0 = time.monotonic()
        assert await exchange(ws, message) == {"event": "no_job"}
        assert time.monotonic() - t0 >= 1.0


@pytest.mark.parametrize("value", ["0", "-1", "55.0", '"55"', "true"])
async def test_poll_timeout_zero_rejected(server: FakeBencher, value: str) -> None:
    """poll_timeout_zero_rejected: a `poll_timeout` that is not an integer in 1..=900 fails to parse,
    and a parse failure while idle drops the connection (no reply, no Close frame, no job claimed)."""
    job = server.add_job()
    async with open_channel(server) as ws:
        await send(ws, '{"event":"ready","poll_timeout":' + value + "}")
        await assert_dropped(ws)
    assert server.job_state(job) == "pending"


@pytest.mark.parametrize(("value", "accepted"), [(901, False), (900, True), (1, True)])
async def test_poll_timeout_exceeds_max(server: FakeBencher, value: int, accepted: bool) -> None:
    """poll_timeout_exceeds_max: 901 drops the connection; the bounds 1 and 900 are accepted."""
    job = server.add_job()
    async with open_channel(server) as ws:
        await send(ws, ready(value))
        if accepted:
            assert (await recv(ws))["uuid"] == job
        else:
            await assert_dropped(ws)
            assert server.job_state(job) == "pending"


async def test_canceled_pending_job_is_not_claimable(server: FakeBencher) -> None:
    """claim_job_canceled_pending: only pending jobs are claimed."""
    job = server.add_job()
    server.set_status(job, "canceled")
    async with open_channel(server) as ws:
        assert await exchange(ws, ready(1)) == {"event": "no_job"}
    assert server.job_state(job) == "canceled"


async def test_runner_without_specs_gets_no_job(server: FakeBencher) -> None:
    """claim_job_no_specs: a runner with no linked spec never gets a job."""
    server.unlink_spec(default_spec()["uuid"])
    job = server.add_job()
    async with open_channel(server) as ws:
        assert await exchange(ws, ready(1)) == {"event": "no_job"}
    assert server.job_state(job) == "pending"


async def test_spec_mismatch_until_linked(server: FakeBencher) -> None:
    """claim_job_spec_mismatch: a job for a spec the runner is not linked to gets `no_job` until the
    spec is linked; runner metadata (os, arch) is never compared with the spec."""
    job = server.add_job(spec={**SPEC_B, "architecture": "aarch64"})
    meta = {"os": "linux", "arch": "x86_64", "version": "0.1.0"}
    async with open_channel(server) as ws:
        assert await exchange(ws, ready(1, runner=meta)) == {"event": "no_job"}
        server.link_spec(SPEC_B["uuid"])
        assert (await exchange(ws, ready(1, runner=meta)))["uuid"] == job


async def test_runner_with_several_specs_claims_matching_jobs(server: FakeBencher) -> None:
    """runner_multiple_specs_claims_matching_jobs: a runner linked to two specs claims jobs of both, and
    not a job of a third."""
    server.link_spec(SPEC_B["uuid"])
    other = server.add_job(spec=default_spec(uuid="00000000-0000-0000-0000-00000000000c"))
    jobs = [server.add_job(), server.add_job(spec=SPEC_B)]
    async with open_channel(server) as ws:
        for job in jobs:
            assert (await exchange(ws, ready(1)))["uuid"] == job
            assert await exchange(ws, {"event": "failed", "job": job, "results": [], "error": "x"}) == ack(
                job
            )
        assert await exchange(ws, ready(1)) == {"event": "no_job"}
    assert server.job_state(other) == "pending"


async def test_priority_then_fifo_then_id(server: FakeBencher) -> None:
    """priority_ordering, fifo_within_same_priority, fifo_same_timestamp_tiebreaker: jobs are claimed by
    priority (highest first), then oldest `created`, then insertion id on equal timestamps."""
    free_old = server.add_job(priority=Priority.FREE, organization="o1", created=100.0)
    plus_new = server.add_job(priority=Priority.PLUS, created=300.0)
    plus_tie_b = server.add_job(priority=Priority.PLUS, created=200.0)
    plus_tie_a = server.add_job(priority=Priority.PLUS, created=200.0)
    unclaimed = server.add_job(priority=Priority.UNCLAIMED, source_ip="10.0.0.9", created=50.0)
    order = []
    async with open_channel(server) as ws:
        for _ in range(5):
            job = (await exchange(ws, ready(1)))["uuid"]
            order.append(job)
            assert await exchange(ws, {"event": "failed", "job": job, "results": [], "error": "x"}) == ack(
                job
            )
    assert order == [plus_tie_b, plus_tie_a, plus_new, free_old, unclaimed]


async def test_tier_limits(server: FakeBencher) -> None:
    """priority_scheduling and concurrency_safety modules (free_tier_org_limit, unclaimed_tier_ip_limit,
    enterprise/team_tier_unlimited, high_priority_skips_blocked, mixed tiers, job_completion_unblocks):
    Free allows one claimed/running job per organization and Unclaimed one per source IP, Plus is
    unlimited, a blocked job is skipped for the next eligible one, and finishing a job unblocks."""
    server.add_runner("second", key=KEY.replace("Ab3", "Zz9")).specs.add(default_spec()["uuid"])
    free_a1 = server.add_job(priority=Priority.FREE, organization="a", created=1.0)
    free_a2 = server.add_job(priority=Priority.FREE, organization="a", created=2.0)
    ip_1 = server.add_job(priority=Priority.UNCLAIMED, source_ip="10.0.0.1", created=3.0)
    ip_1b = server.add_job(priority=Priority.UNCLAIMED, source_ip="10.0.0.1", created=4.0)
    ip_2 = server.add_job(priority=Priority.UNCLAIMED, source_ip="10.0.0.2", created=5.0)
    plus = [server.add_job(priority=Priority.PLUS, organization="p", created=6.0 + i) for i in range(2)]
    async with (
        open_channel(server) as first,
        open_channel(server) as second,
        open_channel(server, KEY.replace("Ab3", "Zz9"), runner="second") as third,
        open_channel(server) as fourth,
        open_channel(server) as fifth,
    ):
        got = [(await exchange(ws, ready(1)))["uuid"] for ws in (first, second, third, fourth)]
        # Plus first (unlimited), then free_a1; then free_a2 is blocked by org a's claimed job and
        # ip_1b by 10.0.0.1's, so the later connections skip them for ip_1, then ip_2.
        assert got == [plus[0], plus[1], free_a1, ip_1]
        assert (await exchange(fifth, ready(1)))["uuid"] == ip_2
        assert server.job_state(free_a2) == server.job_state(ip_1b) == "pending"
        assert await exchange(third, failed(free_a1)) == ack(free_a1)  # completion unblocks org a
        assert (await exchange(third, ready(1)))["uuid"] == free_a2


async def test_racing_connections_claim_a_job_once(server: FakeBencher) -> None:
    """concurrent_job_claim, channel_concurrent_connections_same_runner: two connections of one runner
    and a second runner polling at once: exactly one gets the job, the others `no_job`."""
    other_key = KEY.replace("Ab3", "Qq1")
    server.add_runner("other", key=other_key).specs.add(default_spec()["uuid"])
    job = server.add_job()
    async with (
        open_channel(server) as a,
        open_channel(server) as b,
        open_channel(server, other_key, runner="other") as c,
    ):
        replies = await asyncio.gather(*(exchange(ws, ready(2)) for ws in (a, b, c)))
    assert sorted(r["event"] for r in replies) == ["job", "no_job", "no_job"]
    assert [r["uuid"] for r in replies if r["event"] == "job"] == [job]


async def test_job_payload_includes_spec_and_config(server: FakeBencher) -> None:
    """claim_job_includes_spec, claim_job_includes_optional_spec_fields: the `job` message carries the
    full spec and the config with its optional fields."""
    spec = default_spec(cpu=4, memory=51539607552, disk=137438953472, network=True, sandbox=None)
    config = default_config(
        image="registry.bencher.dev/p:latest", entrypoint=["/bin/sh", "-c"], cmd=["bench"],
        env={"A": "1"}, file_paths=["/out"], build_time=True, file_size=False, iter=3,
        allow_failure=True, average="median", fold="min", backdate="2026-01-01T00:00:00Z",
    )  # fmt: skip
    job = server.add_job(spec=spec, config=config)
    async with open_channel(server) as ws:
        message = await exchange(ws, ready(1))
    assert message["uuid"] == job and message["spec"] == spec
    assert message["config"] == config
    assert message["timeout"] == config["timeout"]


@pytest.mark.parametrize(
    "config",
    [
        {"registry": "https://registry.bencher.dev"},  # claim_job_invalid_config: no digest, timeout
        {**default_config(), "cmd": ["x"] * 65},  # more rules: test_wire.py::test_stored_config_rules
    ],
)
async def test_invalid_stored_config_is_never_sent(server: FakeBencher, config: dict[str, object]) -> None:
    """claim_job_invalid_spec_returns_error, claim_job_invalid_config: a job whose stored config does
    not deserialize is never sent (each claim attempt errors on it, upstream's query fails) and the
    poll ends with `no_job`; the job stays pending."""
    job = server.add_job(config=config)
    async with open_channel(server) as ws:
        assert await exchange(ws, ready(1)) == {"event": "no_job"}
    assert server.job_state(job) == "pending" and server.claim_errors >= 1


async def test_poll_ignores_everything_the_runner_sends(make_server: MakeServer) -> None:
    """(notes 3.2, PROTOCOL.md Flow) while a `ready` poll is open every text (even a terminal message
    or bad JSON) and binary frame is ignored, unanswered; there is no read timeout; pings get pongs."""
    server = await make_server(heartbeat_timeout=1.0)
    job = server.add_job()
    server.set_status(job, "running")
    server.jobs[job].runner = server.runner_uuid
    async with open_channel(server) as ws:
        await send(ws, ready(2))
        for text in (
            completed(job),
            failed(job),
            RUNNING,
            HEARTBEAT,
            "{bad",
            '{"event":"surprise"}',
            ready(1),
        ):
            await send(ws, text)
        await ws.send(b"\x00\x01")
        await asyncio.wait_for(await ws.ping(b"p"), WAIT)
        await asyncio.sleep(1.2)  # longer than the read timeout: none applies while polling
        assert await recv(ws) == {"event": "no_job"}
    assert server.job_state(job) == "running"
    states = {f.state for f in server.log}
    assert states == {"idle", "polling"}


@pytest.mark.parametrize("event", ["running", "heartbeat"])
async def test_idle_running_and_heartbeat_get_no_reply(server: FakeBencher, clock: Clock, event: str) -> None:
    """(notes 3.1, 6.1 item 4) `running` and `heartbeat` while idle are ignored without a reply, even
    for a job this runner is running, and do not keep that job alive."""
    async with open_channel(server) as ws:
        job = await claim(server, ws)
        assert await exchange(ws, RUNNING) == ack(job)
    before = server.jobs[job].last_heartbeat
    clock.advance(5)
    async with open_channel(server) as ws:
        await send(ws, {"event": event})
        await assert_silent(ws)
        await assert_idle(ws)
    assert server.jobs[job].last_heartbeat == before


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"event":"surprise","x":1}',
        '{"event":"paused","reasons":[]}',
        '{"event":"canceled"}',
        "3",
    ],
)
async def test_idle_parse_failure_drops_the_connection(server: FakeBencher, text: str) -> None:
    """(notes 3.1, 6.1 item 4) while idle, text that does not parse (bad JSON, an unknown event such as
    upstream's unreleased `paused`, a missing field) drops the connection with no reply."""
    async with open_channel(server) as ws:
        await send(ws, text)
        await assert_dropped(ws)


async def test_idle_binary_frames_are_ignored(server: FakeBencher) -> None:
    """(notes 3.1) a binary frame while idle is ignored, not a parse failure."""
    async with open_channel(server) as ws:
        await ws.send(b"\x00")
        assert await exchange(ws, ready(1)) == {"event": "no_job"}


@pytest.mark.parametrize("ping", [False, True])
async def test_idle_read_timeout(make_server: MakeServer, ping: bool) -> None:
    """(notes 3.1, 6.1 item 4) an idle connection silent for `heartbeat_timeout` is dropped without a
    Close frame; any frame, a ping included, keeps it alive."""
    server = await make_server(heartbeat_timeout=1.5)
    async with open_channel(server) as ws:
        if not ping:
            await assert_dropped(ws)
            return
        for _ in range(20):  # 2 s of pings, longer than the timeout
            await asyncio.wait_for(await ws.ping(), WAIT)
            await asyncio.sleep(0.1)
        await assert_idle(ws)


async def test_ready_with_metadata_and_update(make_server: MakeServer) -> None:
    """(notes 2.5, upstream `non_linux_version_mismatch_skips_update`, `no_metadata_skips_update`,
    `stable_channel_version_match_no_update`, `stable_channel_checksum_fetch_failure_proceeds`) an
    `update` only for Linux metadata with another stable version, then the connection is dropped;
    invalid metadata is a parse failure."""
    server = await make_server(server_version="9.9.9")
    meta = {"os": "linux", "arch": "x86_64", "version": "0.1.0"}
    for skip in ({**meta, "os": "macos"}, None, {**meta, "version": "9.9.9"}):
        async with open_channel(server) as ws:
            assert await exchange(ws, ready(1, runner=skip)) == {"event": "no_job"}
    async with open_channel(server) as ws:
        assert await exchange(ws, ready(1, runner=meta)) == {
            "event": "update",
            "version": "9.9.9",
            "url": "https://example.invalid/v9.9.9/runner",
            "checksum": "0" * 64,
        }
        await assert_dropped(ws)
    server.update_checksum = None  # the checksum fetch fails: no update, the poll goes on
    async with open_channel(server) as ws:
        assert await exchange(ws, ready(1, runner=meta)) == {"event": "no_job"}
    for bad in ({**meta, "arch": "amd64"}, {**meta, "checksum": "A" * 64}, {"os": "linux"}):
        async with open_channel(server) as ws:
            await send(ws, ready(1, runner=bad))
            await assert_dropped(ws)


async def test_canary_update(make_server: MakeServer) -> None:
    """(notes 2.5, upstream `canary_channel_checksum_fetch_failure_proceeds` and the `ready` unit tests)
    a canary runner is offered `update` only when it reports a checksum that differs from the
    published one; version "canary"."""
    published = "b" * 64
    server = await make_server(canary_checksum=published)
    meta = {"os": "linux", "arch": "x86_64", "version": "0.1.0", "channel": "canary"}
    for skip in (meta, {**meta, "checksum": published}):
        async with open_channel(server) as ws:
            assert await exchange(ws, ready(1, runner=skip)) == {"event": "no_job"}
    async with open_channel(server) as ws:
        reply = await exchange(ws, ready(1, runner={**meta, "checksum": "c" * 64}))
        assert reply == {"event": "update", "version": "canary", "url": "https://example.invalid/canary/runner",
                         "checksum": published}  # fmt: skip
        await assert_dropped(ws)
