"""Channel authentication, ported from `plus/api_runners/tests/jobs/main.rs`, `jobs/websocket.rs`,
`key.rs` and `runners.rs` (notes 6.2 "Auth", as far as the channel shows it).

The real server upgrades the connection before its handler checks the key, so a client sees HTTP 101
and then the connection ends with no message and no Close frame. Upstream's tests accept that or a
refused connect; these tests require exactly the upgrade-then-drop (or, in the 401 mode, the 401).
"""

import pytest
from websockets.exceptions import InvalidStatus

from bencher_runner.fakeserver import FakeBencher

from .conftest import KEY, MakeServer, assert_dropped, claim, exchange, open_channel, ready, start_job

OTHER_KEY = "bencher_runner_" + "Z" * 30
USER_JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJl"


async def _refused(
    server: FakeBencher, key: str | None = KEY, *, runner: str | None = None, authorization: str | None = None
) -> None:
    """The upgrade succeeds, then the connection ends with no message and no Close frame."""
    rejected, connections = server.rejected_auth, server.connections
    async with open_channel(server, key, runner=runner, authorization=authorization) as ws:
        await assert_dropped(ws)
    assert (server.rejected_auth, server.connections) == (rejected + 1, connections)


async def test_missing_authorization_header(server: FakeBencher) -> None:
    """claim_job_missing_auth: no Authorization header (and variants that are not a Bearer token)."""
    await _refused(server, key=None)
    for header in ("Basic abc123", "Bearer", "Bearer   ", f"Bearer{KEY}"):
        await _refused(server, authorization=header)


async def test_token_without_the_prefix(server: FakeBencher) -> None:
    """claim_job_no_prefix_token: a token without `bencher_runner_`."""
    await _refused(server, key="some_random_token_without_prefix")


async def test_wrong_length_tokens(server: FakeBencher) -> None:
    """claim_job_wrong_length_token: the right prefix with 47 and 81 characters in total (the old
    64-hex key format among them) and a body with a non-alphanumeric character."""
    for key in (
        "bencher_runner_00112233445566778899aabbccddeeff",
        "bencher_runner_00112233445566778899aabbccddeeff00112233445566778899aabbccddeeffab",
        "bencher_runner_" + "a" * 29 + "-",
    ):
        await _refused(server, key=key)


async def test_malformed_short_key(server: FakeBencher) -> None:
    """channel_invalid_key: `bencher_runner_badbadbadbad`."""
    await _refused(server, key="bencher_runner_badbadbadbad")


async def test_another_runners_key(server: FakeBencher) -> None:
    """channel_wrong_runner, wrong_runner_key_claim: a valid key of another runner does not open this
    runner's channel (by slug or by uuid), and works for its own."""
    other = server.add_runner("other", key=OTHER_KEY)
    await _refused(server, key=OTHER_KEY)
    await _refused(server, key=OTHER_KEY, runner=server.runner_uuid)
    await _refused(server, key=KEY, runner=other.slug)
    async with open_channel(server, OTHER_KEY, runner=other.uuid) as ws:
        assert await exchange(ws, ready(1)) == {"event": "no_job"}


async def test_archived_runner_key(server: FakeBencher) -> None:
    """archived_runner_key_rejected: an archived runner's key is refused."""
    server.archive_runner()
    await _refused(server)


async def test_user_jwt_on_the_runner_endpoint(server: FakeBencher) -> None:
    """user_jwt_rejected_on_runner_endpoint: a user's JWT is not a runner key."""
    await _refused(server, key=USER_JWT)


async def test_old_key_after_rotation(server: FakeBencher) -> None:
    """channel_key_rotation_invalidates_old_key, old_key_rejected_after_rotation,
    key_rotate_with_inflight_jobs: rotating the key (also with a job in flight) refuses the old key on
    new connections at once while the new key works; the connection already open keeps working."""
    async with open_channel(server) as ws:
        job = await start_job(server, ws)
        new_key = server.rotate_key()
        await _refused(server, key=KEY)
        async with open_channel(server, new_key) as fresh:
            assert await exchange(fresh, ready(1)) == {"event": "no_job"}
        assert await exchange(ws, {"event": "heartbeat"}) == {"event": "ack", "job": job}


async def test_rotating_an_archived_runners_key_fails(server: FakeBencher) -> None:
    """key_rotate_archived_runner: rotation is refused for an archived runner."""
    server.archive_runner()
    with pytest.raises(PermissionError, match="archived"):
        server.rotate_key()


async def test_bad_keys_get_401_in_the_401_mode(make_server: MakeServer) -> None:
    """(notes 1.3; PROTOCOL.md Connection) some servers answer a bad key with 401 before the upgrade:
    the fake's `reject_with_401` mode; a good key still connects."""
    server = await make_server(reject_with_401=True)
    with pytest.raises(InvalidStatus) as info:
        async with open_channel(server, OTHER_KEY):
            pass
    assert info.value.response.status_code == 401
    async with open_channel(server) as ws:
        await claim(server, ws)


async def test_unknown_path_is_404(server: FakeBencher) -> None:
    """(notes 1.1) only `/v0/runners/{uuid or slug}/channel` is a channel: anything else is an HTTP 404
    before the upgrade."""
    from websockets.asyncio.client import connect

    for path in ("/v0/runners/fake-runner", "/v0/runners/fake-runner/channel/x", "/channel"):
        with pytest.raises(InvalidStatus) as info:
            async with connect(
                f"ws://127.0.0.1:{server.port}{path}", additional_headers={"Authorization": f"Bearer {KEY}"}
            ):
                pass
        assert info.value.response.status_code == 404
