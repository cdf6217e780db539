"""A server `cancel` with the real executor: during the image pull, during the boot, during the benchmark.

Each must end with exactly one `canceled` recorded by the fake Bencher API, the job's worker free again
within seconds (the pull, mkfs and VM all stop, not just the protocol), nothing left behind, and the
daemon ready for the next job.
"""

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bencher_runner.daemon import Daemon, DaemonSettings
from bencher_runner.fakeserver import FakeBencher
from bencher_runner.job import Reporter, run_job
from bencher_runner.oci.blobcache import image_cache_dir
from bencher_runner.paths import cache_dir, work_root
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.results import RunResult
from tests.support.busybox import busybox_tree
from tests.support.guest_output import wait_for_guest_stdout
from tests.support.oci_builder import build_layout, layer_from_dir
from tests.support.registry import Registry, http_push

from .conftest import Faults

PROJECT = "5b1e0c2a-3f44-4d7e-9a51-0c6f3e2b9d11"
KEY = "bencher_runner_" + "cce1" * 7 + "cc"
FREED_WITHIN_S = 3.0  # cancel -> the executor has returned (pull/mkfs/VM stopped, work dir removed)


@dataclass
class Executor:
    """The real executor, watched: which phases it reached and when it returned."""

    cache: Path
    booting: threading.Event = field(default_factory=threading.Event)
    returned: list[tuple[float, RunResult]] = field(default_factory=list)

    def __call__(self, config: RunConfig, cancel: threading.Event) -> RunResult:
        watcher = self

        class Watch(Reporter):
            def phase(self, text: str) -> None:
                if "booting VM" in text:
                    watcher.booting.set()

        result = run_job(config, cache=self.cache, cancel=cancel, reporter=Watch())
        self.returned.append((time.monotonic(), result))
        return result


@dataclass
class Harness:
    server: FakeBencher
    executor: Executor
    registry_host: str

    def add_job(self, digest: str) -> str:
        return self.server.add_job(
            registry=f"http://{self.registry_host}", project=PROJECT, digest=digest, timeout=300
        )

    async def cancel_and_check(self, job: str) -> None:
        t0 = time.monotonic()
        self.server.cancel(job)
        await self.server.wait_for(lambda: len(self.executor.returned) == 1, timeout=30)
        freed = self.executor.returned[0][0] - t0
        assert freed < FREED_WITHIN_S, f"the worker was busy {freed:.1f} s after the cancel"
        assert self.executor.returned[0][1].status == "failed"
        assert "canceled" in (self.executor.returned[0][1].error or "")
        await self.server.wait_for(lambda: len(self.canceled(job)) == 1, timeout=5)
        await asyncio.sleep(1.5)  # a second `canceled` or a result would arrive by now
        assert len(self.canceled(job)) == 1
        assert self.server.job_state(job) == "canceled"
        assert self.server.results(job) is None and self.server.output_writes(job) == 0
        work = work_root(self.executor.cache)
        assert not (work.exists() and any(work.iterdir())), list(work.iterdir())
        partial = list((image_cache_dir(self.executor.cache) / "blobs").rglob(".tmp-*"))
        assert partial == [], partial

    def canceled(self, job: str) -> list[object]:
        return [m for _, m in self.server.events("canceled") if m.get("job") == job]


def push(tmp_path: Path, registry: Registry, script: str, tag: str) -> str:
    """A busybox image running ``script``; its layer is unique, so it is never in the blob cache."""
    layout = tmp_path / f"layout-{tag}"
    tree = busybox_tree(tmp_path / f"tree-{tag}")
    (tree / "unique").write_text(str(uuid.uuid4()))
    digest = build_layout(
        layout,
        [layer_from_dir(tree)],
        {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", script]},
        tag=tag,
    )
    http_push(layout, registry, PROJECT, tag)
    return digest


@pytest.fixture
async def harness(tmp_path: Path, faulty_proxy: tuple[str, Faults]) -> AsyncIterator[Callable[[], Harness]]:
    proxy, _ = faulty_proxy
    server = FakeBencher(key=KEY, heartbeat_timeout=30.0)
    await server.start()
    executor = Executor(cache_dir())  # the kernel bundle and the accel probe are cached there
    settings = DaemonSettings(
        host=server.url, runner=server.runner, key=KEY, state_dir=tmp_path / "state", poll_timeout=2,
        auto_update=False,
    )  # fmt: skip
    daemon = Daemon(settings, executor)
    task = asyncio.create_task(daemon.run())
    try:
        yield lambda: Harness(server, executor, proxy)
    finally:
        daemon.request_shutdown()
        await asyncio.wait_for(task, 30)
        await server.close()


async def test_cancel_during_the_pull_stops_the_download(
    tmp_path: Path, registry: Registry, faulty_proxy: tuple[str, Faults], harness: Callable[[], Harness]
) -> None:
    h = harness()
    digest = push(tmp_path, registry, "echo never", "pull")
    faulty_proxy[1].blob_chunk_delay = 0.02  # about 200 KiB/s: the layer takes many seconds
    job = h.add_job(digest)
    await h.server.wait_for(lambda: h.server.job_state(job) == "running", timeout=30)
    await h.server.wait_for(lambda: len(faulty_proxy[1].blob_gets()) >= 2, timeout=30)  # config + layer
    await asyncio.sleep(0.5)
    await h.cancel_and_check(job)
    assert not h.executor.booting.is_set()


async def test_cancel_during_the_boot_kills_the_vm(
    tmp_path: Path, registry: Registry, harness: Callable[[], Harness]
) -> None:
    h = harness()
    # The command outlives any boot: a fast (KVM) boot cannot finish the job before the cancel lands.
    job = h.add_job(push(tmp_path, registry, "sleep 600; echo never", "boot"))
    await h.server.wait_for(h.executor.booting.is_set, timeout=120)
    await h.cancel_and_check(job)


async def test_cancel_during_the_benchmark_kills_the_vm_and_the_next_job_runs(
    tmp_path: Path, registry: Registry, harness: Callable[[], Harness]
) -> None:
    h = harness()
    job = h.add_job(push(tmp_path, registry, "echo started; sleep 600", "bench"))
    await h.server.wait_for(h.executor.booting.is_set, timeout=120)
    # the benchmark has started (its first line is on the output disk), however long the boot took
    await asyncio.to_thread(wait_for_guest_stdout, work_root(h.executor.cache), b"started\n", 120)
    await h.cancel_and_check(job)
    h.executor.returned.clear()
    after = h.add_job(push(tmp_path, registry, "echo after", "after"))
    await h.server.wait_for(lambda: h.server.job_state(after) in ("processed", "failed"), timeout=120)
    assert h.server.results(after) == {"results": [{"exit_code": 0, "stdout": "after\n"}]}
