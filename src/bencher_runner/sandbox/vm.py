"""What every VM backend is given, and the guest kernel command line they share.

A backend (QEMU today, Firecracker next) is a small adapter from a :class:`VmSpec` to a process;
kernel, initramfs, agent, root disk and output disk are the same for all of them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ConcreteAccel = Literal["kvm", "tcg"]

# Determinism: no guest ASLR/KASLR, no THP. panic=-1 reboots at once on a panic (the host sees the
# VM exit and finds the panic in the serial log); the agent ends a run by rebooting too.
GUEST_CMDLINE = "console=ttyS0 quiet panic=-1 pci=off norandmaps nokaslr transparent_hugepage=never"


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
