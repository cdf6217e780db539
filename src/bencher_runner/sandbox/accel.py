"""Choosing the accelerator: KVM when it can really boot a guest, else TCG (emulated, with a warning).

`/dev/kvm` existing is not enough: nested or paravirtual KVM can open the device and then fail to run
a stock kernel (it hangs or reports an emulation failure). So `auto` boots the guest kernel once with
no root disk: a working KVM reaches the kernel's "unable to mount root" panic within a second or two
and the VM exits (panic=-1, -no-reboot). The answer is cached per (QEMU, kernel, host kernel).
"""

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bencher_runner.atomicfile import write_atomic
from bencher_runner.sandbox.qemu import MACHINE
from bencher_runner.sandbox.vm import ConcreteAccel
from bencher_runner.spec.config import Accel
from bencher_runner.spec.errors import SandboxError

PROBE_TIMEOUT_S = 15.0
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class AccelChoice:
    accel: ConcreteAccel
    reason: str  # why this accel: shown to the user and kept in the result metadata
    warning: str | None = None


def kvm_device_problem(device: Path = KVM_DEVICE) -> str | None:
    if not device.exists():
        return f"{device} does not exist (no KVM on this host, or the kvm module is not loaded)"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"{device} is not readable and writable by this user (add it to the kvm group)"
    return None


def probe_kvm_boot(qemu: str, kernel: Path, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a guest kernel boots under KVM; else the reason it does not."""
    problem = kvm_device_problem()
    if problem:
        return problem
    with tempfile.TemporaryDirectory(prefix="kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [
            qemu, "-M", MACHINE, "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
            "-serial", f"file:{serial}", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 pci=off", "-no-reboot",
        ]  # fmt: skip
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return f"a test guest did not boot under KVM within {timeout_s:.0f} s (nested or broken KVM)"
        log = serial.read_text(errors="replace") if serial.exists() else ""
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            return f"QEMU could not start a KVM guest: {detail}"
        if "Kernel panic" not in log and "Linux version" not in log:
            return "a test guest under KVM exited without booting its kernel"
    return None


def _cache_key(qemu: str, kernel: Path) -> str:
    parts = [os.uname().release]
    for path in (Path(qemu), kernel):
        st = path.stat()
        parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cached_kvm_problem(cache: Path, qemu: str, kernel: Path, probe: Callable[[], str | None]) -> str | None:
    """The probe's answer, from the cache when the same QEMU, kernel and host kernel were probed."""
    cache_file = cache / "accel.json"
    key = _cache_key(qemu, kernel)
    try:
        doc = json.loads(cache_file.read_text())
        if doc.get("key") == key:
            return doc.get("problem")  # type: ignore[no-any-return]
    except (OSError, ValueError):
        pass
    problem = probe()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_file, json.dumps({"key": key, "problem": problem}))
    return problem


def choose_accel(requested: Accel, kvm_problem: Callable[[], str | None]) -> AccelChoice:
    """Pure decision; ``kvm_problem`` is only called for ``auto``."""
    if requested == "tcg":
        return AccelChoice(
            "tcg", "requested with --accel tcg", "TCG emulates the CPU: timings are not native"
        )
    if requested == "kvm":
        problem = kvm_device_problem()
        if problem:
            raise SandboxError(f"--accel kvm: {problem}; use --accel auto or tcg on this host")
        return AccelChoice("kvm", "requested with --accel kvm")
    problem = kvm_problem()
    if problem is None:
        return AccelChoice("kvm", "KVM boots a guest on this host")
    return AccelChoice(
        "tcg",
        f"KVM unusable: {problem}",
        f"KVM unusable ({problem}); falling back to TCG software emulation: timings are not native",
    )
