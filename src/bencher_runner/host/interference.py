"""What disturbed the benchmark CPUs while a command ran: host snapshots, their deltas, a verdict.

A benchmark number is only as good as the CPUs it ran on were quiet. This module reads, from /proc
and /sys under a root path (tests feed recorded trees), the counters that say who else used the
benchmark CPUs: per-CPU time and steal (/proc/stat), interrupts and softirqs per CPU, the other
tasks that ran there (each task's CPU time and last CPU), the VMM's own threads (their CPU time,
major faults, the vCPUs' involuntary context switches), CPU frequency and thermal throttle
counters, and pressure stall totals. Reading is the only impure part: `interference` turns two
snapshots (plus the per-interval task attribution the sampler gathered in between) into a report
with a verdict per check against the thresholds below, each written once with its reason.
"""

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bencher_runner.host.cpus import format_cpu_list

USER_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
TICK_S = 1.0 / USER_HZ
# vCPU threads: QEMU names them "CPU 0/KVM" or "CPU 0/TCG", Firecracker "fc_vcpu 0".
_VCPU = re.compile(r"^(CPU \d+/|fc_vcpu \d+)")
Verdict = Literal["clean", "disturbed", "unavailable", "info"]


@dataclass(frozen=True)
class Thresholds:
    """Above these a check says "disturbed". Each is the size of effect a benchmark would show."""

    # Other tasks' share of the benchmark CPUs' time: 2 % taken from a CPU-bound command moves its
    # result by about 2 %, the size of regression Bencher's thresholds are usually set to catch.
    other_share: float = 0.02
    # Hard interrupts (all but the local timer, which is the scheduler's own tick) per CPU per second:
    # each costs 1-5 us plus cache damage, so 1000/s is 0.1-0.5 % of the CPU and visible jitter.
    irq_per_s: float = 1000.0
    # Softirqs other than the tick's own (TIMER, HRTIMER, SCHED, RCU): network and block completions
    # run on the benchmark CPU, same cost argument as hard interrupts.
    softirq_per_s: float = 1000.0
    # Frequency spread over the window (max-min)/max: 5 % slower clock is 5 % slower code.
    freq_spread: float = 0.05
    # Steal on a virtual host: time the hypervisor gave our vCPU to someone else; same 2 % as others.
    steal_share: float = 0.02
    # Any major fault of the VMM is a disk read (swap-in) the guest waited for: milliseconds each.
    vmm_major_faults: int = 0
    # Pressure stall shares (some, whole host) for memory and io: memory reclaim or IO stalls above
    # these slow every task, the guest's included. CPU pressure is host-wide (housekeeping CPUs
    # too), so it is shown but the per-CPU other-task share is what decides.
    memory_pressure: float = 0.01
    io_pressure: float = 0.10
    # Involuntary context switches of a vCPU thread per second: each is the vCPU taken off its CPU
    # for another runnable task (its own VMM's threads included when they share the CPU).
    vcpu_preempt_per_s: float = 50.0


THRESHOLDS = Thresholds()
TICK_SOFTIRQS = frozenset({"TIMER", "HRTIMER", "SCHED", "RCU"})
TICK_IRQS = frozenset({"LOC"})
TOP = 3


@dataclass(frozen=True)
class TaskSample:
    pid: int
    comm: str
    ticks: int  # utime + stime, in USER_HZ ticks
    cpu: int  # the CPU it last ran on


@dataclass(frozen=True)
class ThreadSample:
    comm: str
    cpu_ns: int  # schedstat: time on a CPU
    involuntary: int  # nonvoluntary_ctxt_switches


@dataclass
class Snapshot:
    """One reading of the host's counters at host time ``t`` (time.monotonic seconds)."""

    t: float
    cpu: dict[int, tuple[int, ...]]  # /proc/stat per CPU: user nice system idle iowait irq softirq steal
    irqs: dict[str, dict[int, int]]  # source name -> CPU -> count
    softirqs: dict[str, dict[int, int]]
    freq_khz: dict[int, int]
    throttle: dict[int, int]  # CPU -> core + package thermal throttle events
    pressure: dict[str, int]  # "cpu"/"memory"/"io" -> "some" total stall, microseconds
    vmm: dict[int, ThreadSample]  # tid -> VMM thread
    vmm_major_faults: int | None
    tasks: dict[int, TaskSample] = field(default_factory=dict)  # every host task, when scanned


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def parse_stat(text: str) -> dict[int, tuple[int, ...]]:
    out: dict[int, tuple[int, ...]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit():
            values = tuple(int(v) if v.isdigit() else 0 for v in rest.split()[:8])
            out[int(name[3:])] = values + (0,) * (8 - len(values))
    return out


def parse_interrupts(text: str) -> dict[str, dict[int, int]]:
    """/proc/interrupts or /proc/softirqs -> source -> CPU -> count. A numbered IRQ is named by its
    device (the last word of its line), a named one (LOC, NET_RX) by its name."""
    lines = text.splitlines()
    if not lines:
        return {}
    cpus = [int(word[3:]) for word in lines[0].split() if word.startswith("CPU") and word[3:].isdigit()]
    out: dict[str, dict[int, int]] = {}
    for line in lines[1:]:
        head, sep, rest = line.partition(":")
        if not sep:
            continue
        words = rest.split()
        counts: list[int] = []
        for word in words[: len(cpus)]:
            if not word.isdigit():
                break
            counts.append(int(word))
        if not counts:
            continue
        head = head.strip()
        tail = words[len(counts) :]
        name = head if not head.isdigit() else (f"{head} {tail[-1]}" if tail else head)
        row = out.setdefault(name, {})
        for cpu, count in zip(cpus, counts, strict=False):
            row[cpu] = row.get(cpu, 0) + count
    return out


def parse_pressure(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("some "):
            for word in line.split():
                if word.startswith("total="):
                    return int(word[6:])
    return None


def parse_task_stat(text: str) -> tuple[str, int, int, int] | None:
    """/proc/PID/task/TID/stat -> (comm, utime+stime ticks, last CPU, majflt)."""
    head, sep, rest = text.rpartition(")")
    if not sep:
        return None
    comm = head.partition("(")[2]
    fields = rest.split()  # fields[0] is field 3 (state)
    try:
        return comm, int(fields[11]) + int(fields[12]), int(fields[36]), int(fields[9])
    except (IndexError, ValueError):
        return None


def _status_field(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            value = line.split()[1:2]
            return int(value[0]) if value and value[0].isdigit() else 0
    return 0


def read_vmm(root: Path, pid: int) -> tuple[dict[int, ThreadSample], int | None]:
    base = root / "proc" / str(pid)
    threads: dict[int, ThreadSample] = {}
    try:
        tids = [int(name) for name in os.listdir(base / "task") if name.isdigit()]
    except OSError:
        return threads, None
    for tid in tids:
        task = base / "task" / str(tid)
        comm, schedstat, status = _read(task / "comm"), _read(task / "schedstat"), _read(task / "status")
        if comm is None or schedstat is None or status is None:
            continue
        ran = schedstat.split()[:1]
        if not ran or not ran[0].isdigit():
            continue
        threads[tid] = ThreadSample(
            comm.strip(), int(ran[0]), _status_field(status, "nonvoluntary_ctxt_switches")
        )
    stat = _read(base / "stat")
    parsed = parse_task_stat(stat) if stat else None
    return threads, parsed[3] if parsed else None


def read_tasks(root: Path) -> dict[int, TaskSample]:
    """Every thread on the host: its CPU time and the CPU it last ran on."""
    proc = root / "proc"
    out: dict[int, TaskSample] = {}
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            tids = [name for name in os.listdir(proc / pid / "task") if name.isdigit()]
        except OSError:
            continue
        for tid in tids:
            text = _read(proc / pid / "task" / tid / "stat")
            parsed = parse_task_stat(text) if text else None
            if parsed is not None:
                out[int(tid)] = TaskSample(int(pid), parsed[0], parsed[1], parsed[2])
    return out


def read_snapshot(
    root: Path, t: float, cpus: Sequence[int], vmm_pid: int | None, *, tasks: bool = True
) -> Snapshot:
    """One reading under ``root`` ("/" on a live host). Files the host does not expose are left out."""
    proc, cpu_dir = root / "proc", root / "sys/devices/system/cpu"
    freq: dict[int, int] = {}
    throttle: dict[int, int] = {}
    for cpu in cpus:
        if (text := _read(cpu_dir / f"cpu{cpu}/cpufreq/scaling_cur_freq")) and text.strip().isdigit():
            freq[cpu] = int(text)
        counts = [
            _read(cpu_dir / f"cpu{cpu}/thermal_throttle/{name}")
            for name in ("core_throttle_count", "package_throttle_count")
        ]
        if any(c is not None for c in counts):
            throttle[cpu] = sum(int(c) for c in counts if c is not None and c.strip().isdigit())
    pressure: dict[str, int] = {}
    for kind in ("cpu", "memory", "io"):
        if (text := _read(proc / "pressure" / kind)) and (total := parse_pressure(text)) is not None:
            pressure[kind] = total
    vmm, faults = read_vmm(root, vmm_pid) if vmm_pid is not None else ({}, None)
    return Snapshot(
        t=t,
        cpu=parse_stat(_read(proc / "stat") or ""),
        irqs=parse_interrupts(_read(proc / "interrupts") or ""),
        softirqs=parse_interrupts(_read(proc / "softirqs") or ""),
        freq_khz=freq,
        throttle=throttle,
        pressure=pressure,
        vmm=vmm,
        vmm_major_faults=faults,
        tasks=read_tasks(root) if tasks else {},
    )


@dataclass
class Attribution:
    """Other tasks' CPU time on the benchmark CPUs over an interval, by task name (ticks), and which
    tasks (tid) ran there. A task's time between two scans counts on the CPU it was last seen on."""

    ticks: Counter[str] = field(default_factory=Counter)
    tids: set[int] = field(default_factory=set)

    def add(self, other: "Attribution") -> None:
        self.ticks.update(other.ticks)
        self.tids |= other.tids


def attribute(
    before: dict[int, TaskSample], after: dict[int, TaskSample], cpus: Iterable[int], exclude: Iterable[int]
) -> Attribution:
    """Pure: the tasks of ``after`` (not in ``exclude``: the VMM's pid) whose time grew and that were
    last on a benchmark CPU. A task new since ``before`` counts with all its time."""
    wanted, skip = set(cpus), set(exclude)
    out = Attribution()
    for tid, task in after.items():
        if task.pid in skip or task.cpu not in wanted:
            continue
        prev = before.get(tid)
        grew = task.ticks - (prev.ticks if prev is not None and prev.pid == task.pid else 0)
        if grew > 0:
            out.ticks[task.comm] += grew
            out.tids.add(tid)
    return out


def _check(verdict: bool | None, **values: Any) -> dict[str, Any]:
    label: Verdict = "unavailable" if verdict is None else "disturbed" if verdict else "clean"
    if label != "unavailable" and "why" in values:  # measured, but not held against a threshold
        label = "info"
    return {"verdict": label, **values}


def _irq_check(
    before: dict[str, dict[int, int]], after: dict[str, dict[int, int]], cpus: Sequence[int],
    seconds: float, skip: frozenset[str], limit: float,
) -> dict[str, Any]:  # fmt: skip
    if not after:
        return _check(None, why="not exposed by this host")
    counts: Counter[str] = Counter()
    for name, row in after.items():
        if name.split()[0] in skip:
            continue
        old = before.get(name, {})
        delta = sum(max(0, row.get(cpu, 0) - old.get(cpu, 0)) for cpu in cpus)
        if delta:
            counts[name] = delta
    per_s = sum(counts.values()) / seconds / max(1, len(cpus))
    top = [{"name": name, "count": n} for name, n in counts.most_common(TOP)]
    return _check(per_s > limit, per_cpu_per_s=round(per_s, 1), threshold=limit, top=top)


def _share(ticks: float, seconds: float, ncpu: int) -> float:
    return ticks * TICK_S / (seconds * max(1, ncpu)) if seconds > 0 else 0.0


_BORN = ThreadSample("", 0, 0)  # a VMM thread started inside the window: all its time counts


def interference(
    before: Snapshot,
    after: Snapshot,
    cpus: Sequence[int],
    attribution: Attribution,
    freq_samples: Sequence[dict[int, int]] = (),
    limits: Thresholds = THRESHOLDS,
    *,
    vcpu_alone: bool = True,
) -> dict[str, Any]:
    """Pure: the checks between two snapshots on ``cpus``, each with its verdict, and the verdict of
    all (disturbed when any check is) with one short reason per disturbed check. ``vcpu_alone``: no
    other VMM thread may run on a vCPU's CPU; when false (unpinned, e.g. TCG), the VMM's own threads
    preempt its vCPU too, so vCPU preemptions are shown without a verdict."""
    seconds = after.t - before.t
    checks: dict[str, dict[str, Any]] = {
        "other_tasks": _other_tasks(before, after, cpus, attribution, seconds, limits),
        "irqs": _irq_check(before.irqs, after.irqs, cpus, seconds, TICK_IRQS, limits.irq_per_s),
        "softirqs": _irq_check(
            before.softirqs, after.softirqs, cpus, seconds, TICK_SOFTIRQS, limits.softirq_per_s
        ),
        "frequency": _frequency(before, after, cpus, freq_samples, limits),
        "steal": _steal(before, after, cpus, seconds, limits),
        "vmm_major_faults": _major_faults(before, after, limits),
        "pressure": _pressure(before, after, seconds, limits),
        "vcpu_preemptions": _vcpu_preemptions(before, after, seconds, limits, vcpu_alone=vcpu_alone),
    }
    reasons = _reasons(checks, cpus)
    return {
        "verdict": "disturbed" if reasons else "clean",
        "reasons": reasons,
        "cpus": format_cpu_list(cpus),
        "seconds": round(seconds, 3),
        "checks": checks,
    }


def _other_tasks(
    before: Snapshot,
    after: Snapshot,
    cpus: Sequence[int],
    attribution: Attribution,
    seconds: float,
    limits: Thresholds,
) -> dict[str, Any]:
    """The CPUs' busy time minus the VMM's threads (pinned to, or allowed only on, them)."""
    ncpu = len(cpus)
    busy = sum(
        sum(after.cpu[c][i] - before.cpu[c][i] for i in (0, 1, 2, 5, 6))
        for c in cpus
        if c in after.cpu and c in before.cpu
    )
    vmm_ns = sum(t.cpu_ns - before.vmm.get(tid, _BORN).cpu_ns for tid, t in after.vmm.items())
    other_s = max(0.0, busy * TICK_S - vmm_ns / 1e9)
    share = other_s / (seconds * max(1, ncpu)) if seconds > 0 else 0.0
    attributed = sum(attribution.ticks.values())
    top = [
        {"name": name, "cpu_s": round(n * TICK_S, 3), "share": round(_share(n, seconds, ncpu), 4)}
        for name, n in attribution.ticks.most_common(TOP)
    ]
    return _check(
        share > limits.other_share if before.cpu else None,
        cpu_s=round(other_s, 3),
        share=round(share, 4),
        threshold=limits.other_share,
        tasks=len(attribution.tids),
        attributed_cpu_s=round(attributed * TICK_S, 3),
        top=top,
    )


def _frequency(
    before: Snapshot,
    after: Snapshot,
    cpus: Sequence[int],
    freq_samples: Sequence[dict[int, int]],
    limits: Thresholds,
) -> dict[str, Any]:
    samples: list[dict[int, int]] = [*freq_samples, before.freq_khz, after.freq_khz]
    freqs: list[int] = [khz for sample in samples for c, khz in sample.items() if c in cpus]
    throttled = sum(after.throttle.get(c, 0) - before.throttle.get(c, 0) for c in cpus)
    if not (freqs or after.throttle):
        return _check(None, why="no cpufreq or thermal_throttle in /sys")
    lo, hi = (min(freqs), max(freqs)) if freqs else (0, 0)
    spread = (hi - lo) / hi if hi else 0.0
    return _check(
        spread > limits.freq_spread or throttled > 0,
        min_khz=lo or None,
        max_khz=hi or None,
        spread=round(spread, 4),
        threshold=limits.freq_spread,
        throttle_events=throttled if after.throttle else None,
    )


def _steal(
    before: Snapshot, after: Snapshot, cpus: Sequence[int], seconds: float, limits: Thresholds
) -> dict[str, Any]:
    steal = sum(after.cpu[c][7] - before.cpu[c][7] for c in cpus if c in after.cpu and c in before.cpu)
    steal_share = _share(steal, seconds, len(cpus))
    return _check(
        steal_share > limits.steal_share if before.cpu else None,
        cpu_s=round(steal * TICK_S, 3),
        share=round(steal_share, 4),
        threshold=limits.steal_share,
    )


def _major_faults(before: Snapshot, after: Snapshot, limits: Thresholds) -> dict[str, Any]:
    if before.vmm_major_faults is None or after.vmm_major_faults is None:
        return _check(None, why="the VMM's /proc entry was not readable")
    faults = after.vmm_major_faults - before.vmm_major_faults
    return _check(faults > limits.vmm_major_faults, count=faults, threshold=limits.vmm_major_faults)


def _pressure(before: Snapshot, after: Snapshot, seconds: float, limits: Thresholds) -> dict[str, Any]:
    pressure: dict[str, Any] = {}
    for kind, limit in (("cpu", None), ("memory", limits.memory_pressure), ("io", limits.io_pressure)):
        if kind not in after.pressure or kind not in before.pressure:
            pressure[kind] = _check(None, why=f"no /proc/pressure/{kind}")
            continue
        stalled = (after.pressure[kind] - before.pressure[kind]) / 1e6 / seconds if seconds > 0 else 0.0
        if limit is None:
            pressure[kind] = {"verdict": "info", "share": round(stalled, 4), "why": "host-wide"}
        else:
            pressure[kind] = _check(stalled > limit, share=round(stalled, 4), threshold=limit)
    return pressure


def _vcpu_preemptions(
    before: Snapshot, after: Snapshot, seconds: float, limits: Thresholds, *, vcpu_alone: bool
) -> dict[str, Any]:
    vcpus, named = vcpu_threads(before.vmm, after.vmm)
    if not vcpus:
        return _check(None, why="no vCPU threads found in the VMM")
    switches = {name: t.involuntary - before.vmm.get(tid, _BORN).involuntary for tid, name, t in vcpus}
    worst = max(switches.values()) / seconds if seconds > 0 else 0.0
    return _check(
        worst > limits.vcpu_preempt_per_s,
        **({} if vcpu_alone else {"why": "the VMM's own threads share the vCPU's CPU"}),
        per_vcpu=switches,
        max_per_s=round(worst, 1),
        threshold=limits.vcpu_preempt_per_s,
        **({} if named else {"note": "VMM threads are unnamed: the busiest one is taken as the vCPU"}),
    )


def vcpu_threads(
    before: dict[int, ThreadSample], after: dict[int, ThreadSample]
) -> tuple[list[tuple[int, str, ThreadSample]], bool]:
    """The vCPU threads by name ("CPU 0/TCG", "fc_vcpu 0"), and whether they were named. A QEMU run
    without ``-name debug-threads=on`` leaves every thread named after the binary: then the thread that
    used the most CPU in the window stands for the vCPU (a guest command keeps its vCPU busiest)."""
    named = [(tid, t.comm, t) for tid, t in after.items() if _VCPU.match(t.comm)]
    if named or not after:
        return named, True
    born = ThreadSample("", 0, 0)
    tid = max(after, key=lambda k: after[k].cpu_ns - before.get(k, born).cpu_ns)
    return [(tid, f"{after[tid].comm} (tid {tid})", after[tid])], False


def _reasons(checks: dict[str, dict[str, Any]], cpus: Sequence[int]) -> list[str]:
    where = f"CPU {format_cpu_list(cpus)}"
    out: list[str] = []
    other = checks["other_tasks"]
    if other["verdict"] == "disturbed":
        names = ", ".join(f"{t['name']} {t['share']:.0%}" for t in other["top"])
        out.append(f"other tasks took {other['share']:.1%} of {where}" + (f" ({names})" if names else ""))
    for key, what in (("irqs", "interrupts"), ("softirqs", "softirqs")):
        check = checks[key]
        if check["verdict"] == "disturbed":
            names = ", ".join(t["name"] for t in check["top"])
            out.append(f"{check['per_cpu_per_s']:.0f} {what}/s per CPU on {where} ({names})")
    freq = checks["frequency"]
    if freq["verdict"] == "disturbed":
        throttled = freq.get("throttle_events") or 0
        out.append(
            f"{where} clock varied {freq['spread']:.0%}"
            + (f", {throttled} thermal throttle events" if throttled else "")
        )
    if checks["steal"]["verdict"] == "disturbed":
        out.append(f"the hypervisor stole {checks['steal']['share']:.1%} of {where}")
    if checks["vmm_major_faults"]["verdict"] == "disturbed":
        out.append(f"the VMM took {checks['vmm_major_faults']['count']} major page faults")
    for kind, check in checks["pressure"].items():
        if check["verdict"] == "disturbed":
            out.append(f"{kind} pressure stalled tasks {check['share']:.1%} of the time")
    vcpu = checks["vcpu_preemptions"]
    if vcpu["verdict"] == "disturbed":
        out.append(f"a vCPU thread was preempted {vcpu['max_per_s']:.0f} times/s")
    return out


def verdict_line(reports: Sequence[dict[str, Any] | None]) -> str | None:
    """One line for a job: clean, or which iterations were disturbed and why (the first reasons)."""
    taken = [(i, r) for i, r in enumerate(reports, start=1) if r is not None]
    if not taken:
        return None
    disturbed = [(i, r) for i, r in taken if r["verdict"] == "disturbed"]
    cpus = taken[0][1].get("cpus", "?")
    if not disturbed:
        return f"interference: clean on CPU {cpus} ({len(taken)} iteration(s))"
    parts = [f"iteration {i}: {'; '.join(r['reasons'][:2])}" for i, r in disturbed[:3]]
    return f"interference: disturbed in {len(disturbed)}/{len(taken)} iteration(s): " + " | ".join(parts)
