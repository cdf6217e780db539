"""The VM monitor process (QEMU or Firecracker), started and stopped the same way for every backend.

It runs in its own session, so one killpg takes it and anything it started, and with PR_SET_PDEATHSIG,
so it dies with the runner thread that started it (start and wait from the same thread). The kernel
clears PR_SET_PDEATHSIG when a process changes credentials, so a jailed Firecracker loses it; a jailed
QEMU runs as the child of bwrap's init, which keeps it (jail.py). Its environment is only what it is
given (the jail's is empty): never the runner's, which may hold the runner key.
"""

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO

PR_SET_PDEATHSIG = 1
KILL_WAIT_S = 5.0


def _child_setup(cpus: tuple[int, ...] | None) -> Callable[[], None]:
    """In the child before exec: die with the runner, and run on the given cores (threads inherit)."""

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class VmProcess:
    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdout: IO[bytes],
        stderr: IO[bytes],
        cpus: tuple[int, ...] | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=dict(env or {}),  # the runner's environment (BENCHER_RUNNER_KEY...) never reaches a VMM
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            preexec_fn=_child_setup(cpus),  # prctl and affinity only: no locks taken
        )
        self.also_kill: list[int] = []  # processes outside its session: a jailed VMM (setsid in the jail)
        # Readable the moment the VMM exits: Popen.wait(timeout) polls with sleeps of up to 50 ms,
        # which every iteration paid (about 25 ms on average) after the guest had powered off.
        try:
            self._pidfd: int | None = os.pidfd_open(self.proc.pid)
        except OSError:  # a kernel before 5.3: Popen's polling
            self._pidfd = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        status = self.proc.poll()
        if status is not None:
            self._close_pidfd()
        return status

    def wait(self, deadline: float) -> int | None:
        """Exit status, or None if it still runs at ``deadline`` (a time.monotonic value)."""
        timeout = max(0.0, deadline - time.monotonic())
        if self._pidfd is not None and self.proc.returncode is None:
            if not select.select([self._pidfd], [], [], timeout)[0]:
                return None
            status = self.proc.wait()
            self._close_pidfd()
            return status
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._close_pidfd()
        return status

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def kill(self) -> None:
        """SIGKILL the whole session (and ``also_kill``), reap the process, wait for the others to go."""
        for pid in self.also_kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close_pidfd()
        deadline = time.monotonic() + KILL_WAIT_S
        while any(_alive(pid) for pid in self.also_kill) and time.monotonic() < deadline:
            time.sleep(0.005)


def _alive(pid: int) -> bool:
    """Still there and not a zombie (a zombie holds no file open)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


class RunsAsVmProcess:
    """What every backend's VM answers the same way, from the VmProcess it started (``_proc``)."""

    _proc: VmProcess | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def wait(self, deadline: float) -> int | None:
        """Exit status, or None if the VM is still running at ``deadline`` (a time.monotonic value)."""
        assert self._proc is not None
        return self._proc.wait(deadline)
