"""Prometheus metrics of a runner host (`runner up --metrics-addr HOST:PORT`; off by default).

The rest of the runner calls the small functions below where things happen (daemon loop, job phases,
caches). They do nothing until `serve_metrics` has run: only then is prometheus_client imported and
are the metrics registered (in its default registry, which also exports the process's own RSS, CPU
and open files), so `runner run` and a daemon without metrics pay neither its import time nor its
memory. Cache sizes are measured at scrape time.
"""

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bencher_runner import __version__
from bencher_runner.spec.errors import SpecError

PREFIX = "bencher_runner"

# job timings key -> phase label
PHASES = {
    "pull_s": "pull",
    "unpack_s": "unpack",
    "mkfs_s": "mkfs",
    "disk_copy_s": "disk_copy",
    "boot_to_command_s": "boot",
    "command_s": "command",
    "collect_s": "collect",
    "total_s": "total",
}


class _Metrics:
    def __init__(self, cache: Path) -> None:
        from prometheus_client import Counter, Gauge, Histogram
        from prometheus_client.core import REGISTRY

        self.jobs = Counter(f"{PREFIX}_jobs", "Jobs that ended, by the terminal message sent.", ["outcome"])
        self.job_running = Gauge(f"{PREFIX}_job_running", "1 while a job runs on this runner.")
        self.phase_seconds = Histogram(
            f"{PREFIX}_job_phase_seconds",
            "Time a job spent in each phase (pull, unpack, mkfs, disk_copy, boot, command, collect, total).",
            ["phase"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        self.heartbeat_interval = Histogram(
            f"{PREFIX}_heartbeat_interval_seconds",
            "Time between two heartbeats of one job (the protocol wants 1 s).",
            buckets=(0.5, 0.9, 1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 2, 5),
        )
        self.heartbeat_lag = Gauge(f"{PREFIX}_heartbeat_lag_seconds", "How late the last heartbeat was sent.")
        self.reconnects = Counter(f"{PREFIX}_reconnects", "Connections lost or failed, then retried.")
        self.paused = Gauge(f"{PREFIX}_paused", "1 while the runner asks for no job (drained, a local job).")
        self.pause_reasons = Gauge(
            f"{PREFIX}_pause_reason", "1 for each reason the runner is paused now.", ["reason"]
        )
        self.cache_lookups = Counter(
            f"{PREFIX}_cache_lookups", "Blob and root-disk template cache lookups.", ["cache", "result"]
        )
        Gauge(f"{PREFIX}_info", "The runner's version.", ["version"]).labels(__version__).set(1)
        REGISTRY.register(_CacheSize(cache))
        self.interference = _InterferenceMetrics()


_metrics: _Metrics | None = None


def cache_lookup(cache: str, hit: bool) -> None:
    if _metrics is not None:
        _metrics.cache_lookups.labels(cache, "hit" if hit else "miss").inc()


def job_running(running: bool) -> None:
    if _metrics is not None:
        _metrics.job_running.set(1 if running else 0)


def job_ended(outcome: str) -> None:
    """A terminal message was sent; ``outcome`` is its event."""
    if _metrics is not None:
        _metrics.jobs.labels(outcome).inc()


def job_phases(timings: dict[str, float]) -> None:
    """The phases of a job that ran, from its result's timings."""
    if _metrics is None:
        return
    for key, phase in PHASES.items():
        if key in timings:
            _metrics.phase_seconds.labels(phase).observe(timings[key])


class _InterferenceMetrics:
    """bencher_runner_interference_*: what disturbed the benchmark CPUs (host/interference.py)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        name = f"{PREFIX}_interference"
        self.iterations = Counter(f"{name}_iterations", "Iterations by interference verdict.", ["verdict"])
        self.checks = Counter(
            f"{name}_disturbed_checks", "Disturbed interference checks, by check.", ["check"]
        )
        self.share = Gauge(
            f"{name}_share",
            "Last iteration: share of the benchmark CPUs' time taken by other tasks or stolen.",
            ["source"],
        )


def interference(reports: Sequence[dict[str, Any] | None]) -> None:
    """A job's per-iteration interference reports."""
    if _metrics is None:
        return
    for report in reports:
        if report is None:
            continue
        m = _metrics.interference
        m.iterations.labels(report["verdict"]).inc()
        for check, doc in report["checks"].items():
            subs = doc.items() if check == "pressure" else [(None, doc)]
            for sub, body in subs:
                if body.get("verdict") == "disturbed":
                    m.checks.labels(f"{check}.{sub}" if sub else check).inc()
        m.share.labels("other_tasks").set(report["checks"]["other_tasks"].get("share", 0.0))
        m.share.labels("steal").set(report["checks"]["steal"].get("share", 0.0))


def heartbeat(interval: float, expected: float) -> None:
    if _metrics is not None:
        _metrics.heartbeat_interval.observe(interval)
        _metrics.heartbeat_lag.set(max(0.0, interval - expected))


def paused(reasons: tuple[str, ...]) -> None:
    """The last host check's pause reasons (empty: not paused); each is labelled by its first words."""
    if _metrics is None:
        return
    _metrics.paused.set(1 if reasons else 0)
    _metrics.pause_reasons.clear()
    for reason in reasons:
        _metrics.pause_reasons.labels(" ".join(reason.split()[:2])).set(1)


def reconnect() -> None:
    if _metrics is not None:
        _metrics.reconnects.inc()


def _dir_bytes(path: Path, *, own_only: bool = False) -> int:
    """Allocated bytes under ``path``; ``own_only``: not counting hard links (a chain base that is a
    link to a template is the template's bytes)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):  # removed while we walk
                st = os.lstat(os.path.join(dirpath, name))
                if not (own_only and st.st_nlink > 1):
                    total += st.st_blocks * 512
    return total


class _CacheSize:
    """Bytes on disk of the blob cache, the root-disk templates, the layer-chain disks and the spare
    disks, measured when scraped."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from bencher_runner.layercache import chain_cache_dir
        from bencher_runner.oci.blobcache import image_cache_dir
        from bencher_runner.sparedisk import SpareDisks

        family = GaugeMetricFamily(f"{PREFIX}_cache_bytes", "Bytes on disk in each cache.", labels=["cache"])
        family.add_metric(["blob"], _dir_bytes(image_cache_dir(self.cache)))
        family.add_metric(["template"], _dir_bytes(self.cache / "rootfs"))
        family.add_metric(["chain"], _dir_bytes(chain_cache_dir(self.cache), own_only=True))
        family.add_metric(["spare"], _dir_bytes(SpareDisks(self.cache).root))
        yield family


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all interfaces) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(f"--metrics-addr={addr!r}: expected HOST:PORT (e.g. 127.0.0.1:9464) or :PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_metrics(addr: str, cache: Path) -> tuple[str, int]:
    """Register the metrics and start the /metrics endpoint in a background thread; the bound address."""
    global _metrics
    host, port = parse_addr(addr)
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, host)
    except OSError as err:
        raise SpecError(
            f"cannot serve metrics on {addr}: {err.strerror or err}; pick a free port with --metrics-addr"
        ) from None
    if _metrics is None:
        _metrics = _Metrics(cache)
    return host, int(server.server_address[1])
