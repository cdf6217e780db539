"""The one place that maps a job's backend onto its Sandbox (backend.py)."""

from bencher_runner.sandbox.backend import JobContext, Sandbox
from bencher_runner.sandbox.host import HostSandbox
from bencher_runner.sandbox.qemu_backend import QemuBackend
from bencher_runner.sandbox.vmsandbox import VmSandbox


def make_sandbox(ctx: JobContext) -> Sandbox:
    backend = ctx.config.backend
    if backend == "none":
        return HostSandbox(ctx)
    if backend == "firecracker":
        from bencher_runner.sandbox.firecracker_backend import FirecrackerBackend  # its HTTP stack

        return VmSandbox(ctx, FirecrackerBackend(ctx))
    return VmSandbox(ctx, QemuBackend(ctx))
