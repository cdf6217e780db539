"""A public fake Sandbox (sandbox/backend.py): runs a whole Job without any VM.

Each iteration follows a script entry: "ok", "exit:N", "timeout", "cancel", "panic", "oom",
"error", "slow:S" (sleeps S seconds, then ok). It records what the job gave it (the root it was
handed and that root's size, the deadline, the launch) so tests can check the orchestration.
"""

import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bencher_runner.sandbox.backend import Iteration, IterationRun, IterationStopped, JobContext, RootKind
from bencher_runner.spec.errors import CanceledError, GuestOutOfMemoryError, GuestPanicError, SandboxError
from bencher_runner.spec.launch import Launch
from bencher_runner.spec.results import IterationOutput, SandboxInfo


@dataclass
class Record:
    prepared: int = 0
    sessions_open: int = 0
    sessions_closed: int = 0
    launch: Launch | None = None
    roots: list[tuple[Path, int]] = field(default_factory=list)  # (path, size or -1 for a tree)
    root_disks: list[tuple[str, int]] = field(default_factory=list)  # a disk's (sha256, allocated bytes)
    deadlines: list[float] = field(default_factory=list)
    iterations: list[Iteration] = field(default_factory=list)


class FakeSandbox:
    def __init__(
        self,
        ctx: JobContext,
        script: list[str],
        record: Record,
        *,
        root_kind: RootKind = "disk",
        prepare_error: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.script = script
        self.record = record
        self.root_kind = root_kind
        self.prepare_error = prepare_error

    def check(self) -> None:
        pass

    def prepare(self) -> SandboxInfo:
        self.record.prepared += 1
        if self.prepare_error:
            raise SandboxError(self.prepare_error)
        job = self.ctx.config.job
        return SandboxInfo("fake", "none", job.vcpus, job.memory_mib, job.disk_mib, job.network)

    @contextlib.contextmanager
    def session(self, work: Path, launch: Launch) -> Iterator["FakeSession"]:
        self.record.launch = launch
        self.record.sessions_open += 1
        try:
            yield FakeSession(self)
        finally:
            self.record.sessions_closed += 1


class FakeSession:
    def __init__(self, sandbox: FakeSandbox) -> None:
        self.sandbox = sandbox

    def run(self, it: Iteration) -> IterationRun:
        record, ctx = self.sandbox.record, self.sandbox.ctx
        record.iterations.append(it)
        record.deadlines.append(it.deadline)
        record.roots.append((it.root, it.root.stat().st_size if it.root.is_file() else -1))
        if it.root.is_file():
            digest = hashlib.sha256(it.root.read_bytes()).hexdigest()
            record.root_disks.append((digest, it.root.stat().st_blocks * 512))
        step = self.sandbox.script[it.index]
        kind, _, arg = step.partition(":")
        partial = IterationOutput(124, b"partial out", b"partial err")
        if kind == "ok":
            return IterationRun(IterationOutput(0, f"out {it.index}".encode()), 0.25, {})
        if kind == "slow":
            time.sleep(float(arg))
            return IterationRun(IterationOutput(0, b"slow"), float(arg), {})
        if kind == "exit":
            return IterationRun(IterationOutput(int(arg), b"", b"failed"), 0.1, {})
        if kind == "timeout":
            raise IterationStopped(partial, ran="which ran 9.9 s (boot included) and was stopped")
        if kind == "cancel":
            ctx.cancel.set()
            raise CanceledError("the job was canceled while the benchmark ran")
        if kind == "panic":
            raise GuestPanicError("the guest kernel panicked: Kernel panic - not syncing: test")
        if kind == "oom":
            raise IterationStopped(
                IterationOutput(137, b"", b"killed"),
                error=GuestOutOfMemoryError("the benchmark was killed because the guest ran out of memory"),
            )
        if kind == "error":
            raise SandboxError("the VM stopped without reporting a result (QEMU exited with status 1)")
        raise AssertionError(f"unknown script step {step!r}")
