"""Spare root disks: the next job's (or iteration's) disk copied from its template while the runner
is idle, so that the job takes it with one rename instead of copying the template's data first.

A warm job (same manifest digest: the template is cached) spends most of its prep copying the
template's data extents into the iteration's own fully allocated disk (about 0.12 s for the realistic
image's 1024 MiB disk here). The daemon has idle time after every job; a copy made then, for the
template the last job used, takes that copy off the next job's critical path. It is made under the
host's job lock, between jobs, never while a benchmark runs: the daemon stops a refill between two
copies before a job starts (``RefillThread``), and a job that takes the lock waits out at most one copy.

- A spare is a plain copy of a template (``copy_disk``: fully allocated, so the guest can never
  over-commit the host's disk), never given to a guest before a job takes it: taking one *moves* it
  into the iteration's directory (``os.rename``: atomic, so two takers cannot get the same disk).
- The spares are for one template only, the last job's (``want``): a job on another image drops them
  first, so they never cost a job space it needs (capacity.py counts them as free).
- Bounded: at most the last job's iteration count, at most MAX_SPARE_BYTES, and never below
  KEEP_FREE_BYTES free on the filesystem. Partial copies are named ``.tmp`` and removed by the next
  refill (one refill at a time: a lock); `runner cache prune --all` removes the spares.

`runner run` takes a spare when one is there but makes none (it has no idle time: the copy would
only move from the start of this run to the end of it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bencher_runner.atomicfile import write_atomic
from bencher_runner.rootfs import Template, TemplateCache, copy_disk, free_bytes
from bencher_runner.spec.errors import RunnerError
from bencher_runner.spec.units import MIB

log = logging.getLogger(__name__)

MAX_SPARE_BYTES = 8192 * MIB
KEEP_FREE_BYTES = 4096 * MIB  # left free after a refill: a job of another image, logs, the preflight
WANTED = "wanted.json"
LOCK = ".lock"


KEY = re.compile(r"[a-z0-9]+-[0-9a-f]{32,128}-[0-9]+M-v[0-9]+")  # rootfs.template_key's shape


@dataclass(frozen=True)
class Wanted:
    """What the last job would want next: ``count`` spares of the template ``key`` (``disk``)."""

    key: str
    disk: Path
    count: int


class SpareDisks:
    def __init__(self, cache: Path) -> None:
        self.root = cache / "spare-disks"
        self.templates = TemplateCache(cache)

    def _spares(self, key: str | None = None) -> list[Path]:
        pattern = f"{key}.*.ext4" if key else "*.ext4"
        return sorted(self.root.glob(pattern)) if self.root.is_dir() else []

    def count(self, key: str | None) -> int:
        """Spares of the template ``key`` (None: of any)."""
        return len(self._spares(key))

    def take(self, key: str, dest: Path) -> bool:
        """Move one spare of the template ``key`` to ``dest`` (same filesystem); False when none is left."""
        for spare in self._spares(key):
            try:
                os.rename(spare, dest)
            except FileNotFoundError:  # another job took it first
                continue
            except OSError:  # e.g. EXDEV: the work dir is on another filesystem; spares are no use
                self.drop()
                return False
            return True
        return False

    def keep_only(self, key: str) -> None:
        """Drop the spares of every other template (before this job needs the space); one that cannot
        be removed stays (the capacity check then finds less room, as without spares)."""
        for spare in self._spares():
            if not spare.name.startswith(f"{key}."):
                try:
                    spare.unlink(missing_ok=True)
                except OSError as err:
                    log.debug("spare root disk %s not removed: %s", spare, err)

    def drop(self) -> None:
        """Remove every spare, and a copy a refill has under way (that refill then makes no spare)."""
        for spare in [*self._spares(), *(self.root.glob("*.tmp") if self.root.is_dir() else [])]:
            spare.unlink(missing_ok=True)

    def allocated_bytes(self) -> int:
        total = 0
        for spare in self._spares():
            with contextlib.suppress(OSError):
                total += spare.stat().st_blocks * 512
        return total

    def want(self, template: Template, count: int) -> None:
        """Record that the next job would like ``count`` spares of ``template`` (made by ``refill``).
        A wish that cannot be written (e.g. a full disk) costs the next job a copy, never this job."""
        doc = {"key": template.key, "count": count}
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self.root / WANTED, json.dumps(doc) + "\n", durable=False)
        except OSError as err:
            log.debug("no spare root disks wanted: %s", err)

    def wanted(self) -> Wanted | None:
        """The recorded wish; the template's path is the cache's own for the key, never a stored one."""
        try:
            doc = json.loads((self.root / WANTED).read_text())
            key, count = str(doc["key"]), int(doc["count"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not KEY.fullmatch(key):
            return None
        return Wanted(key, self.templates.root / f"{key}.ext4", count)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def refill(self, stop: threading.Event | None = None) -> int:
        """Copy spares of the wanted template until there are as many as wanted, the bounds are
        reached or ``stop`` is set (checked between copies); returns how many were made."""
        made = 0
        with self._locked():
            for tmp in self.root.glob("*.tmp"):  # a refill that was killed: one refill at a time
                tmp.unlink(missing_ok=True)
            wanted = self.wanted()
            if wanted is None or not wanted.disk.is_file():
                return 0
            self.keep_only(wanted.key)
            size = wanted.disk.stat().st_size
            while self.count(wanted.key) < wanted.count and not (stop and stop.is_set()):
                free, _ = free_bytes(self.root)
                if self.allocated_bytes() + size > MAX_SPARE_BYTES or (
                    free is not None and free - size < KEEP_FREE_BYTES
                ):
                    break
                name = f"{wanted.key}.{uuid.uuid4().hex[:12]}"
                tmp = self.root / f"{name}.tmp"
                try:
                    copy_disk(wanted.disk, tmp)  # removes tmp if it fails
                except (OSError, RunnerError) as err:
                    log.debug("no spare root disk: %s", err)
                    break  # e.g. the template was pruned meanwhile, or no room: no spare, no harm
                try:
                    os.rename(tmp, self.root / f"{name}.ext4")
                except FileNotFoundError:  # `runner cache prune` dropped it meanwhile
                    break
                made += 1
        return made


HostLock = Callable[[threading.Event], contextlib.AbstractContextManager[None]]


class RefillThread:
    """The daemon's refill between jobs: ``start`` after a job's result is out, ``stop`` before the
    next job (it returns once no copy runs)."""

    def __init__(self, cache: Path, host_lock: HostLock | None = None) -> None:
        self.spares = SpareDisks(cache)
        self.host_lock = host_lock  # the host's job lock (canceled by stop): never beside another job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.stop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spare-disks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self.host_lock(self._stop) if self.host_lock else contextlib.nullcontext():
                made = self.spares.refill(self._stop)
            log.debug("made %d spare root disk(s)", made)
        except Exception as err:  # a refill is an optimisation: a failure costs the next job a copy
            log.debug("no spare root disks: %s", err)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
