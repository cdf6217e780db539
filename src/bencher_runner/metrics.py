"""Prometheus metrics of a runner host (`runner up --metrics-addr HOST:PORT`; off by default).

The counters live in prometheus_client's default registry (which also exports the process's own
RSS, CPU and open files), are updated where things happen (daemon loop, job phases, caches) and cost
next to nothing when nobody scrapes. Cache sizes are measured at scrape time.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from bencher_runner import __version__
from bencher_runner.spec.errors import SpecError

PREFIX = "bencher_runner"

JOBS = Counter(f"{PREFIX}_jobs", "Jobs that ended, by the terminal message sent.", ["outcome"])
JOB_RUNNING = Gauge(f"{PREFIX}_job_running", "1 while a job runs on this runner.")
PHASE_SECONDS = Histogram(
    f"{PREFIX}_job_phase_seconds",
    "Time a job spent in each phase (pull, unpack, mkfs, disk_copy, boot, command, collect, total).",
    ["phase"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
HEARTBEAT_INTERVAL = Histogram(
    f"{PREFIX}_heartbeat_interval_seconds",
    "Time between two heartbeats of one job (the protocol wants 1 s).",
    buckets=(0.5, 0.9, 1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 2, 5),
)
HEARTBEAT_LAG = Gauge(f"{PREFIX}_heartbeat_lag_seconds", "How late the last heartbeat was sent.")
RECONNECTS = Counter(f"{PREFIX}_reconnects", "WebSocket connections lost or failed, then retried.")
CACHE_LOOKUPS = Counter(
    f"{PREFIX}_cache_lookups", "Blob and root-disk template cache lookups.", ["cache", "result"]
)
INFO = Gauge(f"{PREFIX}_info", "The runner's version.", ["version"])
INFO.labels(__version__).set(1)

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


def cache_lookup(cache: str, hit: bool) -> None:
    CACHE_LOOKUPS.labels(cache, "hit" if hit else "miss").inc()


def job_timings(timings: dict[str, float]) -> None:
    for key, phase in PHASES.items():
        if key in timings:
            PHASE_SECONDS.labels(phase).observe(timings[key])


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):  # removed while we walk
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class CacheSize(Collector):
    """Bytes on disk of the blob cache and the root-disk templates, measured when scraped."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from bencher_runner.oci.blobcache import image_cache_dir

        family = GaugeMetricFamily(f"{PREFIX}_cache_bytes", "Bytes on disk in each cache.", labels=["cache"])
        family.add_metric(["blob"], _dir_bytes(image_cache_dir(self.cache)))
        family.add_metric(["template"], _dir_bytes(self.cache / "rootfs"))
        yield family


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all interfaces) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(f"--metrics-addr={addr!r}: expected HOST:PORT (e.g. 127.0.0.1:9464) or :PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_metrics(addr: str, cache: Path) -> tuple[str, int]:
    """Start the /metrics endpoint in a background thread; returns the bound (host, port)."""
    host, port = parse_addr(addr)
    REGISTRY.register(CacheSize(cache))
    try:
        server, _ = start_http_server(port, host)
    except OSError as err:
        raise SpecError(
            f"cannot serve metrics on {addr}: {err.strerror or err}; pick a free port with --metrics-addr"
        ) from None
    return host, int(server.server_address[1])
