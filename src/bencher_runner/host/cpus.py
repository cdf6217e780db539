"""CPU layout: which cores do housekeeping and which run the benchmark, and pinning threads to them.

Benchmarks are quieter when the host's own work (runner, IRQs, kernel workqueues) stays on a few
housekeeping cores and the VM's vCPUs own the rest. The layout is read after tuning (SMT off can leave
non-contiguous IDs such as "0,2,4-6"). Parsing and formatting are pure; only `online_cpus` and the
pinning helpers touch /sys and /proc.
"""

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SYS = Path("/sys")
PROC = Path("/proc")
# QEMU names its vCPU threads "CPU 0/KVM" (or "CPU 0/TCG").
_QEMU_VCPU = re.compile(r"^CPU (\d+)/")


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11): sorted, de-duplicated. ValueError when malformed."""
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        part = part.strip()
        first, sep, last = part.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"bad CPU list {text!r}: {part!r} is not N or N-M")
        lo, hi = int(first), int(last) if sep else int(first)
        if hi < lo:
            raise ValueError(f"bad CPU list {text!r}: range {part!r} runs backwards")
        cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 3, 8, 10, 11) -> '0-3,8,10-11' (the kernel's cpuset/list format)."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def format_cpumask(cpus: Iterable[int]) -> str:
    """Hex mask as the kernel prints it: 32-bit words, most significant first, comma-separated, words
    after the first zero-padded to 8 digits. (32,) -> '1,00000000'; () -> '0'."""
    mask = 0
    for cpu in cpus:
        if cpu < 0:
            raise ValueError(f"negative CPU id {cpu}")
        mask |= 1 << cpu
    words: list[int] = []
    while True:
        words.append(mask & 0xFFFFFFFF)
        mask >>= 32
        if not mask:
            break
    words.reverse()
    return ",".join([f"{words[0]:x}", *(f"{w:08x}" for w in words[1:])])


def parse_cpumask(text: str) -> tuple[int, ...]:
    """The inverse of `format_cpumask`."""
    value = int(text.strip().replace(",", "") or "0", 16)
    return tuple(i for i in range(value.bit_length()) if value >> i & 1)


@dataclass(frozen=True)
class CpuLayout:
    housekeeping: tuple[int, ...]
    benchmark: tuple[int, ...]

    @property
    def has_isolation(self) -> bool:
        return bool(self.housekeeping and self.benchmark) and not set(self.housekeeping) & set(self.benchmark)

    @property
    def note(self) -> str:
        if self.has_isolation:
            return (
                f"housekeeping CPUs {format_cpu_list(self.housekeeping)}, "
                f"benchmark CPUs {format_cpu_list(self.benchmark)}"
            )
        return (
            f"only CPU {format_cpu_list(self.benchmark)} is online: the benchmark shares it with the "
            "host's own work (no isolation)"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "housekeeping": format_cpu_list(self.housekeeping),
            "benchmark": format_cpu_list(self.benchmark),
            "isolated": self.has_isolation,
        }


def partition(cpus: Iterable[int]) -> CpuLayout:
    """Housekeeping = the lowest CPU (the two lowest with 8+ CPUs); benchmark = the rest.
    With a single CPU both sets are that CPU (shared, no isolation)."""
    ids = tuple(sorted(set(cpus)))
    if not ids:
        raise ValueError("no online CPUs")
    if len(ids) == 1:
        return CpuLayout(housekeeping=ids, benchmark=ids)
    n = 2 if len(ids) >= 8 else 1
    return CpuLayout(housekeeping=ids[:n], benchmark=ids[n:])


def online_cpus(sys_root: Path = SYS) -> tuple[int, ...]:
    """Online CPU IDs from /sys/devices/system/cpu/online; falls back to this process's affinity."""
    try:
        cpus = parse_cpu_list((sys_root / "devices/system/cpu/online").read_text())
        if cpus:
            return cpus
    except (OSError, ValueError):
        pass
    return tuple(sorted(os.sched_getaffinity(0)))


def thread_ids(pid: int, proc_root: Path = PROC) -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir(proc_root / str(pid) / "task") if name.isdigit())
    except OSError:
        return []


def pin_process(pid: int, cpus: Sequence[int], proc_root: Path = PROC) -> list[str]:
    """Pin every thread of ``pid`` to ``cpus`` (best-effort). Returns one problem line per failure;
    threads that exit meanwhile are ignored."""
    problems: list[str] = []
    target = set(cpus)
    tids = thread_ids(pid, proc_root)
    if not tids:
        return [f"cannot list the threads of process {pid}"]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, target)
        except ProcessLookupError:
            continue
        except OSError as err:
            problems.append(f"cannot pin thread {tid} to CPUs {format_cpu_list(target)}: {err.strerror}")
    return problems


def vcpu_assignment(comms: dict[int, str], benchmark: Sequence[int]) -> dict[int, int]:
    """Pure: QEMU thread id -> CPU. vCPU N gets benchmark[N mod len]; every other thread gets the last
    benchmark core."""
    if not benchmark:
        raise ValueError("no benchmark CPUs")
    out: dict[int, int] = {}
    for tid, comm in comms.items():
        match = _QEMU_VCPU.match(comm)
        out[tid] = benchmark[int(match.group(1)) % len(benchmark)] if match else benchmark[-1]
    return out


def pin_qemu_threads(pid: int, benchmark: Sequence[int], proc_root: Path = PROC) -> list[str]:
    """Pin each QEMU vCPU thread to its own benchmark core and QEMU's other threads to the last one.
    Call once the vCPU threads exist (after QEMU started the guest). Returns problem lines."""
    comms: dict[int, str] = {}
    for tid in thread_ids(pid, proc_root):
        try:
            comms[tid] = (proc_root / str(pid) / "task" / str(tid) / "comm").read_text().strip()
        except OSError:
            continue
    if not comms:
        return [f"cannot list the threads of QEMU process {pid}"]
    problems: list[str] = []
    for tid, cpu in vcpu_assignment(comms, benchmark).items():
        try:
            os.sched_setaffinity(tid, {cpu})
        except ProcessLookupError:
            continue
        except OSError as err:
            problems.append(f"cannot pin QEMU thread {tid} ({comms[tid]}) to CPU {cpu}: {err.strerror}")
    return problems
