"""A cgroup v2 per job: QEMU confined to the benchmark cores, memory capped, no swap, nothing left over.

The cpuset keeps the VM off the housekeeping cores; memory.max (the guest's memory plus room for QEMU
itself) and memory.swap.max=0 stop a job from pushing the host into swap, which would distort timings
of this and later jobs; cgroup.kill on exit removes any stray process. Every step is best-effort: when
cgroup v2 or a controller is missing the job runs without it and one line says so.
"""

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bencher_runner.host.cpus import format_cpu_list

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "bencher-runner"
WANTED_CONTROLLERS = ("cpuset", "cpu", "memory", "pids")
QEMU_OVERHEAD_MIB = 64
MIB = 1024 * 1024

Log = Callable[[str], None]


def memory_max_bytes(vm_memory_mib: int) -> int:
    """The guest's memory + 25% + 64 MiB for QEMU's own allocations."""
    return (vm_memory_mib + vm_memory_mib // 4 + QEMU_OVERHEAD_MIB) * MIB


def cgroup_v2_controllers(root: Path = CGROUP_ROOT) -> list[str] | None:
    """The controllers of a cgroup v2 hierarchy mounted at ``root``; None when ``root`` is not v2."""
    try:
        return (root / "cgroup.controllers").read_text().split()
    except OSError:
        return None


@dataclass
class JobCgroup:
    path: Path
    log: Log
    problems: list[str] = field(default_factory=list)

    def add(self, pid: int) -> bool:
        """Move ``pid`` into this cgroup (threads it creates later are born inside)."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
            return True
        except OSError as err:
            self.problem(f"cannot move process {pid} into {self.path}: {err.strerror}")
            return False

    def problem(self, line: str) -> None:
        self.problems.append(line)
        self.log(f"cgroup: {line}")

    def remove(self, timeout_s: float = 2.0) -> None:
        kill = self.path / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as err:
                if time.monotonic() > deadline:
                    self.problem(f"cannot remove {self.path}: {err.strerror}")
                    return
                time.sleep(0.02)


def _safe_id(job_id: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:64]
    if not cleaned.strip("."):
        raise ValueError(f"job id {job_id!r} cannot name a cgroup")
    return cleaned


def _enable(control: Path, controllers: Sequence[str]) -> None:
    for name in controllers:
        with contextlib.suppress(OSError):
            control.write_text(f"+{name}")


@contextlib.contextmanager
def job_cgroup(
    job_id: str,
    cpus: Sequence[int],
    vm_memory_mib: int,
    *,
    log: Log,
    root: Path = CGROUP_ROOT,
) -> Iterator[JobCgroup | None]:
    """Create ``<root>/bencher-runner/job-<id>`` for one job; yields None when cgroup v2 is unusable.
    On exit every process left in it is killed and the cgroup removed."""
    available = cgroup_v2_controllers(root)
    if available is None:
        log(f"cgroup: skipping the job cgroup: no cgroup v2 hierarchy at {root} (cgroup v1 or hybrid host)")
        yield None
        return
    parent = root / PARENT
    path = parent / f"job-{_safe_id(job_id)}"
    try:
        _enable(root / "cgroup.subtree_control", [c for c in WANTED_CONTROLLERS if c in available])
        parent.mkdir(exist_ok=True)
        enabled = (parent / "cgroup.controllers").read_text().split()
        _enable(parent / "cgroup.subtree_control", [c for c in WANTED_CONTROLLERS if c in enabled])
        path.mkdir()
        active = (path / "cgroup.controllers").read_text().split()
    except OSError as err:
        log(f"cgroup: skipping the job cgroup: cannot create {path}: {err.strerror}")
        yield None
        return
    group = JobCgroup(path, log)
    missing = [c for c in ("cpuset", "memory") if c not in active]
    if missing:
        group.problem(f"controller(s) {', '.join(missing)} unavailable in {path}: their limits are skipped")
    settings: list[tuple[str, str, str]] = []
    if "cpuset" in active and cpus:
        mems = "0"
        with contextlib.suppress(OSError):
            mems = (parent / "cpuset.mems.effective").read_text().strip() or "0"
        settings += [("cpuset", "cpuset.cpus", format_cpu_list(cpus)), ("cpuset", "cpuset.mems", mems)]
    if "memory" in active:
        settings += [
            ("memory", "memory.max", str(memory_max_bytes(vm_memory_mib))),
            ("memory", "memory.swap.max", "0"),
        ]
    for controller, name, value in settings:
        try:
            (path / name).write_text(value)
        except OSError as err:
            group.problem(f"cannot set {name}={value} ({controller}): {err.strerror}")
    try:
        yield group
    finally:
        group.remove()
