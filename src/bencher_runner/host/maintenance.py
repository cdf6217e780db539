"""The host's maintenance state in /run/bencher-runner: drain markers, one daemon per host, one job at a time.

- **Drain markers** (`maintenance`, or `maintenance.<name>` so that several tools can each hold one):
  while any exists, `runner up` finishes its running job and then asks for no new one (it stays
  connected). `runner drain`/`runner undrain` create and remove them; a package upgrade or a RAID tool
  can do the same with `touch`/`rm`.
- **The daemon lock** (`daemon.lock`, flock, holder's pid inside): a second `runner up` on the host
  refuses to start, naming the first one's pid.
- **The job lock** (`job.lock`, flock): held by whoever runs a job (the daemon's worker or `runner
  run`), so a local `runner run` waits for the daemon's job instead of racing it for the CPUs, and the
  daemon asks for no job while a local run holds it.
- **The daemon's status** (`daemon.json`: pid, state, job), rewritten atomically when it changes, so
  `runner drain --wait` can tell when nothing runs and nothing can start.

flock locks die with their holder (a killed runner leaves no stale lock); the pid and status files are
only information. The directory is /run/bencher-runner (tmpfs: a reboot starts clean), or
BENCHER_RUNNER_RUN_DIR.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bencher_runner.atomicfile import write_atomic
from bencher_runner.spec.errors import RunnerError, SpecError

DEFAULT_RUN_DIR = Path("/run/bencher-runner")
MARKER = "maintenance"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DAEMON_LOCK = "daemon.lock"
JOB_LOCK = "job.lock"
STATUS = "daemon.json"


def run_dir() -> Path:
    value = os.environ.get("BENCHER_RUNNER_RUN_DIR")
    return Path(value) if value else DEFAULT_RUN_DIR


def _ensure(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    return directory


# -- drain markers ---------------------------------------------------------------------------------


def marker_path(directory: Path, name: str | None = None) -> Path:
    if name is None:
        return directory / MARKER
    if not _NAME.match(name):
        raise SpecError(f"--name={name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return directory / f"{MARKER}.{name}"


def markers(directory: Path) -> list[str]:
    """The drain markers present, by name (`maintenance` itself is named "")."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [n for n in names if n == MARKER or n.startswith(MARKER + ".")]
    return sorted(n[len(MARKER) + 1 :] for n in found)


def drain(directory: Path, name: str | None = None, why: str = "") -> Path:
    path = marker_path(_ensure(directory), name)
    path.write_text(json.dumps({"pid": os.getpid(), "since": time.time(), "why": why}) + "\n")
    return path


def undrain(directory: Path, name: str | None = None, *, every: bool = False) -> list[str]:
    """Remove one marker (or every marker); the names removed."""
    names = markers(directory) if every else ["" if name is None else name]
    removed = []
    for n in names:
        try:
            marker_path(directory, n or None).unlink()
            removed.append(n)
        except FileNotFoundError:
            pass
    return removed


# -- locks -----------------------------------------------------------------------------------------


class HostBusyError(RunnerError):
    """Another runner holds the lock."""


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another process"
    return f"pid {pid}" if pid.isdigit() else "another process"


@dataclass
class HeldLock:
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _mark_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def take_daemon_lock(directory: Path) -> HeldLock:
    """Held for the daemon's life; HostBusyError naming the holder when another daemon has it."""
    path = _ensure(directory) / DAEMON_LOCK
    fd = _open_lock(path)
    if not _try_lock(fd):
        os.close(fd)
        raise HostBusyError(
            f"another `runner up` ({_holder(path)}) already serves this host ({path}); one runner per "
            "host keeps benchmarks from sharing CPUs: stop it first (systemctl stop bencher-runner)"
        )
    _mark_holder(fd)
    return HeldLock(path, fd)


def _is_held(path: Path) -> bool:
    """Whether another process holds the flock on ``path`` (a missing file is not held)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return not _try_lock(fd)  # our probe lock, if it took, is released with the fd
    finally:
        os.close(fd)


def daemon_pid(directory: Path) -> int | None:
    """The pid of the daemon holding the host (-1 if unreadable), or None when no daemon runs."""
    path = directory / DAEMON_LOCK
    if not _is_held(path):
        return None
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if text.isdigit():
            return int(text)
    return -1


@contextlib.contextmanager
def job_lock(
    directory: Path,
    *,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[None]:
    """Hold the host's job lock while the body runs. With ``wait``, wait for it (calling ``on_wait``
    once with who holds it; a set ``cancel`` ends the wait with HostBusyError); without, refuse at once."""
    path = _ensure(directory) / JOB_LOCK
    fd = _open_lock(path)
    try:
        if not _try_lock(fd):
            holder = _holder(path)
            if not wait:
                raise HostBusyError(
                    f"a job of {holder} is running on this host ({path}); wait for it (drop --no-wait)"
                )
            if on_wait is not None:
                on_wait(f"waiting for the job of {holder} to finish ({path})")
            while not _try_lock(fd):
                if cancel is not None and cancel.wait(0.2):
                    raise HostBusyError(f"canceled while waiting for the job of {holder} to finish")
                if cancel is None:
                    time.sleep(0.2)
        _mark_holder(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def host_job_lock(
    *,
    wait: bool,
    on_wait: Callable[[str], None],
    warn: Callable[[str], None],
    cancel: threading.Event | None = None,
) -> Iterator[None]:
    """`job_lock` in this host's run dir; where that directory cannot be made (not root), the job runs
    without it and says so."""
    directory = run_dir()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(job_lock(directory, wait=wait, on_wait=on_wait, cancel=cancel))
        except OSError as err:
            warn(f"running without the host's job lock ({directory}: {err.strerror or err})")
        yield


def job_lock_holder(directory: Path) -> str | None:
    """Who holds the job lock (e.g. "pid 1234"), or None when it is free."""
    path = directory / JOB_LOCK
    return _holder(path) if _is_held(path) else None


# -- the daemon's status ---------------------------------------------------------------------------


def write_status(directory: Path, status: dict[str, Any]) -> None:
    doc = {"pid": os.getpid(), "time": time.time(), **status}
    with contextlib.suppress(OSError):  # advisory, rewritten on every change: no fsync
        write_atomic(directory / STATUS, json.dumps(doc) + "\n", durable=False)


def read_status(directory: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((directory / STATUS).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def wait_until_idle(directory: Path, timeout: float, *, say: Callable[[str], None]) -> str | None:
    """Wait until no job runs and none can start: the job lock is free and, if a daemon serves the
    host, it has said since the newest marker appeared that it is paused (or it is disconnected or
    stopped; its open poll for a job may first have to end). None when reached, else why not."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        holder = job_lock_holder(directory)
        pid = daemon_pid(directory)
        busy = holder is not None
        if pid is not None and not busy:
            status = read_status(directory) or {}
            fresh = float(status.get("time", 0)) >= _newest_marker(directory)
            busy = not (fresh and status.get("state") in ("paused", "stopped", "disconnected"))
        if not busy:
            return None
        if not said:
            what = f"the job of {holder}" if holder else f"runner up (pid {pid}) to stop asking for jobs"
            say(f"waiting for {what}")
            said = True
        if time.monotonic() >= deadline:
            return (
                f"a job still runs or can start after {timeout:g} s (see `systemctl status bencher-runner`)"
            )
        time.sleep(0.2)


def _newest_marker(directory: Path) -> float:
    times = [0.0]
    for name in markers(directory):
        with contextlib.suppress(OSError):
            times.append(marker_path(directory, name or None).stat().st_mtime)
    return max(times)
