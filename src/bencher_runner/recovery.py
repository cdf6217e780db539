"""Start-up recovery after a runner was killed: restore the host tuning it applied, remove its work dirs
and network namespaces. Its own module, imported at every start, so it stays light: it does not load the
VM and image stack that `job.py` needs (the daemon's idle memory is what this saves).
"""

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from bencher_runner.host.tuning import restore_leftover_tuning
from bencher_runner.paths import work_root
from bencher_runner.sandbox.netns import release_stale_network
from bencher_runner.staging import remove_memory_tree

LOCK_NAME = ".lock"
STARTING_GRACE_S = 60


def remove_stale_work_dirs(cache: Path) -> list[Path]:
    """Remove work dirs no live job holds (left by a runner that was killed); returns them."""
    removed = []
    root = work_root(cache)
    for work in sorted(root.glob("job-*")) if root.is_dir() else []:
        try:
            lock = os.open(work / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            lock = None  # killed before it took its lock, or a job starting right now
            with contextlib.suppress(OSError):
                if time.time() - work.stat().st_mtime < STARTING_GRACE_S:
                    continue
        except OSError:
            continue
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live job
        finally:
            if lock is not None:
                os.close(lock)
        release_stale_network(work)
        remove_memory_tree(work)
        shutil.rmtree(work, ignore_errors=True)
        removed.append(work)
    return removed


def recover_from_crash(cache: Path, *, warn: Callable[[str], None], info: Callable[[str], None]) -> None:
    """What a killed runner left: restore the host tuning it applied, remove its work dirs and networks."""
    restore_leftover_tuning(log=warn)
    for leftover in remove_stale_work_dirs(cache):
        info(f"removed {leftover.name}, left by a runner that was killed")
