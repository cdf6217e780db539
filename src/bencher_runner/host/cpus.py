"""CPU layout: which cores do housekeeping and which run the benchmark, and pinning threads to them.

Benchmarks are quieter when the host's own work (runner, IRQs, kernel workqueues) stays on a few
housekeeping cores and the VM's vCPUs own the rest. The layout is read after tuning (SMT off can leave
non-contiguous IDs such as "0,2,4-6"). Each VMM names its vCPU threads its own way, so the pinning
takes the backend's parser of a thread name (``qemu_vcpu_index``, ``firecracker_vcpu_index``).
Parsing and formatting are pure; only `online_cpus` and the pinning helpers touch /sys and /proc.
"""

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SYS = Path("/sys")
PROC = Path("/proc")
# QEMU names its vCPU threads "CPU 0/KVM" (or "CPU 0/TCG"); Firecracker "fc_vcpu 0" (its vcpu.rs:
# thread::Builder::new().name(format!("fc_vcpu {}", index))), beside "fc_vmm" and "fc_api".
_QEMU_VCPU = re.compile(r"^CPU (\d+)/")
_FIRECRACKER_VCPU = re.compile(r"fc_vcpu (\d+)")
VcpuIndex = Callable[[str], int | None]  # a thread's comm -> its vCPU index, None for other threads


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


def qemu_vcpu_index(comm: str) -> int | None:
    """QEMU's vCPU thread "CPU 3/KVM" (or "CPU 3/TCG") -> 3; any other thread -> None."""
    match = _QEMU_VCPU.match(comm)
    return int(match.group(1)) if match else None


def firecracker_vcpu_index(comm: str) -> int | None:
    """Firecracker's vCPU thread "fc_vcpu 3" -> 3; its other threads (fc_vmm, fc_api, ...) -> None."""
    match = _FIRECRACKER_VCPU.fullmatch(comm)
    return int(match.group(1)) if match else None


def vcpu_assignment(
    comms: dict[int, str], benchmark: Sequence[int], vcpu_index: VcpuIndex = qemu_vcpu_index
) -> dict[int, int]:
    """Pure: VMM thread id -> CPU. vCPU N (as ``vcpu_index`` reads the thread's name) gets
    benchmark[N mod len]; every other thread gets the last benchmark core."""
    if not benchmark:
        raise ValueError("no benchmark CPUs")
    out: dict[int, int] = {}
    for tid, comm in comms.items():
        index = vcpu_index(comm)
        out[tid] = benchmark[index % len(benchmark)] if index is not None else benchmark[-1]
    return out


def pin_vcpu_threads(
    pid: int, benchmark: Sequence[int], vcpu_index: VcpuIndex, proc_root: Path = PROC, *, vmm: str = "process"
) -> list[str]:
    """Pin each vCPU thread of VMM ``pid`` (found by ``vcpu_index``, the backend's own thread naming)
    to its own benchmark core and the VMM's other threads to the last one. Call once the vCPU threads
    exist (after the VMM started the guest). Returns problem lines, naming the VMM as ``vmm``."""
    comms: dict[int, str] = {}
    for tid in thread_ids(pid, proc_root):
        try:
            comms[tid] = (proc_root / str(pid) / "task" / str(tid) / "comm").read_text().removesuffix("\n")
        except OSError:
            continue
    if not comms:
        return [f"cannot list the threads of {vmm} {pid}"]
    problems: list[str] = []
    for tid, cpu in vcpu_assignment(comms, benchmark, vcpu_index).items():
        try:
            os.sched_setaffinity(tid, {cpu})
        except ProcessLookupError:
            continue
        except OSError as err:
            problems.append(f"cannot pin {vmm} thread {tid} ({comms[tid]}) to CPU {cpu}: {err.strerror}")
    return problems


def pin_qemu_threads(pid: int, benchmark: Sequence[int], proc_root: Path = PROC) -> list[str]:
    """:func:`pin_vcpu_threads` with QEMU's thread naming."""
    return pin_vcpu_threads(pid, benchmark, qemu_vcpu_index, proc_root, vmm="QEMU process")
