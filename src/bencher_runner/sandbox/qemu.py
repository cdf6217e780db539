"""The QEMU backend: `qemu-system-x86_64 -M microvm` with the shared kernel, initramfs and disks.

`qemu_argv` is pure (tested without a VM); `QemuVm` owns the process: started in its own session so a
kill takes everything, stopped on every exit path, and (unless --danger-no-jail) inside the jail of
jail.py, as an unprivileged uid that sees only the VM's files at the jail's fixed paths.
"""

import os
import shutil
from pathlib import Path
from types import TracebackType

from bencher_runner.sandbox.jail import JailPlan, start_jailed
from bencher_runner.sandbox.vm import VmSpec
from bencher_runner.sandbox.vmprocess import RunsAsVmProcess, VmProcess
from bencher_runner.spec.errors import SandboxError

QEMU_BINARY = "qemu-system-x86_64"
MACHINE = "microvm,x-option-roms=off,isa-serial=on,rtc=off"


def find_qemu() -> str:
    path = os.environ.get("BENCHER_RUNNER_QEMU") or shutil.which(QEMU_BINARY)
    if not path:
        raise SandboxError(
            f"{QEMU_BINARY} is not installed; install it with `apt-get install qemu-system-x86` "
            "(or set BENCHER_RUNNER_QEMU)"
        )
    return path


def _drive_path(path: Path) -> str:
    text = str(path)
    if "," in text:
        raise SandboxError(f"path {text!r} contains a comma, which QEMU cannot take; use another --cache-dir")
    return text


def qemu_argv(qemu: str, spec: VmSpec) -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    argv = [
        qemu,
        "-M", MACHINE if spec.acpi else f"{MACHINE},acpi=off",  # acpi=off: virtio_mmio.device= instead
        *cpu,
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-serial", f"file:{_drive_path(spec.serial_log)}",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.cmdline,
        "-no-reboot",
        "-name", "bencher-vm,debug-threads=on",  # vCPU threads named "CPU N/KVM": pinning finds them
    ]  # fmt: skip
    argv += list(spec.network.qemu_args) if spec.network else ["-nic", "none"]
    for drive_id, disk in (("root", spec.rootfs), ("output", spec.output_disk)):
        argv += [
            "-drive", f"id={drive_id},file={_drive_path(disk)},format=raw,if=none,cache=unsafe",
            "-device", f"virtio-blk-device,drive={drive_id}",
        ]  # fmt: skip
    return argv


class QemuVm(RunsAsVmProcess):
    """One running VM. Use as a context manager: the process is gone when the block exits.

    QEMU runs as a VmProcess: its own session, dead with the thread that started it, so a runner that
    is killed never leaves a VM behind. Start and wait from the same thread. With ``jail``, ``spec``
    names the files as QEMU sees them in the jail (jail.jail_vm) and ``pid`` is QEMU's own.
    """

    def __init__(
        self,
        spec: VmSpec,
        log_path: Path,
        prefix: list[str] | None = None,
        cpus: tuple[int, ...] | None = None,
        jail: JailPlan | None = None,
    ) -> None:
        self.spec = spec
        self.cpus = cpus
        self.log_path = log_path
        self.jail = jail
        qemu = str(jail.binary) if jail is not None else find_qemu()
        self.argv = [*(prefix or []), *qemu_argv(qemu, spec)]  # prefix: e.g. `ip netns exec NS`
        self._proc: VmProcess | None = None
        self._vmm_pid: int | None = None

    def __enter__(self) -> "QemuVm":
        with self.log_path.open("wb") as log:
            if self.jail is None:
                self._proc = VmProcess(self.argv, stdout=log, stderr=log, cpus=self.cpus)
                return self
            self._proc, self._vmm_pid = start_jailed(
                self.jail, self.argv, stdout=log, stderr=log, cpus=self.cpus
            )
        if self._vmm_pid is None:
            raise SandboxError(
                f"the VM jail could not be started: {self.log() or 'bwrap gave no reason'}; this host must "
                "allow mount and PID namespaces to root (in a container: run it privileged), or pass "
                "--danger-no-jail on a development host"
            )
        return self

    @property
    def pid(self) -> int | None:
        """QEMU's PID (in the jail: not bwrap's)."""
        return self._vmm_pid if self._vmm_pid is not None else super().pid

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
