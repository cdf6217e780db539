"""Firecracker's part of the microVM sandbox (vmsandbox.py).

KVM only; the bundle's kernel as an uncompressed vmlinux; no user-mode NAT (HostSettings refuses it,
so a network job gets the job's TAP); the VMM under Firecracker's jailer with the same plan as QEMU's
jail (uid/gid, namespaces, an empty netns without network) unless --danger-no-jail. The HTTP stack
(httpx) is only imported when this backend is chosen.
"""

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from bencher_runner.host.cpus import firecracker_vcpu_index, pin_vcpu_threads
from bencher_runner.sandbox.accel import AccelChoice
from bencher_runner.sandbox.backend import JobContext
from bencher_runner.sandbox.firecracker import (
    FirecrackerVm,
    JailerConfig,
    find_firecracker,
    find_jailer,
    jailer_config,
    require_kvm,
)
from bencher_runner.sandbox.jail import jail_vm
from bencher_runner.sandbox.kernel import KernelBundle
from bencher_runner.sandbox.netns import JobNetwork, empty_netns
from bencher_runner.sandbox.vm import VmSpec
from bencher_runner.sandbox.vmlinux import ensure_vmlinux
from bencher_runner.spec.errors import SandboxError

NO_JAILER_ERROR = (
    "--sandbox firecracker runs Firecracker under its jailer: pass --jailer PATH (it ships in the "
    "release archive with firecracker), or --danger-no-jail on a development host"
)


class FirecrackerBackend:
    name = "Firecracker"

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.firecracker = ""
        self.vmlinux = Path()

    def check(self) -> None:
        host = self.ctx.config.host
        if not host.danger_no_jail and host.jailer is None:
            raise SandboxError(NO_JAILER_ERROR)

    def prepare(self, bundle: KernelBundle) -> AccelChoice:
        self.firecracker = find_firecracker(self.ctx.config.host.firecracker)
        require_kvm()
        self.vmlinux = ensure_vmlinux(bundle.kernel, bundle.kernel.parent / "vmlinux")
        return AccelChoice("kvm", "Firecracker runs on KVM")

    def kernel(self, bundle: KernelBundle) -> Path:
        return bundle.kernel  # VmSpec's; Firecracker itself boots self.vmlinux

    @contextlib.contextmanager
    def vmm_netns(self, it_dir: Path, spec: VmSpec) -> Iterator[str | None]:
        """The jailer joins an empty namespace (only lo) when the job has no network."""
        with empty_netns(it_dir) as name:
            yield name

    def _jailer(self, spec: VmSpec, netns: str | None) -> JailerConfig | None:
        host = self.ctx.config.host
        if host.danger_no_jail:
            return None
        if host.jailer is None:
            raise SandboxError(NO_JAILER_ERROR)
        plan, _ = jail_vm(spec, self.firecracker, uid=host.jail_uid, gid=host.jail_gid, netns=netns)
        return jailer_config(plan, find_jailer(host.jailer), host.jailer_chroot_base)

    def start(
        self, spec: VmSpec, it_dir: Path, netns: str | None, network: JobNetwork | None
    ) -> FirecrackerVm:
        jailer = self._jailer(spec, netns)
        prefix = network.command_prefix() if network is not None and jailer is None else None
        return FirecrackerVm(
            spec,
            self.vmlinux,
            it_dir,
            firecracker=self.firecracker,
            jailer=jailer,  # it joins the namespace itself
            log_level=self.ctx.config.host.sandbox_log_level,
            prefix=prefix,
        )

    def pin(self, pid: int, benchmark: Sequence[int]) -> list[str]:
        """Firecracker's own thread names: "fc_vcpu N" beside fc_vmm and fc_api (issue 14)."""
        return pin_vcpu_threads(pid, benchmark, firecracker_vcpu_index, vmm="Firecracker process")
