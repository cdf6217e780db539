"""What every VM backend is given, and the guest kernel command line they share.

A backend (QEMU today, Firecracker next) is a small adapter from a :class:`VmSpec` to a process;
kernel, initramfs, agent, root disk and output disk are the same for all of them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bencher_runner.sandbox.network import NetworkPlan

ConcreteAccel = Literal["kvm", "tcg"]

# Determinism: no guest ASLR/KASLR, no THP. panic=-1 reboots at once on a panic (the host sees the
# VM exit and finds the panic in the serial log); the agent ends a run by rebooting too.
GUEST_CMDLINE = "console=ttyS0 quiet panic=-1 reboot=t pci=off norandmaps nokaslr transparent_hugepage=never"


@dataclass(frozen=True)
class VmSpec:
    kernel: Path
    initrd: Path
    rootfs: Path
    output_disk: Path
    serial_log: Path
    vcpus: int
    memory_mib: int
    accel: ConcreteAccel
    cmdline: str = GUEST_CMDLINE
    network: NetworkPlan | None = None  # None: no network device at all
    acpi: bool = True  # False (the lean kernel): QEMU lists the virtio-mmio devices on the cmdline


def host_tsc_khz(cpuinfo: str) -> int | None:
    """The host's TSC frequency in kHz when it is constant (``constant_tsc``), from /proc/cpuinfo."""
    lines = cpuinfo.splitlines()
    flags = next((line for line in lines if line.startswith("flags")), "")
    mhz = next((line for line in lines if line.startswith("cpu MHz")), "")
    if "constant_tsc" not in flags.split() or ":" not in mhz:
        return None
    try:
        return round(float(mhz.split(":", 1)[1]) * 1000)
    except ValueError:
        return None


def read_host_tsc_khz() -> int | None:
    try:
        with open("/proc/cpuinfo") as f:
            return host_tsc_khz(f.read())
    except OSError:
        return None


# The lean kernel under TCG only: the two timer checks a KVM guest never makes (there kvm.c sets
# no_timer_check and the TSC-deadline APIC timer needs no calibration), but an emulated CPU without
# TSC deadline does: calibrate_APIC_clock counts the local APIC timer against the PIT for two rounds
# of 100 ms (~0.2 s of every boot, the largest single part of the lean kernel's boot here), and
# timer_irq_works waits for PIT ticks through the IOAPIC (~15 ms). Without the APIC timer the PIT is the
# clock event (a multi-vCPU guest gets its ticks broadcast from it).
LEAN_TCG_CMDLINE = "no_timer_check noapictimer"


def guest_cmdline(accel: ConcreteAccel, tsc_khz: int | None, lean: bool = False) -> str:
    """The kernel command line for this accelerator (and, with ``lean``, the lean kernel).

    Under TCG the guest's TSC is the host's, but the kernel calibrates it against the emulated PIT,
    which fails when the host is busy ("tsc: Unable to calibrate against PIT") and then stalls the
    boot for good (seen here in most boots at a load of 2 on 2 cores). Giving the frequency
    (tsc_early_khz) skips that calibration. KVM guests get their clock from kvm-clock.
    """
    words = [GUEST_CMDLINE]
    if accel == "tcg" and tsc_khz:
        words.append(f"tsc_early_khz={tsc_khz}")
    if accel == "tcg" and lean:
        words.append(LEAN_TCG_CMDLINE)
    return " ".join(words)
