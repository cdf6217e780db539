"""QEMU's part of the microVM sandbox (vmsandbox.py); qemu.py holds the argv and the process."""

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from bencher_runner.host.cpus import pin_qemu_threads
from bencher_runner.sandbox.accel import AccelChoice, cached_kvm_problem, choose_accel, probe_kvm_boot
from bencher_runner.sandbox.backend import JobContext
from bencher_runner.sandbox.jail import jail_problem, jail_vm, write_resolv_conf
from bencher_runner.sandbox.kernel import KernelBundle
from bencher_runner.sandbox.netns import JobNetwork, host_nameserver, job_network
from bencher_runner.sandbox.qemu import QemuVm, find_qemu
from bencher_runner.sandbox.vm import VmSpec
from bencher_runner.sandbox.vmlinux import ensure_vmlinux
from bencher_runner.spec.errors import KernelBundleError, SandboxError


class QemuBackend:
    """QEMU's part of the microVM sandbox (vmsandbox.py): KVM where it boots a guest, else TCG; the
    bundle's kernel uncompressed; every VM in the jail of jail.py unless --danger-no-jail."""

    name = "QEMU"

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.qemu = ""
        self.boot_kernel = Path()

    def check(self) -> None:
        """The VMM's jail: refused before any work when this host cannot build it."""
        if not self.ctx.config.host.danger_no_jail and (problem := jail_problem()):
            raise SandboxError(problem)

    def prepare(self, bundle: KernelBundle) -> AccelChoice:
        self.qemu = find_qemu()
        self.boot_kernel = self._boot_kernel(bundle)
        qemu, cache = self.qemu, self.ctx.cache
        return choose_accel(
            self.ctx.config.host.accel,
            lambda: cached_kvm_problem(
                cache, qemu, bundle.kernel, lambda: probe_kvm_boot(qemu, bundle.kernel)
            ),
        )

    def kernel(self, bundle: KernelBundle) -> Path:
        return self.boot_kernel

    def _boot_kernel(self, bundle: KernelBundle) -> Path:
        """The fetched bundle's kernel as an uncompressed ELF (QEMU boots it through PVH): no
        decompression at every boot, which costs about 0.25 s under TCG. A kernel given with --kernel
        is booted as it is (no file is written next to it)."""
        if self.ctx.config.host.kernel is not None:
            return bundle.kernel
        try:
            return ensure_vmlinux(bundle.kernel, bundle.kernel.parent / "vmlinux")
        except KernelBundleError as err:
            self.ctx.warn(f"booting the compressed kernel: {err}")
            return bundle.kernel

    @contextlib.contextmanager
    def vmm_netns(self, it_dir: Path, spec: VmSpec) -> Iterator[str | None]:
        """User-mode NAT runs inside a NATed namespace of its own (so the guest cannot reach the host's
        loopback); without network bwrap gives QEMU a fresh empty one (None)."""
        if spec.network is None:
            yield None
            return
        with job_network(it_dir, tap=False) as network:
            yield network.name

    def start(self, spec: VmSpec, it_dir: Path, netns: str | None, network: JobNetwork | None) -> QemuVm:
        host, layout = self.ctx.config.host, self.ctx.layout
        cpus = tuple(layout.benchmark) if layout is not None and layout.has_isolation else None
        prefix = network.command_prefix() if network is not None else None
        if host.danger_no_jail:
            return QemuVm(spec, it_dir / "qemu.log", prefix, cpus)
        resolv = None
        if spec.network is not None and network is None:  # user-mode NAT: slirp's resolver
            try:
                resolv_conf = Path("/etc/resolv.conf").read_text()
            except OSError:
                resolv_conf = ""
            resolv = write_resolv_conf(it_dir / "resolv.conf", host_nameserver(resolv_conf))
        plan, inside = jail_vm(
            spec,
            self.qemu or find_qemu(),
            uid=host.jail_uid,
            gid=host.jail_gid,
            netns=netns,
            resolv_conf=resolv,
        )
        return QemuVm(inside, it_dir / "qemu.log", cpus=cpus, jail=plan)

    def pin(self, pid: int, benchmark: Sequence[int]) -> list[str]:
        return pin_qemu_threads(pid, benchmark)
