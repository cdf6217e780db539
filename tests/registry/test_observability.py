"""`runner up --log-format json --metrics-addr ...` as an operator runs it: a real daemon process, a fake
Bencher API, a real registry and a real VM. The metrics endpoint shows the counters moving during and
after a job; every log line is one JSON object and the job's lines carry its uuid.
"""

import asyncio
import json
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from bencher_runner.fakeserver import FakeBencher
from bencher_runner.paths import cache_dir
from tests.support.busybox import busybox_tree
from tests.support.oci_builder import build_layout, layer_from_dir
from tests.support.registry import Registry, free_port, http_push

PROJECT = "7d2f4a10-9c3e-4b8a-a6f1-2e5d8c0b4f77"
KEY = "bencher_runner_" + "0b5e" * 7 + "0b"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            have = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if have == want:
                return float(m.group(3))
    return 0.0


async def scrape(url: str) -> str:
    async with httpx.AsyncClient() as client:
        r = await client.get(url, timeout=5)
        r.raise_for_status()
        return r.text


async def test_metrics_move_and_json_logs_carry_the_job(tmp_path: Path, registry: Registry) -> None:
    tree = busybox_tree(tmp_path / "tree")
    (tree / "unique").write_text(str(uuid.uuid4()))  # a fresh layer: a blob and template cache miss
    layout = tmp_path / "layout"
    digest = build_layout(
        layout, [layer_from_dir(tree)], {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", "sleep 3; echo hi"]},
        tag="v1",
    )  # fmt: skip
    http_push(layout, registry, PROJECT, "v1")
    server = FakeBencher(key=KEY, heartbeat_timeout=30.0)
    await server.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    argv = [
        sys.executable, "-m", "bencher_runner", "up", "--host", server.url, "--runner", server.runner,
        "--key", KEY, "--poll-timeout", "2", "--no-auto-update", "--state-dir", str(tmp_path / "state"),
        "--cache-dir", str(cache_dir()), "--accel", "tcg", "--no-tuning", "--log-format", "json",
        "--metrics-addr", f"127.0.0.1:{port}",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        await server.wait_for(lambda: bool(server.events("ready")), timeout=30)
        before = await scrape(url)
        assert sample(before, "bencher_runner_job_running") == 0
        completed0 = sample(before, "bencher_runner_jobs_total", outcome="completed")
        misses0 = sample(before, "bencher_runner_cache_lookups_total", cache="template", result="miss")

        job = server.add_job(registry=registry.url, project=PROJECT, digest=digest, timeout=120)
        await server.wait_for(lambda: len(server.events("heartbeat")) >= 3, timeout=120)
        during = await scrape(url)
        assert sample(during, "bencher_runner_job_running") == 1
        assert sample(during, "bencher_runner_heartbeat_interval_seconds_count") >= 2

        await server.wait_for(lambda: server.job_state(job) in ("processed", "failed"), timeout=120)
        assert server.results(job) == {"results": [{"exit_code": 0, "stdout": "hi\n"}]}
        after = await scrape(url)
        assert sample(after, "bencher_runner_job_running") == 0
        assert sample(after, "bencher_runner_jobs_total", outcome="completed") == completed0 + 1
        misses = sample(after, "bencher_runner_cache_lookups_total", cache="template", result="miss")
        assert misses == misses0 + 1
        assert sample(after, "bencher_runner_job_phase_seconds_count", phase="boot") >= 1
        assert sample(after, "bencher_runner_job_phase_seconds_sum", phase="command") >= 3
        assert sample(after, "bencher_runner_cache_bytes", cache="template") > 0
        assert sample(after, "process_resident_memory_bytes") > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=30)
        await server.close()
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message", "job"} <= set(doc) for doc in lines)
    mine = [doc["message"] for doc in lines if doc["job"] == job]
    stray = [doc for doc in lines if job in doc["message"] or doc["logger"] == "bencher_runner.job"]
    assert all(doc["job"] == job for doc in stray), [d for d in stray if d["job"] != job]  # pull threads too
    assert any("pulled" in m for m in mine), mine
    assert any(m.startswith("job started") for m in mine), mine
    assert any("booting VM" in m for m in mine), mine  # logged from the worker thread
    assert any(m.startswith("job completed") and "total" in m for m in mine), mine
    assert KEY not in stderr
