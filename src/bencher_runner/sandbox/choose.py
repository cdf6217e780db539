"""The one place that maps a job's backend onto its Sandbox (backend.py)."""

from bencher_runner.sandbox.backend import JobContext, Sandbox
from bencher_runner.sandbox.host import HostSandbox, Resolver
from bencher_runner.sandbox.qemu_backend import QemuBackend
from bencher_runner.sandbox.vmsandbox import VmSandbox


def make_sandbox(ctx: JobContext, resolve: Resolver) -> Sandbox:
    """``resolve``: how the no-sandbox backend finds paths in the unpacked tree (the job layer's
    ``oci.unpack.resolve_in_tree``: sandbox/ does not import oci/)."""
    backend = ctx.config.backend
    if backend == "none":
        return HostSandbox(ctx, resolve)
    if backend == "firecracker":
        from bencher_runner.sandbox.firecracker_backend import FirecrackerBackend  # its HTTP stack

        return VmSandbox(ctx, FirecrackerBackend(ctx))
    return VmSandbox(ctx, QemuBackend(ctx))
