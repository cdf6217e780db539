"""The daemon against the fake Bencher API over real WebSockets on loopback, with fake executors."""

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bencher_runner.daemon import AuthError, Daemon, DaemonSettings
from bencher_runner.fakeserver import FakeBencher, default_spec
from bencher_runner.protocol import Terminal
from bencher_runner.spec.results import IterationOutput, RunResult

from .conftest import KEY, Runner, blocker, sleeper

Start = Callable[..., Runner]


def _done(server: FakeBencher, job: str) -> Callable[[], bool]:
    return lambda: server.job_state(job) in ("processed", "failed", "canceled")


async def test_completed_job(server: FakeBencher, start: Start) -> None:
    job = server.add_job()
    runner = start(sleeper(0.2))
    await server.wait_for(_done(server, job))
    assert server.job_state(job) == "processed"
    assert server.results(job) == {"results": [{"exit_code": 0, "stdout": "bench 42\n"}]}
    assert server.output_writes(job) == 1
    assert await runner.stop() == 0
    ready = server.events("ready")[0][1]
    assert ready["poll_timeout"] == 1


async def test_failed_job_and_several_in_a_row(server: FakeBencher, start: Start) -> None:
    results = iter(
        [
            RunResult("failed", [IterationOutput(3, stderr=b"boom")], None, error="exit 3"),
            RunResult("completed", [], None),
            RunResult("completed", [IterationOutput(0)], None),
        ]
    )
    jobs = [server.add_job() for _ in range(3)]
    runner = start(lambda config, cancel: next(results))
    await server.wait_for(lambda: all(_done(server, j)() for j in jobs))
    assert server.results(jobs[0]) == {"results": [{"exit_code": 3, "stderr": "boom"}], "error": "exit 3"}
    assert server.job_state(jobs[0]) == "failed"
    assert [server.job_state(j) for j in jobs[1:]] == ["processed", "processed"]
    assert server.connections == 1
    await runner.stop()


async def test_cancel_during_job(server: FakeBencher, start: Start) -> None:
    started = threading.Event()
    job = server.add_job()
    runner = start(blocker(started))
    await server.wait_for(started.is_set)
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    server.cancel(job)
    await server.wait_for(lambda: bool(server.events("canceled")), timeout=3)
    assert time.monotonic() - t0 < 1.5  # next heartbeat (<=1 s) + cancel
    assert server.job_state(job) == "canceled"
    assert server.results(job) is None
    await server.wait_for(lambda: len(server.events("ready")) >= 2)
    await runner.stop()


async def test_drop_before_running(server: FakeBencher, start: Start) -> None:
    job = server.add_job()
    server.fail_at("running")
    runner = start(sleeper(0.2))
    await server.wait_for(lambda: server.job_state(job) == "failed")
    assert "lost before the job started" in (server.results(job) or {}).get("error", "")
    assert server.output_writes(job) == 1
    await runner.stop()


async def test_drop_during_heartbeats(server: FakeBencher, start: Start) -> None:
    job = server.add_job()
    runner = start(sleeper(2.0))
    await server.wait_for(lambda: len(server.events("heartbeat")) >= 1)
    server.drop_connection()
    await server.wait_for(_done(server, job), timeout=10)
    assert server.job_state(job) == "processed"
    assert server.output_writes(job) == 1
    assert server.connections >= 2
    await runner.stop()


async def test_drop_after_completed_before_ack(server: FakeBencher, start: Start) -> None:
    job = server.add_job()
    server.fail_at("completed", process=True)
    runner = start(sleeper(0.1))
    await server.wait_for(lambda: len(server.events("completed")) >= 2)
    await server.wait_for(lambda: len(server.events("ready")) >= 2)
    assert server.job_state(job) == "processed"
    assert server.output_writes(job) == 1  # resent, recorded once
    assert not list((runner.daemon.outbox.directory).glob("*.json"))
    await runner.stop()


async def test_server_restart_mid_job(server: FakeBencher, start: Start) -> None:
    job = server.add_job()
    runner = start(sleeper(1.5))
    await server.wait_for(lambda: len(server.events("heartbeat")) >= 1)
    await server.restart(pause=0.2)
    await server.wait_for(_done(server, job), timeout=10)
    assert server.job_state(job) == "processed"
    await runner.stop()


async def test_daemon_killed_mid_job_and_restarted(server: FakeBencher, start: Start, tmp_path: Path) -> None:
    job = server.add_job()
    # A first daemon finished the job and wrote its result, then died before sending it.
    from bencher_runner.daemon.outbox import Outbox

    first = start(sleeper(30))
    await server.wait_for(lambda: server.job_state(job) == "running")
    first.task.cancel()
    await asyncio.gather(first.task, return_exceptions=True)
    server.drop_connection()
    Outbox(tmp_path / "state" / "outbox").put(
        Terminal.of({"event": "completed", "job": job, "results": [{"exit_code": 0, "stdout": "late"}]})
    )
    second = start(sleeper(0.1))
    await server.wait_for(_done(server, job))
    assert server.results(job) == {"results": [{"exit_code": 0, "stdout": "late"}]}
    completed = server.events("completed")[0][0]
    # The result goes first; `ready` only once it is acked (the job is done when the server has it,
    # a moment before the daemon has the ack: wait for it rather than look at once).
    await server.wait_for(lambda: any(t > completed for t, _ in server.events("ready")))
    assert not list((tmp_path / "state" / "outbox").glob("*.json"))
    await second.stop()


async def test_invalid_spec_fails_and_daemon_keeps_going(server: FakeBencher, start: Start) -> None:
    bad = server.add_job(spec=default_spec(cpu=0))
    nosandbox = server.add_job(spec=default_spec(sandbox=None))
    good = server.add_job()
    runner = start(sleeper(0.1))
    await server.wait_for(lambda: all(_done(server, j)() for j in (bad, nosandbox, good)))
    assert server.job_state(bad) == "failed"
    assert server.results(bad) == {"results": [], "error": "spec.cpu=0: a job needs at least 1 CPU"}
    assert "--danger-allow-no-sandbox" in (server.results(nosandbox) or {})["error"]
    assert server.job_state(good) == "processed"
    await runner.stop()


async def test_malformed_frame_and_unknown_event(server: FakeBencher, start: Start) -> None:
    job = server.add_job()
    runner = start(sleeper(1.2))
    await server.wait_for(lambda: len(server.events("heartbeat")) >= 1)
    for ws in list(server._conns):
        await ws.send("{not json")
        await ws.send('{"event":"surprise","x":1}')
    await server.wait_for(_done(server, job))
    assert server.job_state(job) == "processed"
    assert server.connections == 1
    await runner.stop()


async def test_key_rejected_with_401_stops(server: FakeBencher, tmp_path: Path) -> None:
    server.reject_with_401 = True
    settings = DaemonSettings(
        host=server.url, runner=server.runner, key="bencher_runner_" + "b2" * 15, state_dir=tmp_path
    )
    with pytest.raises(AuthError, match="HTTP 401"):
        await asyncio.wait_for(Daemon(settings, sleeper()).run(), 5)


async def test_key_dropped_after_upgrade_backs_off(
    server: FakeBencher, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    runner = start(sleeper(), key="bencher_runner_" + "b2" * 15)
    await server.wait_for(lambda: server.rejected_auth >= 3, timeout=5)
    await asyncio.sleep(0.2)
    assert "probably wrong" in caplog.text
    assert KEY not in caplog.text and "b2b2b2" not in caplog.text
    await runner.stop()


def test_malformed_key_refused_before_connecting(tmp_path: Path) -> None:
    from bencher_runner.spec.errors import SpecError

    with pytest.raises(SpecError, match="malformed"):
        Daemon(
            DaemonSettings(host="http://127.0.0.1:1", runner="r", key="nope", state_dir=tmp_path), sleeper()
        )


async def test_heartbeat_cadence_while_executor_blocks(server: FakeBencher, start: Start) -> None:
    started = threading.Event()
    job = server.add_job()
    runner = start(blocker(started))
    await server.wait_for(started.is_set)
    await server.wait_for(lambda: len(server.events("heartbeat")) >= 6, timeout=10)
    times = [t for t, _ in server.events("heartbeat")]
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    assert gaps[-1] < 1.2 and gaps[0] > 0.8, gaps
    server.cancel(job)
    await server.wait_for(lambda: server.job_state(job) == "canceled")
    await runner.stop()


async def test_shutdown_cancels_running_job(server: FakeBencher, start: Start) -> None:
    started = threading.Event()
    job = server.add_job()
    runner = start(blocker(started))
    await server.wait_for(started.is_set)
    await server.wait_for(lambda: server.job_state(job) == "running")
    assert await runner.stop() == 0
    assert server.job_state(job) == "failed"
    assert server.results(job) == {"results": [], "error": "job canceled"}
