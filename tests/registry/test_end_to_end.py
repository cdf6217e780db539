"""End to end on real components: docker-registry -> pull -> unpack -> ext4 -> microVM.

Once through `runner run` with a registry reference, and once as Bencher would drive it: the fake
Bencher API hands the daemon a job naming a token-auth registry, the project and the digest; the
daemon pulls with the job's token, boots the VM and reports the result exactly once.
"""

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

from bencher_runner.daemon import Daemon, DaemonSettings
from bencher_runner.daemon.driver import default_executor
from bencher_runner.fakeserver import FakeBencher
from bencher_runner.paths import cache_dir
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.results import RunResult
from tests.support.busybox import busybox_tree
from tests.support.oci_builder import build_layout, layer_from_dir
from tests.support.registry import Registry, http_push

from .conftest import JOB_TOKEN

PROJECT = "0f6c1c9e-6b0e-4a43-9d8a-2f1a4b9c7d10"
KEY = "bencher_runner_" + "e2e0" * 7 + "e2"


def push_benchmark(tmp_path: Path, registry: Registry, script: str) -> str:
    layout = tmp_path / "layout"
    digest = build_layout(
        layout,
        [layer_from_dir(busybox_tree(tmp_path / "tree"))],
        {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", script]},
        tag="v1",
    )
    http_push(layout, registry, PROJECT, "v1")
    return digest


def test_runner_run_pulls_from_a_registry(tmp_path: Path, registry: Registry) -> None:
    digest = push_benchmark(tmp_path, registry, "echo pulled and ran")
    argv = [sys.executable, "-m", "bencher_runner", "run", "--json", "--insecure-registry", "--image"]
    for ref in (f"{registry.host}/{PROJECT}@{digest}", f"{registry.host}/{PROJECT}:v1"):
        proc = subprocess.run([*argv, ref], capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["results"][0]["stdout"] == "pulled and ran\n"
    assert "cached" in proc.stderr  # the second run found the layer in the blob cache


async def test_daemon_runs_a_bencher_job_from_a_token_registry(
    tmp_path: Path, registry: Registry, auth_registry: Registry
) -> None:
    # pushed to the open registry; auth_registry serves the same storage behind token auth
    # runs >= 3 s in the guest, so heartbeats flow (1 s apart) however fast the guest kernel boots
    digest = push_benchmark(tmp_path, registry, "sleep 3; echo from the daemon; echo metric >&2")
    server = FakeBencher(key=KEY, heartbeat_timeout=30.0, grace_period=60.0)
    await server.start()
    executor = default_executor(cache_dir())
    images_run: list[str] = []

    def run(config: RunConfig, cancel: threading.Event) -> RunResult:
        assert config.job.token is not None and config.job.token.get_secret_value() == JOB_TOKEN
        images_run.append(config.job.image)
        return executor(config, cancel)

    job = server.add_job(
        oci_token=JOB_TOKEN,
        registry=auth_registry.url,
        project=PROJECT,
        digest=digest,
        timeout=120,
    )
    settings = DaemonSettings(
        host=server.url,
        runner=server.runner,
        key=KEY,
        state_dir=tmp_path / "state",
        poll_timeout=2,
        auto_update=False,
    )
    daemon = Daemon(settings, run)
    task = asyncio.create_task(daemon.run())
    try:
        await server.wait_for(lambda: server.job_state(job) in ("processed", "failed"), timeout=240)
        assert server.results(job) == {
            "results": [{"exit_code": 0, "stdout": "from the daemon\n", "stderr": "metric\n"}]
        }, server.results(job)
        assert server.output_writes(job) == 1
        assert images_run == [f"{auth_registry.host}/{PROJECT}@{digest}"]
        assert len(server.events("heartbeat")) >= 2  # heartbeats flowed while the VM ran
        missing = server.add_job(
            oci_token=JOB_TOKEN, registry=auth_registry.url, project=PROJECT, digest="sha256:" + "0" * 64
        )
        await server.wait_for(lambda: server.job_state(missing) in ("processed", "failed"), timeout=60)
        assert server.job_state(missing) == "failed"
        failure = server.results(missing)
        assert failure is not None and failure["results"] == []
        assert "0" * 64 in failure["error"] and "Traceback" not in failure["error"]
    finally:
        daemon.request_shutdown()
        await asyncio.wait_for(task, 30)
        await server.close()


async def test_the_job_timeout_covers_all_iterations_and_fails_before_the_servers_limit(
    tmp_path: Path, registry: Registry
) -> None:
    """Issue #13 finding 3: 5 iterations of boot + 7 s (about 12 s each under TCG) with timeout 20.
    Per-iteration timeouts let each fit, and the server's hard limit (timeout + 60 s from `running`)
    canceled the job mid-run. One job deadline fails it with the runner's own error, soon after 20 s."""
    digest = push_benchmark(tmp_path, registry, "echo iteration; sleep 7")
    server = FakeBencher(key=KEY, heartbeat_timeout=30.0, grace_period=60.0)
    await server.start()
    job = server.add_job(registry=registry.url, project=PROJECT, digest=digest, timeout=20, iter=5)
    settings = DaemonSettings(host=server.url, runner=server.runner, key=KEY, state_dir=tmp_path / "state",
                              poll_timeout=2, auto_update=False)  # fmt: skip
    daemon = Daemon(settings, default_executor(cache_dir()))
    task = asyncio.create_task(daemon.run())
    try:
        await server.wait_for(
            lambda: server.job_state(job) in ("processed", "failed", "canceled"), timeout=120
        )
        running = server.events("running")[0][0]
        ended = server.events("failed")[0][0]
        assert server.job_state(job) == "failed"
        result = server.results(job)
        assert result is not None
        assert "timed out" in result["error"] and "20 s" in result["error"], result["error"]
        assert 1 <= len(result["results"]) < 5
        assert result["results"][-1]["exit_code"] == 124
        assert 20 - 1 <= ended - running <= 20 + 15, ended - running
    finally:
        daemon.request_shutdown()
        await asyncio.wait_for(task, 30)
        await server.close()
