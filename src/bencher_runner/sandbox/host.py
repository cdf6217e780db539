"""No sandbox (`--sandbox none`): run the command directly on the host from the unpacked tree.

For people testing an image quickly and for trusted jobs only (the daemon refuses such jobs unless
started with --danger-allow-no-sandbox). The environment is cleared then set, the program and the
working dir and output files are resolved inside the tree (symlinks followed at most --max-symlinks
times, never out of it), the image's user is taken when the runner is root, stdout/stderr are
capped like the guest agent caps them (read and dropped, so the command never blocks), and the
job's deadline (a time.monotonic() instant: the timeout covers the whole job, not one iteration)
kills the whole process group.

Paths are resolved by a ``Resolver`` the caller hands in (the job passes ``oci.unpack.resolve_in_tree``,
the walker that unpacked the tree): a sandbox does not import the image layer, so the dependency is
inverted here rather than the walker moved out of the unpacker it shares its fd cache with.
"""

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from bencher_runner.host.fingerprint import host_fingerprint
from bencher_runner.sandbox.backend import (
    TIMEOUT_EXIT_CODE,
    Iteration,
    IterationRun,
    IterationStopped,
    JobContext,
    RootKind,
)
from bencher_runner.spec.errors import CanceledError, ImageError
from bencher_runner.spec.launch import Launch
from bencher_runner.spec.results import IterationOutput, SandboxInfo

READ_CHUNK = 64 * 1024


class Resolver(Protocol):
    """Where ``path`` (absolute in the image, symlinks followed inside ``tree``) lies; None if absent."""

    def __call__(self, tree: Path, path: str, /, *, max_symlinks: int) -> Path | None: ...


@dataclass
class CappedStream:
    limit: int
    data: bytearray = field(default_factory=bytearray)
    total: int = 0

    def drain(self, pipe: IO[bytes]) -> None:
        while chunk := pipe.read1(READ_CHUNK):  # type: ignore[attr-defined]
            self.total += len(chunk)
            room = self.limit - len(self.data)
            if room > 0:
                self.data += chunk[:room]


@dataclass(frozen=True)
class HostRun:
    exit_code: int
    stdout: CappedStream
    stderr: CappedStream
    files: dict[str, bytes]
    file_sizes: dict[str, int]
    missing: dict[str, str]
    timed_out: bool
    elapsed_s: float


def find_program(tree: Path, launch: Launch, max_symlinks: int, resolve: Resolver) -> Path | None:
    """argv[0] inside the tree: a path as given (relative to the working dir), else a PATH search."""
    program = launch.argv[0]
    if "/" in program:
        candidates = [program if program.startswith("/") else f"{launch.cwd.rstrip('/')}/{program}"]
    else:
        search = dict(launch.env).get("PATH", "")
        candidates = [f"{d.rstrip('/') or ''}/{program}" for d in search.split(":") if d.startswith("/")]
    for candidate in candidates:
        found = resolve(tree, candidate, max_symlinks=max_symlinks)
        if found is not None and found.is_file():
            return found
    return None


def run_on_host(
    tree: Path,
    launch: Launch,
    *,
    deadline: float,
    max_output: int,
    outputs: tuple[str, ...],
    max_symlinks: int,
    cancel: threading.Event,
    resolve: Resolver,
) -> HostRun:
    started = time.monotonic()
    stdout, stderr = CappedStream(max_output), CappedStream(max_output)
    program = find_program(tree, launch, max_symlinks, resolve)
    cwd = resolve(tree, launch.cwd, max_symlinks=max_symlinks)
    if program is None or cwd is None or not cwd.is_dir():
        what = f'exec "{launch.argv[0]}"' if program is None else f'chdir "{launch.cwd}"'
        stderr.data += f"bencher-runner: {what}: No such file or directory\n".encode()
        return HostRun(127, stdout, stderr, {}, {}, {}, False, 0.0)
    as_root = os.geteuid() == 0
    proc = subprocess.Popen(
        list(launch.argv),  # argv[0] as given (busybox-style programs dispatch on it)
        executable=str(program),
        cwd=cwd,
        env=dict(launch.env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        user=launch.user.uid if as_root else None,
        group=launch.user.gid if as_root else None,
        extra_groups=list(launch.user.groups) if as_root else None,
    )
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=stream.drain, args=(pipe,), daemon=True)
        for stream, pipe in ((stdout, proc.stdout), (stderr, proc.stderr))
    ]
    for reader in readers:
        reader.start()
    timed_out = False
    while proc.poll() is None:
        if cancel.is_set() or time.monotonic() >= deadline:
            timed_out = not cancel.is_set()
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the command and everything it started
    code = proc.wait()
    for reader in readers:
        reader.join(timeout=2)
    elapsed = time.monotonic() - started
    exit_code = 128 - code if code < 0 else code
    files, sizes, missing = collect_files(tree, launch.cwd, outputs, max_output, max_symlinks, resolve)
    return HostRun(exit_code, stdout, stderr, files, sizes, missing, timed_out, elapsed)


def collect_files(
    tree: Path, cwd: str, outputs: tuple[str, ...], max_output: int, max_symlinks: int, resolve: Resolver
) -> tuple[dict[str, bytes], dict[str, int], dict[str, str]]:
    files: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    missing: dict[str, str] = {}
    for path in outputs:
        absolute = path if path.startswith("/") else f"{cwd.rstrip('/')}/{path}"
        try:
            found = resolve(tree, absolute, max_symlinks=max_symlinks)
        except ImageError as err:  # too many symlinks: report it, do not fail the job
            missing[path] = str(err)
            continue
        if found is None or not found.is_file():
            missing[path] = "No such file or directory" if found is None else "not a regular file"
            continue
        with found.open("rb") as f:
            files[path] = f.read(max_output)
            sizes[path] = os.fstat(f.fileno()).st_size
    return files, sizes, missing


class HostSandbox:
    """No sandbox: each iteration runs the command in its own copy of the unpacked tree."""

    root_kind: RootKind = "tree"

    def __init__(self, ctx: JobContext, resolve: Resolver) -> None:
        self.ctx = ctx
        self.resolve = resolve

    def check(self) -> None:
        pass

    def prepare(self) -> SandboxInfo:
        self.ctx.warn("--sandbox none: the benchmark runs directly on this host, unisolated")
        self.ctx.fingerprint = host_fingerprint(accel="none", tuning=self.ctx.metadata.get("tuning"))
        job = self.ctx.config.job
        return SandboxInfo("none", "none", job.vcpus, job.memory_mib, job.disk_mib, True)

    @contextlib.contextmanager
    def session(self, work: Path, launch: Launch) -> Iterator["HostSession"]:
        yield HostSession(self.ctx, launch, self.resolve)


class HostSession:
    def __init__(self, ctx: JobContext, launch: Launch, resolve: Resolver) -> None:
        self.ctx = ctx
        self.launch = launch
        self.resolve = resolve

    def run(self, it: Iteration) -> IterationRun:
        job, host = self.ctx.config.job, self.ctx.config.host
        self.ctx.phase(f"{it.label}: running on the host (no sandbox)")
        run = run_on_host(
            it.root,
            self.launch,
            deadline=it.deadline,
            max_output=host.max_output_bytes,
            outputs=job.output_paths,
            max_symlinks=host.max_symlinks,
            cancel=self.ctx.cancel,
            resolve=self.resolve,
        )
        self.ctx.timings["command_s"] = run.elapsed_s
        output = IterationOutput(
            exit_code=TIMEOUT_EXIT_CODE if run.timed_out else run.exit_code,
            stdout=bytes(run.stdout.data),
            stderr=bytes(run.stderr.data),
            output=run.files,
            missing=run.missing,
            truncated=tuple(
                [n for n, s in (("stdout", run.stdout), ("stderr", run.stderr)) if s.total > len(s.data)]
                + [p for p, data in run.files.items() if run.file_sizes[p] > len(data)]
            ),
        )
        if self.ctx.cancel.is_set():
            raise IterationStopped(
                output, error=CanceledError("the job was canceled while the benchmark ran")
            )
        if run.timed_out:
            raise IterationStopped(output, ran=f"which ran {run.elapsed_s:.1f} s and was killed")
        return IterationRun(output, run.elapsed_s, run.file_sizes)
