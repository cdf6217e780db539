"""The microVM sandbox: everything QEMU and Firecracker share, around a small per-backend adapter.

Kernel bundle, initramfs with the agent and the job's config, output disk, serial log, cgroup,
vCPU pinning, the job's TAP network, the wait for the command's end (deadline, cancel, grace period
for results) and reading what the guest reported are the same for every VMM; a :class:`VmBackend`
only says how to start its VMM (argv or API calls, its jail), which kernel file it boots, which
network namespace it joins and how it names its vCPU threads.
"""

import contextlib
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Protocol

from bencher_runner.host.cgroup import JobCgroup, job_cgroup
from bencher_runner.host.fingerprint import host_fingerprint
from bencher_runner.host.sampler import SamplerScope, sampler_for
from bencher_runner.sandbox.accel import AccelChoice
from bencher_runner.sandbox.agent import find_agent
from bencher_runner.sandbox.agentconfig import AgentConfig, encode_agent_config
from bencher_runner.sandbox.backend import (
    TIMEOUT_EXIT_CODE,
    Iteration,
    IterationRun,
    IterationStopped,
    JobContext,
    RootKind,
)
from bencher_runner.sandbox.initramfs import base_initramfs, write_job_initramfs
from bencher_runner.sandbox.kernel import KernelBundle, check_memory_floor, resolve_bundle
from bencher_runner.sandbox.netns import JobNetwork, job_network
from bencher_runner.sandbox.network import NetworkPlan, user_nat
from bencher_runner.sandbox.outputdisk import (
    ExitWatcher,
    GuestReport,
    create_output_disk,
    iteration_output,
    output_disk_size,
    read_output_disk,
)
from bencher_runner.sandbox.serial import (
    OOM_MARKER,
    PANIC_MARKER,
    bounded_serial_log,
    serial_line,
    serial_tail,
)
from bencher_runner.sandbox.vm import VmSpec, guest_cmdline, read_host_tsc_khz
from bencher_runner.spec.errors import (
    AgentError,
    CanceledError,
    GuestOutOfMemoryError,
    GuestPanicError,
    SandboxError,
)
from bencher_runner.spec.launch import Launch
from bencher_runner.spec.results import IterationOutput, SandboxInfo
from bencher_runner.spec.units import MIB

# Results written after the command exited are still collected this long past the deadline: half
# the server's 60 s grace, so the terminal message still beats its hard limit.
RESULT_OVERRUN_S = 30.0
SLOWEST_DISK_BPS = 50 * MIB  # the output files' copy-out time is planned at this speed
POLL_S = 0.1


class RunningVm(Protocol):
    """A started VMM (QemuVm, FirecrackerVm): the process is gone when the block exits."""

    @property
    def pid(self) -> int | None: ...

    def __enter__(self) -> "RunningVm": ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def wait(self, deadline: float) -> int | None: ...

    def kill(self) -> None: ...

    def log(self) -> str: ...


class VmBackend(Protocol):
    """What one VMM alone knows."""

    name: str  # "QEMU"

    def check(self) -> None:
        """Refuse before any work what this backend cannot run here (e.g. no jail)."""

    def prepare(self, bundle: KernelBundle) -> AccelChoice:
        """Find the VMM and the kernel file it boots; choose the accelerator (SandboxError if none)."""

    def kernel(self, bundle: KernelBundle) -> Path:
        """The kernel file the VMM boots (after prepare)."""

    def vmm_netns(self, it_dir: Path, spec: VmSpec) -> AbstractContextManager[str | None]:
        """The network namespace the jailed VMM joins when the job has no TAP network of its own."""

    def start(
        self, spec: VmSpec, it_dir: Path, netns: str | None, network: JobNetwork | None
    ) -> RunningVm: ...

    def pin(self, pid: int, benchmark: Sequence[int]) -> list[str]:
        """Pin the VMM's vCPU threads (by its own thread names) to the benchmark CPUs; problem lines."""


class VmSandbox:
    root_kind: RootKind = "disk"

    def __init__(self, ctx: JobContext, backend: VmBackend) -> None:
        self.ctx = ctx
        self.backend = backend
        self.bundle: KernelBundle | None = None
        self.accel: AccelChoice | None = None

    def check(self) -> None:
        """Before any pull: the guest kernel's memory floor, then the backend's own checks."""
        host = self.ctx.config.host
        self.bundle = resolve_bundle(self.ctx.cache, host.kernel, host.kernel_modules)
        check_memory_floor(self.bundle, self.ctx.config.job.memory_mib)
        self.backend.check()

    def prepare(self) -> SandboxInfo:
        host, job = self.ctx.config.host, self.ctx.config.job
        if self.bundle is None:
            self.bundle = resolve_bundle(self.ctx.cache, host.kernel, host.kernel_modules)
        self.agent = find_agent()
        self.accel = self.backend.prepare(self.bundle)
        if self.accel.warning:
            self.ctx.warn(self.accel.warning)
        if host.danger_no_jail:
            self.ctx.warn(
                "--danger-no-jail: the VMM runs unconfined (as the runner's user, in the host's "
                "namespaces, seeing its files); a VMM escape owns this host"
            )
        self.ctx.fingerprint = host_fingerprint(
            accel=self.accel.accel,
            guest_kernel=self.bundle.kernel,
            guest_release=self.bundle.release,
            tuning=self.ctx.metadata.get("tuning"),
        )
        backend = self.ctx.config.backend
        return SandboxInfo(backend, self.accel.accel, job.vcpus, job.memory_mib, job.disk_mib, job.network)

    @contextlib.contextmanager
    def session(self, work: Path, launch: Launch) -> Iterator["VmSession"]:
        assert self.bundle is not None and self.accel is not None, "prepare() first"
        base = base_initramfs(self.ctx.cache, self.agent, self.bundle.modules)
        job, host = self.ctx.config.job, self.ctx.config.host
        with contextlib.ExitStack() as stack:
            network = None
            if job.network and host.network == "tap":
                self.ctx.phase("creating the job's network namespace and TAP device")
                network = stack.enter_context(job_network(work, tap_owner=host.jail_ids))
            plan = network.plan if network is not None else user_nat()
            agent_config = encode_agent_config(self._agent_config(launch, plan))  # the guest's addresses
            yield VmSession(self, base, agent_config, network, plan)

    def _agent_config(self, launch: Launch, plan: NetworkPlan) -> AgentConfig:
        job, host = self.ctx.config.job, self.ctx.config.host
        return AgentConfig(
            argv=launch.argv,
            env=launch.env,
            cwd=launch.cwd,
            uid=launch.user.uid,
            gid=launch.user.gid,
            groups=launch.user.groups,
            max_output=host.max_output_bytes,
            outputs=job.output_paths,
            network=plan.guest if job.network else None,
        )


class VmSession:
    """One job's iterations in VMs: each boots a fresh VM on its own copy of the root disk."""

    def __init__(
        self,
        sandbox: VmSandbox,
        base: Path,
        agent_config: bytes,
        network: JobNetwork | None,
        plan: NetworkPlan,
    ) -> None:
        self.sandbox = sandbox
        self.ctx = sandbox.ctx
        self.base = base
        self.agent_config = agent_config
        self.network = network
        self.plan = plan

    def _spec(self, it: Iteration) -> VmSpec:
        job, host = self.ctx.config.job, self.ctx.config.host
        accel, bundle = self.sandbox.accel, self.sandbox.bundle
        assert accel is not None and bundle is not None
        initrd = it.dir / "initrd.cpio"
        write_job_initramfs(self.base, self.agent_config, initrd)
        out_disk = it.dir / "output.img"
        create_output_disk(out_disk, output_disk_size(len(job.output_paths), host.max_output_bytes))
        return VmSpec(
            kernel=self.sandbox.backend.kernel(bundle),
            initrd=initrd,
            rootfs=it.root,
            output_disk=out_disk,
            serial_log=it.dir / "serial.log",
            vcpus=job.vcpus,
            memory_mib=job.memory_mib,
            accel=accel.accel,
            # Firecracker swaps reboot=t for =k; the lean kernel under TCG skips two timer checks
            cmdline=guest_cmdline(accel.accel, read_host_tsc_khz(), lean=bundle.kind == "lean"),
            network=self.plan if job.network else None,
            acpi=bundle.acpi,  # the lean kernel has none: QEMU names its devices on the command line
        )

    def run(self, it: Iteration) -> IterationRun:
        job = self.ctx.config.job
        spec = self._spec(it)
        self.ctx.phase(f"{it.label}: booting VM ({job.vcpus} vCPU, {job.memory_mib} MiB, {spec.accel})")
        t0 = time.monotonic()
        with (
            self._cgroup(it.dir) as group,
            self._vmm_netns(it.dir, spec) as netns,
            bounded_serial_log(spec.serial_log),  # a guest spamming its console cannot fill the disk
            self.sandbox.backend.start(spec, it.dir, netns, self.network) as vm,
            sampler_for(vm.pid, self.ctx.layout, spec.accel) as sampler,  # what else ran on its CPUs
        ):
            if group is not None and vm.pid is not None:
                group.add(vm.pid)  # cpuset = benchmark cores, memory.max a little above the VM, no swap
            self._pin(vm.pid)
            ending = self._wait(vm, spec, it.deadline, sampler)
            vm.kill()
            vm_log = vm.log()
        t1 = time.monotonic()
        self.ctx.add_time("vm_s", t1 - t0)
        report = read_output_disk(
            spec.output_disk, max_output=self.ctx.config.host.max_output_bytes, requested=job.output_paths
        )
        exit = report.exit
        self.ctx.interference.append(sampler.report((exit.end_ns - exit.start_ns) / 1e9 if exit else None))
        self.ctx.add_time("collect_s", time.monotonic() - t1)
        return self._result(it, spec, report, ending, vm_log, t1 - t0)

    def _wait(
        self, vm: RunningVm, spec: VmSpec, deadline: float, sampler: SamplerScope
    ) -> tuple[str, int | None]:
        """Until the VM exits ("exited"), the job is canceled ("canceled"), the deadline passes
        ("timed_out"), or the grace period after the command's end runs out ("grace_expired")."""
        host = self.ctx.config.host
        watcher = ExitWatcher(
            spec.output_disk, requested=self.ctx.config.job.output_paths, max_output=host.max_output_bytes
        )
        grace_deadline: float | None = None
        while True:
            status = vm.wait(min(deadline, grace_deadline or deadline, time.monotonic() + POLL_S))
            if status is not None:
                return "exited", status
            now = time.monotonic()
            if self.ctx.cancel.is_set():
                return "canceled", None
            if grace_deadline is None and watcher.poll():
                sampler.command_ended()  # the interference window ends now
                # The command has exited in time: the guest gets the grace period to write its
                # results, even past the deadline, up to RESULT_OVERRUN_S.
                grace_deadline = min(
                    now + host.grace_period_s + self._collect_allowance(),
                    max(now + 1.0, deadline + RESULT_OVERRUN_S),
                )
            elif grace_deadline is not None:
                if now >= grace_deadline:
                    return "grace_expired", None
            elif now >= deadline:
                return "timed_out", None

    def _result(
        self,
        it: Iteration,
        spec: VmSpec,
        report: GuestReport,
        ending: tuple[str, int | None],
        vm_log: str,
        ran_s: float,
    ) -> IterationRun:
        how, status = ending
        job, host = self.ctx.config.job, self.ctx.config.host
        if report.exit is not None:
            self.ctx.timings["boot_to_command_s"] = report.exit.start_ns / 1e9
            self.ctx.timings["command_s"] = (report.exit.end_ns - report.exit.start_ns) / 1e9
        for warning in report.warnings:
            self.ctx.warn(f"{it.label}: {warning}")
        if how == "canceled":
            raise CanceledError("the job was canceled while the benchmark ran")
        if how == "timed_out":
            partial = IterationOutput(TIMEOUT_EXIT_CODE, report.stdout, report.stderr)
            raise IterationStopped(partial, ran=f"which ran {ran_s:.1f} s (boot included) and was stopped")
        if report.exit is None:
            raise self._no_result_error(report, spec.serial_log, status, vm_log)
        if how == "grace_expired" and not report.done:
            self.ctx.warn(
                f"{it.label}: the guest did not finish writing results within the {host.grace_period_s} s "
                "grace period; output files may be missing (raise --grace-period)"
            )
        oom = serial_line(spec.serial_log, OOM_MARKER) if report.exit.exit_code == 128 + 9 else None
        if oom:
            self.ctx.warn(f"{it.label}: the guest ran out of memory: {oom}")
        output = iteration_output(
            report, job.output_paths, mark_uncollected=not report.done and how != "grace_expired"
        )
        if oom:
            raise IterationStopped(
                output,
                error=GuestOutOfMemoryError(
                    f"the benchmark was killed because the guest ran out of memory ({job.memory_mib} MiB): "
                    f"{oom}; raise --memory or reduce what the benchmark allocates"
                ),
            )
        command_s = (report.exit.end_ns - report.exit.start_ns) / 1e9
        return IterationRun(output, command_s, report.file_sizes)

    def _collect_allowance(self) -> float:
        """Time to read and write the requested output files at the slowest disk speed we plan for."""
        config = self.ctx.config
        return len(config.job.output_paths) * config.host.max_output_bytes / SLOWEST_DISK_BPS

    def _cgroup(self, it_dir: Path) -> AbstractContextManager[JobCgroup | None]:
        layout = self.ctx.layout
        if layout is None or not layout.has_isolation:
            return contextlib.nullcontext()
        job_id = f"{it_dir.parent.name}-{it_dir.name}"
        return job_cgroup(job_id, layout.benchmark, self.ctx.config.job.memory_mib, log=self.ctx.phase)

    def _vmm_netns(self, it_dir: Path, spec: VmSpec) -> AbstractContextManager[str | None]:
        """The job's TAP namespace when it has one; else whatever the backend's jail needs."""
        if self.network is not None:
            return contextlib.nullcontext(self.network.name)
        if self.ctx.config.host.danger_no_jail:
            return contextlib.nullcontext(None)
        return self.sandbox.backend.vmm_netns(it_dir, spec)

    def _pin(self, pid: int | None) -> None:
        """Under KVM, vCPU threads go to the benchmark cores (TCG timings are emulated anyway)."""
        layout, accel = self.ctx.layout, self.sandbox.accel
        if pid is None or layout is None or not layout.has_isolation or accel is None:
            return
        if accel.accel == "kvm":
            for problem in self.sandbox.backend.pin(pid, layout.benchmark):
                self.ctx.warn(problem)

    def _no_result_error(
        self, report: GuestReport, serial: Path, status: int | None, vm_log: str
    ) -> SandboxError:
        if report.errors:
            return AgentError(f"the guest agent failed: {'; '.join(report.errors)}")
        panic = serial_line(serial, PANIC_MARKER)
        if panic:
            return GuestPanicError(
                f"the guest kernel panicked: {panic}\nserial console:\n{serial_tail(serial)}"
            )
        detail = f"{self.sandbox.backend.name} exited with status {status}" + (
            f": {vm_log}" if vm_log else ""
        )
        return SandboxError(
            f"the VM stopped without reporting a result ({detail})\nserial console:\n{serial_tail(serial)}"
        )
