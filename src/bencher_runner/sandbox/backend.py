"""The Sandbox seam: what every backend (QEMU, Firecracker, no sandbox) is given and gives back.

A job (job.py) is phases: image -> root -> iterations -> results. For the iterations it needs one
object that runs one iteration of the prepared job in isolation and says what came out: a
:class:`Sandbox`. Every backend takes the same inputs (the job's RunConfig, the kernel bundle it
resolves, the iteration's own root disk or tree, the job's deadline and cancel event, the benchmark
CPUs) and gives the same outputs (an :class:`IterationRun`, or :class:`IterationStopped` / a
RunnerError). What only a backend knows stays in it: its argv or API calls, its vCPU thread names for
pinning, the network modes it can take.

The model is craft-providers' Executor/Provider split and httpcore's pluggable backends: the job
never names a backend class, and tests run a whole Job on a fake one (tests/support/fake_sandbox.py).
"""

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from bencher_runner.host.cpus import CpuLayout
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.errors import CanceledError, RunnerError
from bencher_runner.spec.launch import Launch
from bencher_runner.spec.results import IterationOutput, SandboxInfo

TIMEOUT_EXIT_CODE = 124  # an iteration the deadline stopped, as `timeout(1)` reports it; its output is kept
RootKind = Literal["disk", "tree"]  # an ext4 image per iteration (VMs), or an unpacked tree (host)


@dataclass
class JobContext:
    """What a sandbox knows of its job for the job's whole life."""

    config: RunConfig
    cache: Path
    cancel: threading.Event
    warn: Callable[[str], None]
    phase: Callable[[str], None]
    layout: CpuLayout | None = None  # benchmark and housekeeping CPUs (None: no isolation)
    timings: dict[str, float] = field(default_factory=dict)  # the job's, shared
    metadata: dict[str, object] = field(default_factory=dict)  # the result's "host": tuning, CPUs, root disk
    interference: list[dict[str, Any] | None] = field(default_factory=list)  # host/interference.py, per run
    fingerprint: dict[str, Any] | None = None  # host/fingerprint.py, once per job

    def check_cancel(self, during: str) -> None:
        if self.cancel.is_set():
            raise CanceledError(f"the job was canceled {during}")

    def add_time(self, name: str, seconds: float) -> None:
        """Sum a phase over iterations."""
        self.timings[name] = self.timings.get(name, 0.0) + seconds


@dataclass(frozen=True)
class Iteration:
    index: int  # from 0
    label: str  # "iteration 2/5"
    dir: Path  # the iteration's own directory (removed with the job's work dir)
    root: Path  # its own copy of the root disk (root_kind "disk") or tree ("tree")
    deadline: float  # the job's: a late iteration gets only the time that is left


@dataclass(frozen=True)
class IterationRun:
    """An iteration whose command ran to its end (any exit code)."""

    output: IterationOutput
    command_s: float  # the command's own run time (build_time)
    file_sizes: dict[str, int] = field(default_factory=dict)  # each output file's full size


class IterationStopped(Exception):
    """The iteration ended without a normal result. ``partial`` (output so far) is kept in the job's
    results; ``ran`` (e.g. "which ran 3.2 s and was killed") says that the job's deadline stopped it,
    else ``error`` is why it failed."""

    def __init__(
        self, partial: IterationOutput | None, *, error: RunnerError | None = None, ran: str | None = None
    ) -> None:
        super().__init__(ran or str(error))
        self.partial = partial
        self.error = error
        self.ran = ran


class Session(Protocol):
    """A prepared job in a backend (its network, its initramfs...): runs iterations one by one."""

    def run(self, iteration: Iteration) -> IterationRun: ...


class Sandbox(Protocol):
    root_kind: RootKind  # what each iteration's ``root`` is

    def check(self) -> None:
        """Refuse (RunnerError) before any work what this host cannot run (e.g. no jail tools)."""

    def prepare(self) -> SandboxInfo:
        """After the pull: find the VMM, the kernel and the accelerator; say what will run the job."""

    def session(self, work: Path, launch: Launch) -> AbstractContextManager[Session]:
        """The job's resources for all its iterations, removed when the block exits."""
