"""A thread that snapshots the host while a VM runs, so the command's window can be cut out afterwards.

The host cannot see when the guest's command starts; it sees when the agent's exit record reaches the
output disk (the job polls it every 0.1 s) and learns afterwards how long the command ran by the
guest's clock. So the sampler takes a snapshot every ``interval`` seconds from the VM's start, one
more the moment the job reports the exit record, and the report uses the first snapshot at or after
(exit seen - command duration) up to that last one: boot is left out, and the window misses at most
one interval at the start and the exit record's polling delay (<= 0.1 s) at the end. Without an exit
record (timeout, crash) the window is the VM's whole run.

Counters are cumulative, so dropping snapshots loses nothing at the ends that stay: past
``max_samples`` every other one is dropped (its task attribution carried to the next) and the interval
doubles, which bounds memory for hour-long commands. The thread's own CPU time is measured and reported.
"""

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bencher_runner.host.cpus import CpuLayout
from bencher_runner.host.interference import (
    Attribution,
    Snapshot,
    TaskSample,
    attribute,
    interference,
    read_snapshot,
)

INTERVAL_S = 0.25
MAX_SAMPLES = 1200


@dataclass
class _Sample:
    snap: Snapshot
    since_previous: Attribution = field(default_factory=Attribution)
    command_end: bool = False


class InterferenceSampler:
    def __init__(
        self,
        vmm_pid: int,
        cpus: Sequence[int],
        cpus_source: str,
        *,
        interval: float = INTERVAL_S,
        root: Path = Path("/"),
        max_samples: int = MAX_SAMPLES,
    ) -> None:
        self.vmm_pid = vmm_pid
        self.cpus = tuple(cpus)
        self.cpus_source = cpus_source
        self.interval = interval
        self.root = root
        self.max_samples = max_samples
        self.samples: list[_Sample] = []
        self._tasks: dict[int, TaskSample] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._end_requested = False
        self._cpu_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="interference-sampler", daemon=True)

    def start(self) -> "InterferenceSampler":
        self._take()
        self._thread.start()
        return self

    def command_ended(self) -> None:
        """The job saw the agent's exit record: snapshot now (in the sampler's thread)."""
        self._end_requested = True
        self._wake.set()

    def stop(self) -> None:
        if self._stop and not self._thread.is_alive():
            return
        if self._thread.is_alive():
            self._stop = True
            self._wake.set()
            self._thread.join()
        self._stop = True
        self._take()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop:
                return
            end, self._end_requested = self._end_requested, False
            self._take(command_end=end)

    def _take(self, *, command_end: bool = False) -> None:
        t0 = time.thread_time()
        try:
            snap = read_snapshot(self.root, time.monotonic(), self.cpus, self.vmm_pid)
        except (OSError, ValueError, IndexError):  # an observer: a host it cannot read has no report
            return
        if self.samples and not snap.vmm:
            return  # the VMM is gone: its threads' time can no longer be told apart
        with self._lock:
            since = (
                attribute(self._tasks, snap.tasks, self.cpus, [self.vmm_pid])
                if self.samples
                else Attribution()
            )
            self._tasks, snap.tasks = snap.tasks, {}  # only the latest scan is kept
            self.samples.append(_Sample(snap, since, command_end))
            if len(self.samples) > self.max_samples:
                self._thin()
        self._cpu_s += time.thread_time() - t0

    def _thin(self) -> None:
        kept = [self.samples[0]]
        carry = Attribution()
        for i, sample in enumerate(self.samples[1:-1], start=1):
            if i % 2 and not sample.command_end:
                carry.add(sample.since_previous)
                continue
            sample.since_previous.add(carry)
            carry = Attribution()
            kept.append(sample)
        last = self.samples[-1]
        last.since_previous.add(carry)
        kept.append(last)
        self.samples = kept
        self.interval *= 2

    def report(self, command_s: float | None) -> dict[str, Any] | None:
        """The interference report for the command's window (or the VM's run), None with < 2 snapshots."""
        with self._lock:
            samples = list(self.samples)
        if len(samples) < 2:
            return None
        ends = [i for i, s in enumerate(samples) if s.command_end]
        window: dict[str, Any]
        if command_s is not None and command_s >= 0:
            # The exit record seen by the job's poll, else the VM exited first (the agent reboots as
            # soon as the results are written): the last snapshot while the VMM lived.
            last = ends[0] if ends else len(samples) - 1
            end_how = (
                "the host saw the agent's exit record (polled every 0.1 s)"
                if ends
                else f"the last snapshot before the VM exited (within {self.interval:g} s of it)"
            )
            start_t = samples[last].snap.t - command_s
            after = [i for i in range(last) if samples[i].snap.t >= start_t]
            first = after[0] if after else max(0, last - 1)
            covered = samples[last].snap.t - samples[first].snap.t
            window = {
                "source": "command",
                "command_s": round(command_s, 3),
                "measured_s": round(covered, 3),
                "starts_after_command_s": round(samples[first].snap.t - start_t, 3),
                "how": f"end: {end_how}; start: the first snapshot after that minus the guest-measured "
                f"command time; snapshots every {self.interval:g} s",
            }
        else:
            first, last = 0, len(samples) - 1
            window = {
                "source": "vm",
                "measured_s": round(samples[last].snap.t - samples[first].snap.t, 3),
                "how": "no command exit record: the VM's whole run, boot included",
            }
        attribution = Attribution()
        for sample in samples[first + 1 : last + 1]:
            attribution.add(sample.since_previous)
        freqs = [s.snap.freq_khz for s in samples[first : last + 1]]
        alone = self.cpus_source == "vcpu-pinning" and len(self.cpus) > 1  # job._pin: others on the last
        doc = interference(
            samples[first].snap, samples[last].snap, self.cpus, attribution, freqs, vcpu_alone=alone
        )
        doc["cpus_source"] = self.cpus_source
        doc["window"] = window
        doc["sampler"] = {
            "snapshots": len(samples),
            "cpu_s": round(self._cpu_s, 4),
            "ms_per_snapshot": round(1000 * self._cpu_s / len(samples), 2),
        }
        return doc


def sampler_for(vmm_pid: int | None, layout: CpuLayout | None, accel: str) -> "SamplerScope":
    """The job's hook: a sampler on the VMM's benchmark CPUs, stopped when the block exits.

    The CPUs are the ones job._pin pins the vCPUs to (KVM with an isolated layout), else the CPUs the
    VMM may run on (its affinity: the benchmark cores under TCG with isolation, every CPU without)."""
    pinned = layout is not None and layout.has_isolation and accel == "kvm"
    return SamplerScope(vmm_pid, layout.benchmark if layout is not None and pinned else (), accel)


class SamplerScope:
    def __init__(self, vmm_pid: int | None, benchmark: tuple[int, ...], accel: str) -> None:
        self.vmm_pid, self.benchmark, self.accel = vmm_pid, benchmark, accel
        self.sampler: InterferenceSampler | None = None

    def __enter__(self) -> "SamplerScope":
        pid = self.vmm_pid
        if pid is None:
            return self
        if self.benchmark:
            cpus, source = self.benchmark, "vcpu-pinning"
        else:
            try:
                cpus, source = tuple(sorted(os.sched_getaffinity(pid))), "vmm-affinity"
            except OSError:
                return self
        self.sampler = InterferenceSampler(pid, cpus, source).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def command_ended(self) -> None:
        if self.sampler is not None:
            self.sampler.command_ended()

    def report(self, command_s: float | None) -> dict[str, Any] | None:
        """``command_s``: the command's run time as the guest measured it (None: not known)."""
        if self.sampler is None:
            return None
        self.sampler.stop()
        try:
            return self.sampler.report(command_s)
        except (ValueError, KeyError, IndexError, ZeroDivisionError):  # an observer never fails a job
            return None
