"""`runner doctor`: can this host run jobs, and how noisy will its timings be?

Each check gives a status and, for every problem, the fix. Only missing essentials (QEMU, the kernel
bundle, the guest agent, mkfs.ext4) are failures; TCG-only, a virtualised host, no isolation boot args,
irqbalance and cgroup v1 are warnings, because jobs still run, just with noisier timings. The `health:`
rows show the probe `runner up` runs before each `ready`: a failing disk or RAID array is a failure
(someone must replace it), a sync in progress or an unsynchronised clock a warning. Checks are
functions of injectable paths and commands so tests can drive them.
"""

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from bencher_runner.host.cgroup import CGROUP_ROOT, WANTED_CONTROLLERS, cgroup_v2_controllers
from bencher_runner.host.cpus import format_cpu_list, online_cpus, partition
from bencher_runner.host.health import HealthReport, Severity, probe_health
from bencher_runner.host.tuning import HostPaths, TuningOptions, TuningPlan, preview
from bencher_runner.sandbox.accel import cached_kvm_problem, kvm_device_problem, probe_kvm_boot
from bencher_runner.sandbox.agent import find_agent
from bencher_runner.sandbox.kernel import resolve_bundle
from bencher_runner.sandbox.qemu import find_qemu
from bencher_runner.spec.errors import RunnerError

Status = Literal["ok", "warn", "fail", "info"]
ISOLATION_ARGS = ("isolcpus", "nohz_full", "rcu_nocbs")
_VIRT_VENDORS = (
    "qemu",
    "kvm",
    "vmware",
    "xen",
    "innotek",
    "virtual machine",
    "amazon ec2",
    "google",
    "microsoft",
)


_HEALTH_STATUS: dict[Severity, Status] = {"ok": "ok", "warning": "warn", "failing": "fail"}


def _probe_this_host() -> HealthReport:
    return probe_health(Path("/"), now=time.monotonic(), cache=None)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class DoctorEnv:
    """Where doctor looks; tests replace parts of it."""

    cache: Path
    paths: HostPaths = field(default_factory=HostPaths)
    cgroup_root: Path = CGROUP_ROOT
    which: Callable[[str], str | None] = shutil.which
    kvm_probe: Callable[[str, Path], str | None] = probe_kvm_boot
    health: Callable[[], HealthReport] = _probe_this_host


def _version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"version unknown ({err.__class__.__name__})"
    lines = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return lines[0].strip() if lines else "version unknown"


def check_essentials(env: DoctorEnv) -> tuple[list[Check], str | None, Path | None]:
    """QEMU, kernel bundle, agent, mkfs.ext4. Also returns the QEMU path and kernel for the KVM probe."""
    checks: list[Check] = []
    qemu: str | None = None
    try:
        qemu = find_qemu()
        checks.append(Check("QEMU", "ok", f"{qemu}: {_version([qemu, '-version'])}"))
    except RunnerError as err:
        checks.append(Check("QEMU", "fail", "qemu-system-x86_64 not found", str(err)))
    kernel: Path | None = None
    try:
        bundle = resolve_bundle(env.cache, None, None)
        kernel = bundle.kernel
        checks.append(Check("kernel bundle", "ok", f"{bundle.kernel} ({len(bundle.modules)} modules)"))
    except RunnerError as err:
        checks.append(Check("kernel bundle", "fail", "no guest kernel bundle", str(err)))
    try:
        checks.append(Check("guest agent", "ok", str(find_agent())))
    except RunnerError as err:
        checks.append(Check("guest agent", "fail", "not built", str(err)))
    mkfs = env.which("mkfs.ext4") or (
        "/usr/sbin/mkfs.ext4" if os.path.exists("/usr/sbin/mkfs.ext4") else None
    )
    if mkfs:
        checks.append(Check("e2fsprogs", "ok", f"{mkfs}: {_version([mkfs, '-V'])}"))
    else:
        checks.append(Check("e2fsprogs", "fail", "mkfs.ext4 not found", "apt-get install e2fsprogs"))
    firecracker = env.which("firecracker")
    if firecracker:
        checks.append(Check("Firecracker", "info", f"{firecracker}: {_version([firecracker, '--version'])}"))
    else:
        checks.append(
            Check(
                "Firecracker",
                "info",
                "not installed (needed only for a Firecracker backend; QEMU is the default)",
            )
        )
    return checks, qemu, kernel


def check_kvm(env: DoctorEnv, qemu: str | None, kernel: Path | None) -> Check:
    if qemu is None or kernel is None:
        device = kvm_device_problem()
        detail = device or "/dev/kvm is usable, but whether a guest boots needs QEMU and the kernel bundle"
        return Check("KVM", "warn", detail, "install QEMU and the kernel bundle, then run doctor again")
    probe = env.kvm_probe
    problem = cached_kvm_problem(env.cache, qemu, kernel, lambda: probe(qemu, kernel))
    if problem is None:
        return Check("KVM", "ok", "a guest boots under KVM: jobs run with hardware virtualisation")
    return Check(
        "KVM",
        "warn",
        f"TCG only: {problem}",
        "run on bare metal (or a host with working nested KVM); under TCG timings are not native",
    )


def check_cgroup(root: Path) -> Check:
    controllers = cgroup_v2_controllers(root)
    if controllers is None:
        return Check(
            "cgroup",
            "warn",
            f"no cgroup v2 at {root} (cgroup v1 or hybrid): jobs run without a cpuset/memory cgroup",
            "boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2 only)",
        )
    missing = [c for c in WANTED_CONTROLLERS if c not in controllers]
    detail = f"cgroup v2, controllers: {' '.join(controllers) or 'none'}"
    if missing:
        return Check(
            "cgroup", "warn", f"{detail}; missing {', '.join(missing)}", "enable them in the kernel/systemd"
        )
    return Check("cgroup", "ok", detail)


def check_isolation_args(cmdline: str, cpus: tuple[int, ...]) -> Check:
    present = {arg for arg in ISOLATION_ARGS if re.search(rf"(^|\s){arg}=", cmdline)}
    missing = [arg for arg in ISOLATION_ARGS if arg not in present]
    if not missing:
        return Check("isolation boot args", "ok", "isolcpus, nohz_full and rcu_nocbs are set")
    layout = partition(cpus)
    if not layout.has_isolation:
        return Check("isolation boot args", "info", "a single CPU: nothing to isolate")
    cpulist = format_cpu_list(layout.benchmark)
    args = " ".join(f"{arg}={cpulist}" for arg in ISOLATION_ARGS)
    return Check(
        "isolation boot args",
        "warn",
        f"/proc/cmdline lacks {', '.join(missing)}: the scheduler and RCU may use benchmark CPUs",
        f'add "{args}" to GRUB_CMDLINE_LINUX_DEFAULT (`doctor --fix` writes '
        "/etc/default/grub.d/bencher-runner.cfg), run update-grub and reboot",
    )


def check_irqbalance(proc: Path) -> Check:
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "irqbalance":
                    return Check(
                        "irqbalance",
                        "warn",
                        f"irqbalance is running (pid {entry.name}): it moves IRQs back onto benchmark CPUs",
                        "systemctl disable --now irqbalance",
                    )
            except OSError:
                continue
    return Check("irqbalance", "ok", "not running")


def check_virtualised(paths: HostPaths, which: Callable[[str], str | None]) -> Check:
    reasons: list[str] = []
    for name in ("sys_vendor", "product_name"):
        try:
            value = (paths.sys / "class/dmi/id" / name).read_text().strip()
        except OSError:
            continue
        if any(v in value.lower() for v in _VIRT_VENDORS):
            reasons.append(f"DMI {name} {value!r}")
    detect = which("systemd-detect-virt")
    if detect:
        try:
            out = subprocess.run(
                [detect], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if out and out != "none":
            reasons.append(f"systemd-detect-virt: {out}")
    try:
        if re.search(r"^flags\s*:.*\bhypervisor\b", (paths.proc / "cpuinfo").read_text(), re.MULTILINE):
            reasons.append("the CPU has the 'hypervisor' flag")
    except OSError:
        pass
    if reasons:
        return Check(
            "virtualisation",
            "warn",
            f"virtualised host ({'; '.join(reasons)}): other guests share the hardware, timings are noisier",
            "run benchmarks on a dedicated bare-metal host",
        )
    return Check("virtualisation", "ok", "bare metal (no hypervisor detected)")


def check_tuning(paths: HostPaths) -> list[Check]:
    plan = TuningPlan.from_options(TuningOptions())
    return [
        Check(f"tuning: {knob}", "info", f"now {current}", f"runner: {action}")
        for knob, current, action in preview(plan, paths)
    ]


def check_health(env: DoctorEnv) -> list[Check]:
    """`health: md0`, `health: nvme0`, `health: thermal`, `health: clock`: the probe `runner up` runs
    before each `ready` (host/health.py). A failing disk fails here even though it does not pause
    claiming: it needs a person."""
    return [
        Check(
            f"health: {f.device if f.kind in ('raid', 'nvme') else f.kind}",
            _HEALTH_STATUS[f.state],
            f.detail,
            f.fix,
        )
        for f in env.health().findings
    ]


def run_checks(env: DoctorEnv) -> list[Check]:
    checks, qemu, kernel = check_essentials(env)
    checks.insert(0, check_kvm(env, qemu, kernel))
    cpus = online_cpus(env.paths.sys)
    layout = partition(cpus)
    checks.append(
        Check(
            "CPUs",
            "info" if layout.has_isolation else "warn",
            f"online {format_cpu_list(cpus)}: {layout.note}",
        )
    )
    checks.append(check_cgroup(env.cgroup_root))
    try:
        cmdline = (env.paths.proc / "cmdline").read_text()
    except OSError:
        cmdline = ""
    checks.append(check_isolation_args(cmdline, cpus))
    checks.append(check_irqbalance(env.paths.proc))
    checks.append(check_virtualised(env.paths, env.which))
    checks.extend(check_health(env))
    checks.extend(check_tuning(env.paths))
    return checks


def can_run_jobs(checks: list[Check]) -> bool:
    return not any(c.status == "fail" for c in checks)


def to_json(checks: list[Check]) -> dict[str, object]:
    return {"ok": can_run_jobs(checks), "checks": [asdict(c) for c in checks]}
