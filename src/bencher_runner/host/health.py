"""Host health before each `ready`: what pauses claiming, what is failing, and upstream's JSON shapes.

The daemon runs `probe_health` (in a thread) before each `ready`; `runner doctor` shows the same
findings. The probe only reads files under ``root`` (a fake `/sys` and `/dev` tree in tests) plus two
injectable readers (the NVMe health log ioctl, the kernel's clock state), and is cheap: sysfs reads,
one SMART ioctl per controller at most hourly (`HealthCache` keeps the last reading).

Policy, one finding per device (state ok / warning / failing; `text` is one line: what, where, what
to do):
- md array with a sync in progress (resync, recover, check, repair, reshape): warning, and it PAUSES
  claiming: the sync's background I/O and CPU time would be measured as the benchmark's. A degraded
  array (or array_state "broken") is failing and does not pause on its own: it is a lasting state
  that only a disk replacement ends, and a silent pause would take the host out of the fleet; it is
  logged as an error and shown by doctor. A degraded array that rebuilds is both (failing, paused).
- NVMe: critical warning bits (spare, reliability, read-only media, backup), spare below threshold
  and media errors are failing; the temperature bit (the drive's own thresholds) and rated endurance
  used up are warnings. None pause: a failing disk is logged and shown, as the issue asks.
- CPU thermal throttle counters that rose since the previous probe: warning, and it PAUSES claiming
  (the CPU is being slowed down now, so a job would measure throttling); it resumes at the first
  probe that sees no rise. Upstream's `paused` has no reason kind for it, so `pause_reasons` omits it.
- Clock not synchronised: warning only. Durations come from the guest's monotonic clock and are not
  affected; timestamps and token expiry are, which the text says, and a host without NTP should not
  be taken out of the fleet for it.
"""

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bencher_runner.host.cpus import format_cpu_list
from bencher_runner.host.health_clock import ClockReader, clock_synchronised
from bencher_runner.host.health_cpu import ThrottleCounts, read_throttle_counts, rises
from bencher_runner.host.health_md import READ_ONLY_STATES, SYNC_ACTIONS, MdArray, read_arrays
from bencher_runner.host.health_nvme import (
    TEMPERATURE_BIT,
    NvmeController,
    SmartLog,
    SmartLogError,
    SmartReader,
    list_controllers,
    read_smart_log_ioctl,
)

Severity = Literal["ok", "warning", "failing"]
Kind = Literal["raid", "nvme", "thermal", "clock"]
_RANK: dict[Severity, int] = {"ok": 0, "warning": 1, "failing": 2}

NVME_READ_INTERVAL_S = 3600.0  # the SMART log is read at most this often per controller
MAX_ITEMS = 64  # upstream caps: items per list in `health`
MAX_STRING_BYTES = 64  # and bytes per string
MAX_REASONS = 16  # upstream reads at most 16 pause reasons
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
STOPPABLE = frozenset({"check", "repair"})  # sync actions an operator may stop at will


@dataclass(frozen=True)
class Finding:
    device: str  # md0, nvme0, cpu, clock
    kind: Kind
    state: Severity
    detail: str  # what, where
    fix: str | None = None  # what to do
    pause: bool = False  # this finding pauses claiming

    @property
    def text(self) -> str:
        """The one line for a log: what, where, what to do."""
        return f"{self.detail}; {self.fix}" if self.fix else self.detail


@dataclass(frozen=True)
class NvmeReading:
    controller: NvmeController
    at: float  # when the log was read (the probe's ``now``)
    log: SmartLog | None = None
    error: str | None = None  # why the log could not be read


@dataclass
class HealthCache:
    """What one probe leaves for the next: NVMe readings (reused for an hour) and throttle counts."""

    nvme_interval_s: float = NVME_READ_INTERVAL_S
    nvme: dict[str, NvmeReading] = field(default_factory=dict)
    throttle: ThrottleCounts | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


@dataclass(frozen=True)
class HealthReport:
    findings: tuple[Finding, ...]  # every device checked, ok ones included
    arrays: tuple[MdArray, ...] = ()
    nvme: tuple[NvmeReading, ...] = ()

    @property
    def state(self) -> Severity:
        return max((f.state for f in self.findings), key=_RANK.__getitem__, default="ok")

    @property
    def problems(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.state != "ok")

    @property
    def pauses(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.pause)

    @property
    def paused(self) -> bool:
        return any(f.pause for f in self.findings)


def probe_health(
    root: Path = Path("/"),
    *,
    now: float,
    cache: HealthCache | None,
    read_smart: SmartReader = read_smart_log_ioctl,
    read_clock: ClockReader = clock_synchronised,
) -> HealthReport:
    """One probe of the host under ``root``. ``now`` is any seconds clock (the daemon's monotonic).

    Without a cache every NVMe log is read and throttling cannot be seen rising (no previous counts).
    ``read_clock`` asks the running kernel whatever ``root`` is: tests inject it. Readers fail with
    SmartLogError/OSError, which become findings; anything else is a bug and propagates.
    """
    cache = cache if cache is not None else HealthCache(nvme_interval_s=0.0)
    with cache.lock:
        sys = root / "sys"
        arrays = read_arrays(sys)
        readings = _nvme_readings(root, now, cache, read_smart)
        findings = [array_finding(a) for a in arrays]
        findings += [nvme_finding(r) for r in readings]
        counts = read_throttle_counts(sys)
        findings.append(thermal_finding(cache.throttle, counts))
        cache.throttle = counts
        findings.append(clock_finding(read_clock))
        return HealthReport(tuple(findings), arrays, readings)


def _nvme_readings(root: Path, now: float, cache: HealthCache, read: SmartReader) -> tuple[NvmeReading, ...]:
    readings: list[NvmeReading] = []
    for controller in list_controllers(root / "sys"):
        last = cache.nvme.get(controller.name)
        if last is None or last.controller != controller or not 0 <= now - last.at < cache.nvme_interval_s:
            try:
                last = NvmeReading(controller, now, log=SmartLog.parse(read(root / "dev" / controller.name)))
            except (SmartLogError, OSError) as err:
                last = NvmeReading(controller, now, error=str(err))
        readings.append(last)
    cache.nvme = {r.controller.name: r for r in readings}
    return tuple(readings)


def _worse(a: Severity, b: Severity) -> Severity:
    return a if _RANK[a] >= _RANK[b] else b


def array_finding(array: MdArray) -> Finding:
    name, what = array.name, f"{array.name} ({array.level or 'md'}, {array.array_state})"
    problems: list[str] = []
    fixes: list[str] = []
    state: Severity = "ok"
    if array.degraded:
        missing = f"{array.degraded} of {array.raid_disks}" if array.raid_disks else str(array.degraded)
        problems.append(f"is degraded ({missing} disks missing or failed)")
        fixes.append("replace the failed disk")
        state = "failing"
    if array.array_state == "broken":
        problems.append("is broken (more members failed than its level survives)")
        fixes.append("replace the failed disks and restore the array")
        state = "failing"
    elif array.array_state == "inactive":
        problems.append("is inactive (assembled but not started, e.g. too few disks)")
        state = _worse(state, "warning")
    if array.syncing:
        speed = f" at {array.speed} KiB/s" if array.speed is not None else ""
        problems.append(f"runs a {array.action}, {array.progress}{speed}: claiming is paused until it ends")
        if array.action in STOPPABLE:
            fixes.append(f"wait, or stop it: echo idle > /sys/block/{name}/md/sync_action")
        else:
            fixes.append("wait for it to end (cat /proc/mdstat)")
        state = _worse(state, "warning")
    elif array.action in SYNC_ACTIONS and array.array_state in READ_ONLY_STATES:
        problems.append(
            f"has a {array.action} pending that starts at its first write and will pause claiming"
        )
        state = _worse(state, "warning")
    if not problems:
        sync = "" if array.action == "idle" else f", sync {array.action}"
        return Finding(name, "raid", "ok", f"{what}: in sync{sync}")
    fixes.append(f"see mdadm --detail /dev/{name}")
    return Finding(name, "raid", state, f"{what} {'; '.join(problems)}", "; ".join(fixes), array.syncing)


def _nvme_what(reading: NvmeReading) -> str:
    c = reading.controller
    about = ", ".join(x for x in (c.model, f"serial {c.serial}" if c.serial else None) if x)
    return f"{c.name} ({about})" if about else c.name


def nvme_finding(reading: NvmeReading) -> Finding:
    name, what, log = reading.controller.name, _nvme_what(reading), reading.log
    if log is None:
        return Finding(name, "nvme", "warning", f"{what}: SMART log unreadable: {reading.error}")
    failing = [w for w in log.warnings if w != "temperature outside its thresholds"]
    if log.available_spare < log.available_spare_threshold:
        failing.append(
            f"available spare {log.available_spare}% below its threshold {log.available_spare_threshold}%"
        )
    if log.media_errors:
        failing.append(f"{log.media_errors} media and data integrity errors")
    warnings, fixes = [], []
    if log.critical_warning & TEMPERATURE_BIT:
        warnings.append(f"temperature {log.celsius} °C is outside its thresholds")
        fixes.append("check the drive's cooling")
    if log.percentage_used >= 100:
        warnings.append(f"rated endurance used up ({log.percentage_used}% used)")
        fixes.append("plan to replace the drive")
    if failing:
        fix = f"back up its data and replace the drive (nvme smart-log /dev/{name})"
        return Finding(name, "nvme", "failing", f"{what} is failing: {'; '.join(failing + warnings)}", fix)
    if warnings:
        return Finding(name, "nvme", "warning", f"{what}: {'; '.join(warnings)}", "; ".join(fixes))
    temperature = f"{log.celsius} °C, " if log.celsius is not None else ""
    return Finding(
        name,
        "nvme",
        "ok",
        f"{what}: healthy ({temperature}spare {log.available_spare}%, {log.percentage_used}% used, "
        "no media errors)",
    )


def thermal_finding(before: ThrottleCounts | None, after: ThrottleCounts) -> Finding:
    if not after:
        return Finding("cpu", "thermal", "ok", "no CPU thermal throttle counters on this host")
    if before is None:
        total = sum(after.values())
        return Finding("cpu", "thermal", "ok", f"CPU thermal throttle events since boot: {total}")
    rose = rises(before, after)
    if not rose:
        return Finding("cpu", "thermal", "ok", "no CPU thermal throttling since the last probe")
    cpus = format_cpu_list(tuple(sorted({cpu for cpu, _ in rose})))
    by_counter = ", ".join(
        f"{counter.split('_')[0]} +{sum(n for (_, c), n in rose.items() if c == counter)}"
        for counter in sorted({c for _, c in rose})
    )
    return Finding(
        "cpu",
        "thermal",
        "warning",
        f"CPUs {cpus} are thermally throttled ({by_counter} events since the last probe): claiming is "
        "paused until the counters stop rising",
        "check the host's cooling and power limits",
        pause=True,
    )


def clock_finding(read_clock: ClockReader) -> Finding:
    try:
        synced = read_clock()
    except OSError as err:
        return Finding("clock", "clock", "warning", f"cannot read the clock's sync state: {err}")
    if synced:
        return Finding("clock", "clock", "ok", "the system clock is synchronised")
    return Finding(
        "clock",
        "clock",
        "warning",
        "the system clock is not synchronised (adjtimex: STA_UNSYNC): result timestamps and registry "
        "token expiry checks may be off",
        "enable a time daemon (chrony, systemd-timesyncd)",
    )


def _cap(text: str) -> str:
    return text.encode()[:MAX_STRING_BYTES].decode(errors="ignore")


def _capped(items: Iterable[dict[str, object]]) -> list[dict[str, object]]:
    return [item for item, _ in zip(items, range(MAX_ITEMS), strict=False)]


def health_json(report: HealthReport) -> dict[str, object]:
    """Upstream's `health` object for `ready`/`paused` (only problems are listed as findings)."""
    doc: dict[str, object] = {"state": report.state}
    findings = _capped({"device": _cap(f.device), "kind": f.kind, "state": f.state} for f in report.problems)
    arrays = _capped(
        {
            "name": _cap(a.name),
            "array_state": _cap(a.array_state),
            "degraded": min(a.degraded, U32_MAX),
            "action": _cap(a.action),
        }
        for a in report.arrays
    )
    nvme = _capped(_nvme_json(r) for r in report.nvme)
    for key, items in (("findings", findings), ("arrays", arrays), ("nvme", nvme)):
        if items:
            doc[key] = items
    return doc


def _nvme_json(reading: NvmeReading) -> dict[str, object]:
    c = reading.controller
    doc: dict[str, object] = {"name": _cap(c.name)}
    if c.model:
        doc["model"] = _cap(c.model)
    if c.serial:
        doc["serial"] = _cap(c.serial)
    if (log := reading.log) is not None:
        doc["log"] = {
            "critical_warning": log.critical_warning,
            "temperature": log.temperature,
            "available_spare": log.available_spare,
            "available_spare_threshold": log.available_spare_threshold,
            "percentage_used": log.percentage_used,
            "media_errors": min(log.media_errors, U64_MAX),
        }
    return doc


def pause_reasons(report: HealthReport) -> list[dict[str, object]]:
    """Upstream's `paused.reasons` for this report: one `raid` reason per syncing array (at most 16).

    Thermal throttling pauses too (`report.paused`) but has no upstream kind: when it is the only
    reason, the daemon withholds `ready` without announcing a `paused`.
    """
    reasons: list[dict[str, object]] = []
    for array in report.arrays:
        if not array.syncing or len(reasons) == MAX_REASONS:
            continue
        reason: dict[str, object] = {"kind": "raid", "array": _cap(array.name), "action": _cap(array.action)}
        for key, value in (("done", array.done), ("total", array.total), ("speed", array.speed)):
            if value is not None:
                reason[key] = min(value, U64_MAX)
        reasons.append(reason)
    return reasons


def new_problems(previous: HealthReport | None, current: HealthReport) -> list[Finding]:
    """Problems in ``current`` that ``previous`` did not have (device, kind and state): log these once."""
    seen = {(f.device, f.kind, f.state) for f in previous.problems} if previous else set()
    return [f for f in current.problems if (f.device, f.kind, f.state) not in seen]
