"""A huge result is capped off the event loop (issue #12 finding 4).

A job with 20 output files of 25 MiB kept the old daemon's loop busy 99 s in `cap_message` at 2.65 GB
RSS, which set off the heartbeat-timeout livelock. Now the message is built and capped in the job's
worker thread, with byte budgets shared out before anything is decoded.
"""

import asyncio
import threading
import time
from pathlib import Path

from bencher_runner.daemon import Daemon, DaemonSettings
from bencher_runner.fakeserver import FakeBencher
from bencher_runner.protocol import TRUNCATION_NOTE
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.results import IterationOutput, RunResult

from .conftest import KEY

MIB = 1024 * 1024


def huge(config: RunConfig, cancel: threading.Event) -> RunResult:
    files = {f"/out/{i}.bin": bytes([65 + i]) * (25 * MIB) for i in range(20)}
    return RunResult("completed", [IterationOutput(0, stdout=b"s" * (25 * MIB), output=files)], None)


async def test_a_500_mib_result_is_capped_without_stalling_the_loop(
    server: FakeBencher, tmp_path: Path
) -> None:
    job = server.add_job()
    settings = DaemonSettings(host=server.url, runner=server.runner, key=KEY, state_dir=tmp_path / "state",
                              poll_timeout=1, auto_update=False, max_message_bytes=1 * MIB)  # fmt: skip
    daemon = Daemon(settings, huge)
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t0 - 0.01)

    tick = asyncio.create_task(ticker())
    task = asyncio.create_task(daemon.run())
    try:
        t0 = time.monotonic()
        await server.wait_for(lambda: server.job_state(job) == "processed", timeout=60)
        took = time.monotonic() - t0
    finally:
        daemon.request_shutdown()
        assert await asyncio.wait_for(task, 10) == 0
        tick.cancel()
    result = server.results(job)
    assert result is not None
    entry = result["results"][0]
    assert len(entry["output"]) == 20 and entry["stdout"].endswith(TRUNCATION_NOTE)
    assert all(value.endswith(TRUNCATION_NOTE) for value in entry["output"].values())
    assert max(lags) < 0.5, f"the event loop stalled {max(lags):.2f} s"
    assert took < 30
