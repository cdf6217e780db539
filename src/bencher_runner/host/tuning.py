"""Host tuning for the duration of one job: knobs that make timings less noisy, always put back.

Each knob (ASLR, NMI watchdog, swappiness, governor, SMT, turbo, THP, ... and deep C-states held off
through /dev/cpu_dma_latency) is read, changed before the job and restored after it in reverse order.
Crash safety: the original values go to a JSON state file (fsynced) *before* the first change, so a
runner killed mid-job leaves a record that `restore_leftover_tuning` (called at run/daemon start, and
by `tuned_host` itself) puts back; otherwise the next run would record tuned values as "original".
One host-wide flock keeps two runners from tuning (and restoring) over each other. A knob that is
missing or cannot be written is skipped with one line; tuning never fails a job.

`TuningPlan.from_options` is pure; everything touching files takes a `HostPaths` so tests can point
it at a fake tree.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from bencher_runner.atomicfile import write_atomic
from bencher_runner.host.cpus import (
    format_cpu_list,
    format_cpumask,
    online_cpus,
    parse_cpu_list,
    parse_cpumask,
)
from bencher_runner.host.cpus import partition as cpu_partition

Log = Callable[[str], None]
ThpMode = Literal["never", "madvise", "always", "leave"]
THP_MODES: tuple[ThpMode, ...] = ("never", "madvise", "always", "leave")

STATE_DIR = Path("/run/bencher-runner")
STATE_FILE = "tuning-state.json"
LOCK_FILE = "tuning.lock"

SWAPPINESS_RANGE = (0, 200)
PERF_EVENT_PARANOID_RANGE = (-1, 4)


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass(frozen=True)
class HostPaths:
    """Roots of procfs, sysfs and /dev (a fake tree in tests)."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    dev: Path = Path("/dev")


@dataclass(frozen=True)
class TuningOptions:
    """What the tuning flags asked for. ``keep_*`` = leave that feature as the host has it."""

    enabled: bool = True
    keep_aslr: bool = False
    keep_nmi_watchdog: bool = False
    keep_smt: bool = False
    keep_turbo: bool = False
    keep_numa_balancing: bool = False
    keep_timer_migration: bool = False
    keep_soft_watchdog: bool = False
    keep_ksm: bool = False
    keep_cstates: bool = False
    irq_steering: bool = True
    swappiness: int = 10
    governor: str = "performance"
    perf_event_paranoid: int = -1
    thp: ThpMode = "never"

    def __post_init__(self) -> None:
        lo, hi = SWAPPINESS_RANGE
        if not lo <= self.swappiness <= hi:
            raise ValueError(f"swappiness {self.swappiness} is outside {lo}..{hi}")
        lo, hi = PERF_EVENT_PARANOID_RANGE
        if not lo <= self.perf_event_paranoid <= hi:
            raise ValueError(f"perf_event_paranoid {self.perf_event_paranoid} is outside {lo}..{hi}")
        if self.thp not in THP_MODES:
            raise ValueError(f"thp {self.thp!r} is not one of {', '.join(THP_MODES)}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.governor):
            raise ValueError(f"governor {self.governor!r} is not a governor name")


# Knob -> (root, path under it) for the knobs that are one plain file.
_FILES: dict[str, tuple[Literal["proc", "sys"], str]] = {
    "aslr": ("proc", "sys/kernel/randomize_va_space"),
    "nmi_watchdog": ("proc", "sys/kernel/nmi_watchdog"),
    "swappiness": ("proc", "sys/vm/swappiness"),
    "perf_event_paranoid": ("proc", "sys/kernel/perf_event_paranoid"),
    "smt": ("sys", "devices/system/cpu/smt/control"),
    "numa_balancing": ("proc", "sys/kernel/numa_balancing"),
    "timer_migration": ("proc", "sys/kernel/timer_migration"),
    "soft_watchdog": ("proc", "sys/kernel/soft_watchdog"),
    "ksm": ("sys", "kernel/mm/ksm/run"),
    "thp_enabled": ("sys", "kernel/mm/transparent_hugepage/enabled"),
    "thp_defrag": ("sys", "kernel/mm/transparent_hugepage/defrag"),
}
# Application order; irq_steering runs last, after SMT changed the set of online CPUs.
KNOB_ORDER = (
    "aslr", "nmi_watchdog", "swappiness", "perf_event_paranoid", "governor", "smt", "turbo",
    "numa_balancing", "timer_migration", "soft_watchdog", "ksm", "thp_enabled", "thp_defrag",
    "cstates", "irq_steering",
)  # fmt: skip
_CPU_SCOPED = frozenset({"irq_steering"})
_SMT_UNCHANGEABLE = frozenset({"off", "forceoff", "notsupported", "notimplemented"})


@dataclass(frozen=True)
class TuningPlan:
    """Ordered knob -> target value. Empty with --no-tuning."""

    targets: tuple[tuple[str, str], ...]

    @classmethod
    def from_options(cls, options: TuningOptions) -> "TuningPlan":
        if not options.enabled:
            return cls(())
        wanted: dict[str, str | None] = {
            "aslr": None if options.keep_aslr else "0",
            "nmi_watchdog": None if options.keep_nmi_watchdog else "0",
            "swappiness": str(options.swappiness),
            "perf_event_paranoid": str(options.perf_event_paranoid),
            "governor": options.governor,
            "smt": None if options.keep_smt else "off",
            "turbo": None if options.keep_turbo else "off",
            "numa_balancing": None if options.keep_numa_balancing else "0",
            "timer_migration": None if options.keep_timer_migration else "0",
            "soft_watchdog": None if options.keep_soft_watchdog else "0",
            "ksm": None if options.keep_ksm else "0",
            "thp_enabled": None if options.thp == "leave" else options.thp,
            "thp_defrag": None if options.thp == "leave" else options.thp,
            "cstates": None if options.keep_cstates else "0",
            "irq_steering": "housekeeping" if options.irq_steering else None,
        }
        return cls(tuple((k, v) for k in KNOB_ORDER if (v := wanted[k]) is not None))

    def as_dict(self) -> dict[str, str]:
        return dict(self.targets)


@dataclass(frozen=True)
class KnobChange:
    knob: str
    path: str
    before: str
    after: str


@dataclass(frozen=True)
class KnobSkip:
    knob: str
    reason: str


@dataclass
class TuningReport:
    """What tuning did for one job; `to_dict` goes into the result metadata."""

    status: Literal["tuned", "disabled", "untuned"] = "tuned"
    note: str | None = None
    changed: list[KnobChange] = field(default_factory=list)
    skipped: list[KnobSkip] = field(default_factory=list)
    restore_problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ---- reading and resolving knobs -------------------------------------------------------------------


def _read(path: Path) -> str:
    return path.read_text(errors="replace").strip()


def _bracketed(text: str) -> str:
    """'always [madvise] never' -> 'madvise' (THP files mark the active mode with brackets)."""
    match = re.search(r"\[([^\]]+)\]", text)
    return match.group(1) if match else text


def _write(path: Path, value: str) -> None:
    # No O_CREAT: a missing knob must never be created; O_TRUNC matters only for fake trees.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Pending:
    knob: str
    path: Path
    before: str
    after: str


_Resolved = list[_Pending] | KnobSkip


def _resolve_file(knob: str, path: Path, target: str) -> _Resolved:
    if not path.exists():
        return KnobSkip(knob, f"{path} does not exist")
    try:
        current = _read(path)
    except OSError as err:
        return KnobSkip(knob, f"cannot read {path}: {err.strerror}")
    if knob.startswith("thp_"):
        current = _bracketed(current)
    if knob == "smt" and current in _SMT_UNCHANGEABLE:
        return KnobSkip(knob, f"SMT control is {current!r} ({path})")
    if current == target:
        return KnobSkip(knob, f"already {target}")
    return [_Pending(knob, path, current, target)]


def _resolve_governor(paths: HostPaths, target: str) -> _Resolved:
    files = sorted(
        paths.sys.glob("devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor"),
        key=lambda p: int(p.parent.parent.name[3:]),
    )
    if not files:
        return KnobSkip("governor", "no CPU has cpufreq (no scaling_governor files): nothing to set")
    available = files[0].parent / "scaling_available_governors"
    with contextlib.suppress(OSError):
        names = _read(available).split()
        if names and target not in names:
            return KnobSkip("governor", f"governor {target!r} is not available (have: {', '.join(names)})")
    pending: list[_Pending] = []
    for path in files:
        try:
            current = _read(path)
        except OSError as err:
            return KnobSkip("governor", f"cannot read {path}: {err.strerror}")
        if current != target:
            pending.append(_Pending("governor", path, current, target))
    return pending or KnobSkip("governor", f"already {target} on every CPU")


def _resolve_turbo(paths: HostPaths) -> _Resolved:
    no_turbo = paths.sys / "devices/system/cpu/intel_pstate/no_turbo"
    if no_turbo.exists():
        return _resolve_file("turbo", no_turbo, "1")
    boost = paths.sys / "devices/system/cpu/cpufreq/boost"
    if boost.exists():
        return _resolve_file("turbo", boost, "0")
    return KnobSkip("turbo", f"neither {no_turbo} nor {boost} exists")


def _resolve_irq_steering(paths: HostPaths) -> _Resolved:
    layout = cpu_partition(online_cpus(paths.sys))
    if not layout.has_isolation:
        return KnobSkip("irq_steering", "a single online CPU: nothing to steer IRQs away from")
    mask, cpulist = format_cpumask(layout.housekeeping), format_cpu_list(layout.housekeeping)
    pending: list[_Pending] = []
    for path, target, parse in (
        (paths.proc / "irq/default_smp_affinity", mask, parse_cpumask),
        (paths.sys / "devices/virtual/workqueue/cpumask", mask, parse_cpumask),
    ):
        with contextlib.suppress(OSError, ValueError):
            current = _read(path)
            if parse(current) != layout.housekeeping:
                pending.append(_Pending("irq_steering", path, current, target))
    for path in sorted(paths.proc.glob("irq/[0-9]*/smp_affinity_list"), key=lambda p: int(p.parent.name)):
        with contextlib.suppress(OSError, ValueError):
            current = _read(path)
            if parse_cpu_list(current) != layout.housekeeping:
                pending.append(_Pending("irq_steering", path, current, cpulist))
    if pending:
        return pending
    return KnobSkip("irq_steering", f"IRQs and workqueues already on CPU {cpulist} (or none are movable)")


def _resolve(knob: str, target: str, paths: HostPaths) -> _Resolved:
    if knob in _FILES:
        root, rel = _FILES[knob]
        return _resolve_file(knob, (paths.proc if root == "proc" else paths.sys) / rel, target)
    if knob == "governor":
        return _resolve_governor(paths, target)
    if knob == "turbo":
        return _resolve_turbo(paths)
    if knob == "irq_steering":
        return _resolve_irq_steering(paths)
    raise ValueError(f"unknown knob {knob!r}")


def _dma_latency_now(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(4)
    return str(struct.unpack("=i", data)[0]) if len(data) == 4 else "?"


def preview(plan: TuningPlan, paths: HostPaths = HostPaths()) -> list[tuple[str, str, str]]:
    """Read-only: (knob, current value, what the runner would do) for each planned knob (for doctor)."""
    rows: list[tuple[str, str, str]] = []
    for knob, target in plan.targets:
        if knob == "cstates":
            dma = paths.dev / "cpu_dma_latency"
            try:
                rows.append((knob, f"latency limit {_dma_latency_now(dma)} us", f"hold {dma} at 0"))
            except OSError as err:
                rows.append((knob, "unknown", f"skip: cannot open {dma}: {err.strerror}"))
            continue
        resolved = _resolve(knob, target, paths)
        if isinstance(resolved, KnobSkip):
            current = "-"
            if knob in _FILES:
                root, rel = _FILES[knob]
                with contextlib.suppress(OSError):
                    current = _read((paths.proc if root == "proc" else paths.sys) / rel)
                    current = _bracketed(current) if knob.startswith("thp_") else current
            rows.append((knob, current, f"skip: {resolved.reason}"))
        elif knob == "irq_steering":
            rows.append(
                (
                    knob,
                    f"{len(resolved)} masks not on housekeeping CPUs",
                    f"steer to CPU {resolved[-1].after}",
                )
            )
        else:
            befores = sorted({p.before for p in resolved})
            shown = ", ".join(befores[:3]) + (", ..." if len(befores) > 3 else "")
            where = f" ({len(resolved)} files)" if len(resolved) > 1 else ""
            rows.append((knob, shown, f"set {resolved[0].after}{where}"))
    return rows


# ---- state file, lock, restore -----------------------------------------------------------------------


def _save_state(state_dir: Path, entries: list[_Pending]) -> None:
    """Atomically replace the state file with ``entries`` and fsync it (and its directory)."""
    doc = {
        "version": 1,
        "pid": os.getpid(),
        "entries": [
            {"knob": e.knob, "path": str(e.path), "before": e.before, "after": e.after} for e in entries
        ],
    }
    write_atomic(state_dir / STATE_FILE, json.dumps(doc, indent=1))


def _restore(entries: list[_Pending], log: Log) -> list[str]:
    """Write back each original value, last change first. Returns one line per failure."""
    problems: list[str] = []
    for entry in reversed(entries):
        try:
            _write(entry.path, entry.before)
        except OSError as err:
            problems.append(
                f"tuning: cannot restore {entry.knob} ({entry.path} <- {entry.before!r}): {err.strerror}"
            )
    for line in problems:
        log(line)
    return problems


def _restore_leftover(state_dir: Path, log: Log) -> list[KnobChange]:
    state = state_dir / STATE_FILE
    try:
        doc = json.loads(state.read_text())
        entries = [_Pending(e["knob"], Path(e["path"]), e["before"], e["after"]) for e in doc["entries"]]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except (OSError, ValueError, KeyError, TypeError) as err:
        log(f"tuning: ignoring unreadable leftover state file {state} ({err.__class__.__name__})")
        with contextlib.suppress(OSError):
            state.unlink()
        return []
    if entries:
        log(
            f"tuning: a previous runner (pid {doc.get('pid')}) ended without restoring host tuning; "
            f"restoring {len(entries)} value(s) from {state}"
        )
    _restore(entries, log)
    state.unlink(missing_ok=True)
    return [KnobChange(e.knob, str(e.path), e.after, e.before) for e in entries]


@contextlib.contextmanager
def _host_lock(state_dir: Path) -> Iterator[Literal["held", "busy", "unavailable"]]:
    """Non-blocking exclusive flock on state_dir/tuning.lock, held until the context exits."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        yield "unavailable"
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield "busy"
                return
            yield "unavailable"
            return
        yield "held"
    finally:
        os.close(fd)


def restore_leftover_tuning(state_dir: Path = STATE_DIR, *, log: Log = _stderr_log) -> list[KnobChange]:
    """Put back tuning left applied by a runner that died mid-job. Call at run/daemon start.
    Does nothing while another live runner holds the tuning lock (its tuning is not leftover)."""
    if not (state_dir / STATE_FILE).exists():
        return []
    with _host_lock(state_dir) as lock:
        if lock == "busy":
            log("tuning: another runner holds the tuning lock; leaving its host tuning alone")
            return []
        return _restore_leftover(state_dir, log)


# ---- applying -------------------------------------------------------------------------------------------


class _Applier:
    def __init__(self, state_dir: Path, paths: HostPaths, log: Log, report: TuningReport) -> None:
        self.state_dir = state_dir
        self.paths = paths
        self.log = log
        self.report = report
        self.applied: list[_Pending] = []
        self.dma_fd: int | None = None

    def stage(self, targets: list[tuple[str, str]]) -> None:
        pending: list[_Pending] = []
        for knob, target in targets:
            if knob == "cstates":
                continue
            resolved = _resolve(knob, target, self.paths)
            if isinstance(resolved, KnobSkip):
                self._skip(resolved)
            else:
                pending.extend(resolved)
        if not pending:
            return
        try:
            _save_state(self.state_dir, self.applied + pending)  # the originals are on disk before any change
        except OSError as err:
            for knob in dict.fromkeys(e.knob for e in pending):
                self._skip(
                    KnobSkip(knob, f"cannot record its original value in {self.state_dir}: {err.strerror}")
                )
            return
        failures: dict[str, list[str]] = {}
        for entry in pending:
            try:
                _write(entry.path, entry.after)
            except OSError as err:
                failures.setdefault(entry.knob, []).append(
                    f"cannot write {entry.after!r} to {entry.path}: {err.strerror}"
                )
                continue
            self.applied.append(entry)
            self.report.changed.append(KnobChange(entry.knob, str(entry.path), entry.before, entry.after))
        with contextlib.suppress(OSError):  # the file on disk is a superset: restoring it is still right
            _save_state(self.state_dir, self.applied)
        for knob, reasons in failures.items():
            done = sum(1 for e in pending if e.knob == knob) - len(reasons)
            if knob == "irq_steering":
                self.log(
                    f"tuning: irq_steering: moved {done} IRQ/workqueue masks, {len(reasons)} not movable"
                )
                if not done:
                    self.report.skipped.append(KnobSkip(knob, f"no IRQ could be moved ({reasons[0]})"))
            elif not done:
                self._skip(KnobSkip(knob, reasons[0]))
            else:
                self.log(
                    f"tuning: {knob}: {len(reasons)} of {done + len(reasons)} files failed ({reasons[0]})"
                )

    def hold_cstates(self) -> None:
        path = self.paths.dev / "cpu_dma_latency"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            self._skip(KnobSkip("cstates", f"cannot open {path}: {err.strerror}"))
            return
        try:
            data = os.read(fd, 4)
            before = str(struct.unpack("=i", data)[0]) if len(data) == 4 else "?"
            os.write(fd, struct.pack("=i", 0))
        except OSError as err:
            os.close(fd)
            self._skip(KnobSkip("cstates", f"cannot write 0 to {path}: {err.strerror}"))
            return
        self.dma_fd = fd  # the kernel drops the request when this fd closes (also when we die)
        self.report.changed.append(KnobChange("cstates", str(path), before, "0"))

    def _skip(self, skip: KnobSkip) -> None:
        self.report.skipped.append(skip)
        self.log(f"tuning: skipping {skip.knob}: {skip.reason}")

    def restore(self) -> None:
        self.report.restore_problems.extend(_restore(self.applied, self.log))
        if self.dma_fd is not None:
            os.close(self.dma_fd)
            self.dma_fd = None
        with contextlib.suppress(OSError):
            (self.state_dir / STATE_FILE).unlink()


@contextlib.contextmanager
def tuned_host(
    options: TuningOptions,
    *,
    state_dir: Path = STATE_DIR,
    log: Log = _stderr_log,
    paths: HostPaths = HostPaths(),
) -> Iterator[TuningReport]:
    """Tune the host for one job; everything changed is restored (reverse order) when the block exits."""
    report = TuningReport()
    plan = TuningPlan.from_options(options)
    if not plan.targets:
        report.status, report.note = "disabled", "host tuning off (--no-tuning)"
        yield report
        return
    with _host_lock(state_dir) as lock:
        if lock == "busy":
            report.status = "untuned"
            report.note = f"another runner holds {state_dir / LOCK_FILE}: this job runs without host tuning"
            log(f"tuning: {report.note}")
            yield report
            return
        _restore_leftover(state_dir, log)
        try:
            _save_state(state_dir, [])
        except OSError as err:
            report.status = "untuned"
            report.note = (
                f"cannot write the tuning state file in {state_dir} ({err.strerror}): no host tuning"
            )
            log(f"tuning: {report.note}")
            yield report
            return
        applier = _Applier(state_dir, paths, log, report)
        try:
            targets = list(plan.targets)
            applier.stage([t for t in targets if t[0] not in _CPU_SCOPED])
            if any(k == "cstates" for k, _ in targets):
                applier.hold_cstates()
            applier.stage([t for t in targets if t[0] in _CPU_SCOPED])
            if report.changed:
                log(f"tuning: changed {', '.join(dict.fromkeys(c.knob for c in report.changed))}")
            yield report
        finally:
            applier.restore()
