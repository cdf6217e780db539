"""Start-up recovery after a runner was killed: restore the host tuning it applied, remove its work dirs,
network namespaces and whatever of its VM jails is left. Its own module, imported at every start, so it
stays light: it does not load the VM and image stack that `job.py` needs (the daemon's idle memory is
what this saves).

A jail (sandbox/jail.py) keeps its mounts in its own mount namespace, which dies with its processes, and
its VMM dies with the runner (bwrap's init gets PR_SET_PDEATHSIG); what can outlive a killed runner is a
work dir, a job network namespace, a Firecracker jailer's chroot, and (if the death chain broke) a
process of the jail uid. The jail uid belongs to the runner alone: a process of it that init has
adopted (its runner and jail are gone), and what it started, is a leftover; it is killed only when no
live job holds a work dir of this cache, so a live job's VMM (a child of its bwrap or runner) is safe
twice over.
"""

import contextlib
import fcntl
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from bencher_runner.host.tuning import restore_leftover_tuning
from bencher_runner.paths import work_root
from bencher_runner.sandbox.netns import release_stale_network
from bencher_runner.spec.config import DEFAULT_JAIL_UID
from bencher_runner.staging import remove_memory_tree

LOCK_NAME = ".lock"
STARTING_GRACE_S = 60
JAILER_ROOT = Path("/srv/jailer/firecracker")  # the jailer's default chroot base, firecracker's dir
JAILER_VM_PREFIX = "bencher-"  # firecracker.new_vm_id
PROC = Path("/proc")


def _live(work: Path) -> bool:
    """A job holds this work dir (its lock is taken), or it is one starting right now."""
    try:
        lock = os.open(work / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # killed before it took its lock, or a job starting right now
        try:
            return time.time() - work.stat().st_mtime < STARTING_GRACE_S
        except OSError:
            return False
    except OSError:
        return True  # cannot tell: leave it
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(lock)


def remove_stale_work_dirs(cache: Path) -> list[Path]:
    """Remove work dirs no live job holds (left by a runner that was killed); returns them."""
    removed = []
    root = work_root(cache)
    for work in sorted(root.glob("job-*")) if root.is_dir() else []:
        if _live(work):
            continue
        for holder in (work, *sorted(work.glob("iter-*"))):  # a jailed VMM's netns is per iteration
            release_stale_network(holder)
        remove_memory_tree(work)
        shutil.rmtree(work, ignore_errors=True)
        removed.append(work)
    return removed


def live_jobs(cache: Path) -> bool:
    root = work_root(cache)
    return root.is_dir() and any(_live(work) for work in root.glob("job-*"))


def jail_uid_processes(uid: int, proc: Path = PROC) -> dict[int, int]:
    """PID -> parent PID of every process whose real uid is ``uid``."""
    found = {}
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = dict(
                line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line
            )
            if int(fields["Uid"].split()[0]) == uid:
                found[int(entry.name)] = int(fields["PPid"])
    return found


def orphaned_jail_processes(uid: int, proc: Path = PROC) -> list[int]:
    """The jail uid's processes that init adopted, and their descendants of the same uid."""
    parents = jail_uid_processes(uid, proc)
    orphans = {pid for pid, ppid in parents.items() if ppid == 1}
    while True:
        more = {pid for pid, ppid in parents.items() if ppid in orphans} - orphans
        if not more:
            return sorted(orphans)
        orphans |= more


def kill_jail_processes(uid: int, proc: Path = PROC) -> list[int]:
    """SIGKILL the jail uid's orphaned processes (only when no live job runs); returns their PIDs."""
    if uid == 0:
        return []  # never: a misconfiguration cannot make this kill root's processes
    killed = []
    for pid in orphaned_jail_processes(uid, proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def remove_stale_jailer_roots(root: Path = JAILER_ROOT) -> list[Path]:
    """The chroots the Firecracker jailer made for this runner's VMs (only when no live job runs)."""
    removed = []
    for instance in sorted(root.glob(f"{JAILER_VM_PREFIX}*")) if root.is_dir() else []:
        shutil.rmtree(instance, ignore_errors=True)
        removed.append(instance)
    return removed


def secure_dir(path: Path) -> None:
    """Root-only (0700): the jail uid (or any other user) can neither list nor read it."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.geteuid():
            path.chmod(0o700)


def recover_from_crash(
    cache: Path,
    *,
    warn: Callable[[str], None],
    info: Callable[[str], None],
    jail_uid: int = DEFAULT_JAIL_UID,
    state: Path | None = None,
) -> None:
    """What a killed runner left: restore the host tuning it applied, remove its work dirs, networks
    and jails; cache and state stay root-only."""
    for private in (cache, state):
        if private is not None:
            secure_dir(private)
    restore_leftover_tuning(log=warn)
    for leftover in remove_stale_work_dirs(cache):
        info(f"removed {leftover.name}, left by a runner that was killed")
    if live_jobs(cache):
        return  # its VMM runs as the jail uid too
    killed = kill_jail_processes(jail_uid)
    if killed:
        warn(f"killed {len(killed)} process(es) of the jail uid {jail_uid} left by a runner that was killed")
    for chroot in remove_stale_jailer_roots():
        info(f"removed the jailer chroot {chroot}, left by a runner that was killed")
