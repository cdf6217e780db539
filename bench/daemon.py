"""Daemon figures (issues #5 and #8): a real `runner daemon` subprocess against an in-process FakeBencher.

    .venv/bin/python -m bench.daemon [--repeat N] [--json OUT]

The daemon runs as it would on a host (`--accel tcg --no-tuning`, a fresh cache dir holding only the
kernel bundle and initramfs); job images are pulled over plain HTTP from a loopback docker-registry.
Times are the fake server's receive times (time.monotonic in this process): what a Bencher server sees.

1. Heartbeat cadence while a cold job pulls, unpacks and mkfs's a 512 MiB incompressible layer, then boots:
   the job runs in a worker thread and the event loop must keep its 1 s heartbeat or the server fails the
   job. Intervals from `running` to the terminal message, pooled over N cold jobs. Goal p99 <= 1.2 s.
2. cancel -> canceled: `server.cancel(job)` to the runner's `canceled`, with the VM running `sleep 600`
   (median of N; goal <= 1 s); also during the cold 512 MiB pull (within 1 s of `running`) and during boot
   (1-2 s after `running`, warm template). The server delivers a cancel in its reply to the next
   heartbeat, so the N cancels are spread over the heartbeat period; the runner's own share (heartbeat ->
   `canceled`) and cancel -> next `ready` (pull stopped, VM killed: the worker is free) are reported too.
3. RSS: the daemon's VmRSS/VmHWM after ~5 s connected and idle (goal <= 50 MiB), and its VmHWM after the
   cold 512 MiB job (pull and unpack run in a thread of the daemon process itself; goal <= 120 MiB).
4. Throughput: N_THROUGHPUT queued `echo hi` jobs of a busybox image (template warm after the first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.busybox import busybox_tree
from tests.support.oci_builder import build_layout, layer_from_dir

from bench.images import big_layer_layout, loopback_registry, push
from bencher_runner.fakeserver import FakeBencher
from bencher_runner.fakeserver.server import default_config, default_spec
from bencher_runner.paths import cache_dir

REPO = Path(__file__).resolve().parents[1]
RUNNER_BIN = REPO / ".venv" / "bin" / "runner"
KEY = "bencher_runner_" + "b3nch" * 6
PROJECT = "0f6c1c9e-6b0e-4a43-9d8a-2f1a4b9c7d11"
BIG_MIB = 512
N_THROUGHPUT = 5
MARKER = "bench-daemon-command-started"
SLEEPER = ["/bin/sh", "-c", f"echo {MARKER} >/dev/console; exec sleep 600"]
MIB = 1 << 20
PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A phase could not be measured (timeout, wrong result, daemon died); the message says which."""


# -- /proc ------------------------------------------------------------------------------------------------


def status_mib(pid: int, name: str) -> float:
    """A ``/proc/PID/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no {name} in /proc/{pid}/status")


def descendants(pid: int) -> list[tuple[int, str, float]]:
    """(pid, comm, RSS MiB) of every live descendant of ``pid`` (via /proc/PID/task/TID/children)."""
    out: list[tuple[int, str, float]] = []
    todo = [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                try:
                    comm = Path(f"/proc/{kid}/comm").read_text().strip()
                    rss = int(Path(f"/proc/{kid}/statm").read_text().split()[1]) * page / MIB
                except (OSError, IndexError, ValueError):
                    continue
                out.append((kid, comm, rss))
                todo.append(kid)
    return out


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a process from a later one that reused its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class ChildPeaks(threading.Thread):
    """Samples the daemon's descendants every 0.1 s: the peak RSS per command name (QEMU, mkfs.ext4)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="child-peaks")
        self.pid = pid
        self.peaks: dict[str, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.1):
            for _, comm, rss in descendants(self.pid):
                self.peaks[comm] = max(self.peaks.get(comm, 0.0), rss)


# -- the daemon subprocess --------------------------------------------------------------------------------


class DaemonProcess:
    """`runner daemon` in its own session, with PR_SET_PDEATHSIG=SIGTERM so it never outlives us."""

    def __init__(self, server: FakeBencher, cache: Path, state: Path, log: Path) -> None:
        self.cache, self.log_path = cache, log
        argv = [
            str(RUNNER_BIN), "daemon", "--host", server.url, "--runner", server.runner,
            "--cache-dir", str(cache), "--state-dir", str(state), "--accel", "tcg", "--no-tuning",
            "--no-auto-update", "--poll-timeout", "2",
        ]  # fmt: skip
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork

        def pdeathsig() -> None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "BENCHER_RUNNER_KEY": KEY},
                start_new_session=True,
                preexec_fn=pdeathsig,  # prctl only: safe after a fork
            )
        self.pid = self.proc.pid

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no daemon log)"
        return "daemon log (last lines):\n  " + "\n  ".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM (the daemon cancels its job and exits), then SIGKILL whatever of ours is left."""
        kids = [(pid, start_time(pid)) for pid, _, _ in descendants(self.pid)]
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                print("bench: the daemon ignored SIGTERM for 15 s; killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait(5)
        for pid, started in kids:  # QEMU runs in its own session: not in the daemon's process group
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    print(f"bench: killed pid {pid}, left behind by the daemon", file=sys.stderr)


# -- one daemon session -----------------------------------------------------------------------------------


@dataclass
class JobTrace:
    job: str
    running: float
    end: float
    end_event: str
    heartbeats: list[float] = field(default_factory=list)

    @property
    def intervals(self) -> list[float]:
        times = [self.running, *self.heartbeats]
        return [b - a for a, b in itertools.pairwise(times)]


@dataclass
class Cancel:
    latency: float  # cancel -> `canceled`
    reaction: float  # the heartbeat answered with `cancel` -> `canceled`
    free: float  # cancel -> next `ready`
    phase: str  # what the daemon was doing at the cancel
    left: list[str]  # the daemon's child processes still alive at that `ready` (should be none)
    stopped: str  # where the job stopped, from the daemon's log ("while its image was pulled")


class Session:
    def __init__(
        self, server: FakeBencher, daemon: DaemonProcess, registry: str, big: str, tiny: str
    ) -> None:
        self.server, self.daemon, self.registry = server, daemon, registry
        self.big, self.tiny = big, tiny
        self.cache = daemon.cache

    # -- waiting on FakeBencher.received ------------------------------------------------------------------
    def find(self, start: int, event: str, job: str | None = None) -> tuple[int, float] | None:
        received = self.server.received
        for i in range(start, len(received)):
            t, msg = received[i]
            if msg.get("event") == event and (job is None or msg.get("job") == job):
                return i, t
        return None

    def find_terminal(self, start: int, job: str) -> tuple[int, float, str] | None:
        received = self.server.received
        for i in range(start, len(received)):
            t, msg = received[i]
            if msg.get("job") == job and msg.get("event") in ("completed", "failed", "canceled"):
                return i, t, str(msg["event"])
        return None

    async def until(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            code = self.daemon.proc.poll()
            if code is not None:
                raise BenchError(
                    f"the daemon exited with {code} while waiting for {what}\n{self.daemon.tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.daemon.tail()}")
            await asyncio.sleep(0.02)

    async def wait_for(
        self, start: int, event: str, timeout: float, what: str, job: str | None = None
    ) -> int:
        await self.until(lambda: self.find(start, event, job) is not None, timeout, what)
        found = self.find(start, event, job)
        assert found is not None
        return found[0]

    def submit(self, digest: str, **config: Any) -> tuple[str, int]:
        start = len(self.server.received)
        cfg = default_config(registry=self.registry, project=PROJECT, digest=digest, **config)
        return self.server.add_job(config=cfg, spec=default_spec()), start

    async def trace(self, job: str, start: int, timeout: float, what: str) -> tuple[JobTrace, int]:
        """Wait for the job's terminal message; its trace and the received index of that message."""
        await self.until(lambda: self.find_terminal(start, job) is not None, timeout, what)
        found = self.find_terminal(start, job)
        assert found is not None
        end, t_end, event = found
        run = self.find(start, "running")
        if run is None or run[0] > end:
            raise BenchError(f"{what}: no `running` before its `{event}`")
        beats = [t for t, m in self.server.received[run[0] : end] if m.get("event") == "heartbeat"]
        return JobTrace(job, run[1], t_end, event, beats), end

    def check_completed(self, job: str, what: str, stdout: str | None = None) -> None:
        state, out = self.server.job_state(job), self.server.results(job)
        if state != "processed" or (stdout is not None and out and out["results"][0].get("stdout") != stdout):
            raise BenchError(f"{what}: expected a completed job, got {state}: {out}\n{self.daemon.tail()}")

    # -- cache state ----------------------------------------------------------------------------------------
    def wipe_images(self) -> None:
        """Cold cache: no blob, no root-disk template (the kernel bundle and initramfs stay)."""
        for sub in ("images", "rootfs"):
            shutil.rmtree(self.cache / sub, ignore_errors=True)

    def phase(self) -> str:
        comms = {comm for _, comm, _ in descendants(self.daemon.pid)}
        if any(c.startswith("qemu") for c in comms):
            return "VM (QEMU running)"
        if any(c.startswith("mkfs") for c in comms):
            return "mkfs"
        blobs = self.cache / "images" / "blobs" / "sha256"
        partial = list(blobs.glob(".tmp-*")) if blobs.is_dir() else []
        if partial:
            got = 0
            for p in partial:
                with contextlib.suppress(OSError):
                    got += p.stat().st_size
            return f"pull ({got / MIB:.0f} of {BIG_MIB} MiB)"
        if list((self.cache / "work").glob("job-*/tree")):
            return "unpack"
        return "other" + (f" ({', '.join(sorted(comms))})" if comms else "")

    def serial_marker(self) -> bool:
        for log in (self.cache / "work").glob("job-*/iter-*/serial.log"):
            with contextlib.suppress(OSError):
                if MARKER in log.read_text(errors="replace"):
                    return True
        return False

    # -- phases ------------------------------------------------------------------------------------------
    async def idle_rss(self) -> tuple[float, float]:
        await self.wait_for(0, "ready", 60, "the daemon's first `ready`")
        await asyncio.sleep(5)
        return status_mib(self.daemon.pid, "VmRSS"), status_mib(self.daemon.pid, "VmHWM")

    async def cold_big_job(self) -> JobTrace:
        await asyncio.to_thread(self.wipe_images)
        job, start = self.submit(self.big, timeout=300)
        trace, end = await self.trace(job, start, 300, "the cold 512 MiB job to finish")
        self.check_completed(job, "the cold 512 MiB job")
        await self.wait_for(end + 1, "ready", 30, "`ready` after the cold 512 MiB job")
        return trace

    async def cancel_at(
        self, digest: str, earliest: Callable[[float], Awaitable[float]], phase: float, what: str
    ) -> Cancel:
        """Run a job; cancel it at the first moment >= ``await earliest(t_running)`` that lies ``phase``
        of a heartbeat period after `running` (so that repeats sample the whole wait for the next
        heartbeat, which is where the server's cancel is delivered); time `canceled` and the next `ready`."""
        job, start = self.submit(digest, timeout=900, cmd=SLEEPER)
        run = await self.wait_for(start, "running", 120, f"`running` ({what})")
        t_running = self.server.received[run][0]
        first = await earliest(t_running)
        moment = t_running + max(0, math.ceil(first - t_running - phase)) + phase
        await asyncio.sleep(max(0.0, moment - time.monotonic()))
        doing = await asyncio.to_thread(self.phase)
        t_cancel = time.monotonic()
        self.server.cancel(job)
        canceled = await self.wait_for(run, "canceled", 30, f"`canceled` ({what})", job=job)
        ready = await self.wait_for(canceled + 1, "ready", 180, f"`ready` after the cancel ({what})")
        received = self.server.received
        told = [t for t, m in received[run:canceled] if t >= t_cancel and m.get("event") == "heartbeat"]
        t_canceled = received[canceled][0]
        reaction = t_canceled - told[0] if told else float("nan")
        left = [comm for _, comm, _ in await asyncio.to_thread(descendants, self.daemon.pid)]
        stopped = await asyncio.to_thread(self.stopped, job)
        return Cancel(t_canceled - t_cancel, reaction, received[ready][0] - t_cancel, doing, left, stopped)

    def stopped(self, job: str) -> str:
        """The daemon's own account of where a canceled job stopped (best effort: its log format)."""
        for line in self.daemon.log_path.read_text(errors="replace").splitlines():
            if job in line and "the job was canceled" in line:
                return line.split("the job was canceled", 1)[1].split("(", 1)[0].strip() or "?"
        return "?"

    async def cold(self, t_running: float) -> float:
        return t_running

    async def booting(self, t_running: float) -> float:
        return t_running + 1.0

    async def command_running(self, t_running: float) -> float:
        """When the guest has printed the marker on its console (its command runs), plus 0.5 s."""
        deadline = t_running + 60
        while not await asyncio.to_thread(self.serial_marker):
            if time.monotonic() > deadline:
                raise BenchError(f"the guest never printed {MARKER!r} on its console\n{self.daemon.tail()}")
            await asyncio.sleep(0.1)
        return time.monotonic() + 0.5

    async def throughput(self, n: int) -> tuple[float, list[JobTrace]]:
        t0 = time.monotonic()
        starts = [self.submit(self.tiny, timeout=120) for _ in range(n)]
        traces: list[JobTrace] = []
        start = starts[0][1]
        for job, _ in starts:
            trace, end = await self.trace(job, start, 120, "a throughput job to finish")
            self.check_completed(job, "a throughput job", stdout="hi\n")
            traces.append(trace)
            start = end + 1
        return traces[-1].end - t0, traces


# -- the run ----------------------------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def tiny_layout(tmp: Path) -> Path:
    layout = tmp / "tiny"
    config = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", "echo hi"]}
    build_layout(layout, [layer_from_dir(busybox_tree(tmp / "tiny-tree"))], config, tag="latest")
    return layout


def fresh_cache(dest: Path) -> Path:
    """A cache dir holding only what `runner kernel fetch` and a first job leave: kernel, initramfs."""
    source = cache_dir()
    if not (source / "kernel").is_dir():
        raise BenchError(f"no kernel bundle in {source}: run `make setup` (or `runner kernel fetch`) first")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "kernel").symlink_to(source / "kernel")  # with its vmlinux, as `runner kernel fetch` leaves it
    if (source / "initramfs").is_dir():
        shutil.copytree(source / "initramfs", dest / "initramfs")
    return dest


def report(figures: dict[str, float], name: str, label: str, unit: str, goal: float | None = None) -> None:
    value = figures[name]
    text = f"{label}: {value:.3f} {unit}"
    if goal is not None:
        text += f" (goal <= {goal:g} {unit}: {'met' if value <= goal else 'NOT met'})"
    print(text, flush=True)


async def measure(
    repeat: int, tmp: Path, registry: str, big: str, tiny: str, keep_log: Path | None
) -> dict[str, float]:
    figures: dict[str, float] = {}
    cache = fresh_cache(tmp / "cache")
    server = await FakeBencher(key=KEY).start()
    try:
        daemon = DaemonProcess(server, cache, tmp / "state", tmp / "daemon.log")
    except BaseException:
        await server.close()
        raise
    peaks = ChildPeaks(daemon.pid)
    peaks.start()
    try:
        s = Session(server, daemon, registry, big, tiny)
        figures["idle_rss_mib"], figures["idle_hwm_mib"] = await s.idle_rss()
        report(figures, "idle_rss_mib", "daemon idle VmRSS (5 s connected, polling)", "MiB", 50)
        report(figures, "idle_hwm_mib", "daemon idle VmHWM", "MiB")

        traces = []
        for i in range(repeat):
            traces.append(await s.cold_big_job())
            if i == 0:
                figures["pull_hwm_mib"] = await asyncio.to_thread(status_mib, daemon.pid, "VmHWM")
        intervals = [x for t in traces for x in t.intervals]
        figures["heartbeat_p50_s"] = statistics.median(intervals)
        figures["heartbeat_p99_s"] = percentile(intervals, 99)
        figures["heartbeat_max_s"] = max(intervals)
        figures["heartbeat_intervals"] = len(intervals)
        figures["cold_big_job_s"] = statistics.median(t.end - t.running for t in traces)
        figures["mkfs_peak_rss_mib"] = peaks.peaks.get("mkfs.ext4", 0.0)
        per_job = ", ".join(f"{t.end - t.running:.1f}" for t in traces)
        print(f"cold {BIG_MIB} MiB job, `running` -> `completed`: {per_job} s ({repeat} jobs)")
        print(f"heartbeat intervals: {len(intervals)} over {repeat} cold {BIG_MIB} MiB jobs")
        report(figures, "heartbeat_p50_s", "heartbeat interval p50", "s")
        report(figures, "heartbeat_p99_s", "heartbeat interval p99", "s", 1.2)
        report(figures, "heartbeat_max_s", "heartbeat interval max", "s")
        report(figures, "pull_hwm_mib", f"daemon VmHWM after a cold {BIG_MIB} MiB job", "MiB", 120)
        report(figures, "mkfs_peak_rss_mib", "mkfs.ext4 peak RSS (sampled, 0.1 s)", "MiB")

        phases = [(i + 0.5) / repeat for i in range(repeat)]  # spread over the heartbeat period
        pulls = []
        for phase in phases:
            await asyncio.to_thread(s.wipe_images)
            pulls.append(await s.cancel_at(big, s.cold, phase, "cancel during the pull"))

        wall, tput = await s.throughput(N_THROUGHPUT)
        figures["throughput_jobs_per_min"] = N_THROUGHPUT / wall * 60
        figures["throughput_s_per_job"] = wall / N_THROUGHPUT
        per_job = ", ".join(f"{t.end - t.running:.2f}" for t in tput)
        print(
            f"throughput: {N_THROUGHPUT} queued `echo hi` jobs in {wall:.1f} s; "
            f"`running` -> `completed`: {per_job} s"
        )
        report(figures, "throughput_jobs_per_min", "throughput", "jobs/min")
        report(figures, "throughput_s_per_job", "mean time per job", "s")

        boots = [await s.cancel_at(tiny, s.booting, p, "cancel during boot") for p in phases]
        vms = [await s.cancel_at(tiny, s.command_running, p, "cancel of a running VM") for p in phases]
        at = ", ".join(f"{p:.2f}" for p in phases)
        print(f"cancels asked {at} s past a heartbeat; the server delivers each in reply to the next one")
        for key, label, runs, goal in (
            ("cancel_vm", "of a running VM (`sleep 600`)", vms, 1.0),
            ("cancel_boot", "during boot (1-2 s after `running`, warm template)", boots, None),
            ("cancel_pull", f"during the cold {BIG_MIB} MiB pull (0-1 s after `running`)", pulls, None),
        ):
            figures[f"{key}_s"] = statistics.median(c.latency for c in runs)
            figures[f"{key}_reaction_s"] = statistics.median(c.reaction for c in runs)
            figures[f"{key}_free_s"] = statistics.median(c.free for c in runs)
            detail = "; ".join(
                f"{c.latency:.2f}/{c.reaction:.3f}/{c.free:.2f} s (asked at {c.phase}, stopped {c.stopped})"
                for c in runs
            )
            print(f"cancel {label}, -> canceled / heartbeat -> canceled / -> next ready: {detail}")
            for c in runs:
                if c.left:
                    print(f"  SUSPICIOUS: still running when the daemon was ready again: {', '.join(c.left)}")
            report(figures, f"{key}_s", f"  cancel -> canceled, median of {repeat}", "s", goal)
            report(figures, f"{key}_reaction_s", "  heartbeat answered with cancel -> canceled, median", "s")
            report(figures, f"{key}_free_s", "  cancel -> runner free (next `ready`), median", "s")
        figures["daemon_hwm_end_mib"] = await asyncio.to_thread(status_mib, daemon.pid, "VmHWM")
        report(figures, "daemon_hwm_end_mib", "daemon VmHWM at the end", "MiB")
        figures["qemu_peak_rss_mib"] = max(
            (v for k, v in peaks.peaks.items() if k.startswith("qemu")), default=0
        )
        report(figures, "qemu_peak_rss_mib", "QEMU peak RSS (sampled; guest memory 512 MiB)", "MiB")
        leftovers = [p.name for p in (cache / "work").glob("job-*")]
        leftovers += [p.name for p in (cache / "images" / "blobs" / "sha256").glob(".tmp-*")]
        print(f"left in the daemon's cache (work dirs, partial blobs): {', '.join(leftovers) or 'nothing'}")
    finally:
        peaks.halt.set()
        await asyncio.to_thread(daemon.stop)
        await server.close()
        log = daemon.log_path.read_text(errors="replace").splitlines()
        noted = [line for line in log if " WARNING " in line or " ERROR " in line or "Traceback" in line]
        noted = [line for line in noted if "TCG emulates the CPU" not in line]  # expected here
        print(f"daemon log: {len(log)} lines, {len(noted)} warnings or errors (besides TCG's)")
        for line in noted[:8]:
            print(f"  {line}")
        if keep_log is not None:
            shutil.copyfile(daemon.log_path, keep_log)
    return figures


def run(repeat: int = 3, *, daemon_log: Path | None = None) -> dict[str, float]:
    """Measure every daemon figure (medians over ``repeat``), print one line per figure, return them."""
    t0 = time.monotonic()
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    big_layout = big_layer_layout(BIG_MIB)
    with tempfile.TemporaryDirectory(prefix="bench-daemon-", dir="/var/tmp") as name:
        tmp = Path(name)
        with loopback_registry(tmp) as reg:
            big = push(big_layout, reg, PROJECT)
            tiny = push(tiny_layout(tmp), reg, PROJECT, "tiny")
            print(f"set-up (images built or cached, pushed to {reg.host}): {time.monotonic() - t0:.1f} s")
            figures = asyncio.run(measure(repeat, tmp, reg.url, big, tiny, daemon_log))
    figures["total_s"] = time.monotonic() - t0
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"total: {figures['total_s']:.0f} s (load average at the end: {load})")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.daemon", description="The daemon figures.")
    parser.add_argument("--repeat", type=int, default=3, help="samples per median (default 3)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--daemon-log", type=Path, help="keep a copy of the daemon's log here")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: every process is stopped
    try:
        figures = run(args.repeat, daemon_log=args.daemon_log)
    except BenchError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        sys.exit(1)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
