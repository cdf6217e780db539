"""The guest's initramfs: the agent as /init, the kernel modules it loads (none, and no module
directory, for a kernel with its drivers built in), and the job's config.

Written by hand in the newc cpio format (a fixed, 110-byte ASCII header per file) because no
well-kept Python library writes cpio, and a subprocess per job would cost more than the ~40 lines
below. The base archive (agent + modules) is built once per (agent, modules) content and cached;
each job appends a second tiny archive holding ``/bencher/job``. The kernel unpacks concatenated
archives in order, so nothing per-job is written into the image's root filesystem.
"""

import hashlib
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bencher_runner.atomicfile import write_atomic

JOB_CONFIG_PATH = "bencher/job"
MODULES_DIR = "bencher/modules"


@dataclass(frozen=True)
class CpioEntry:
    name: str  # relative, no leading slash
    mode: int  # full st_mode (type + permissions)
    data: bytes = b""


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """A complete newc archive (with its TRAILER!!!) of the given entries."""
    out = bytearray()
    ino = 1
    for entry in [*entries, CpioEntry("TRAILER!!!", 0)]:
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, 0, 0, len(name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
        ino += 1
    return bytes(out)


def base_entries(agent: Path, modules: Iterable[Path]) -> list[CpioEntry]:
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755) for d in ("dev", "proc", "sys", "newroot", "bencher")]
    modules = list(modules)
    if modules:  # no directory at all for a kernel without modules: the agent skips the step
        entries.append(CpioEntry(MODULES_DIR, stat.S_IFDIR | 0o755))
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, agent.read_bytes()))
    for index, module in enumerate(modules):
        name = f"{MODULES_DIR}/{index:02d}-{module.name}"
        entries.append(CpioEntry(name, stat.S_IFREG | 0o644, module.read_bytes()))
    return entries


def job_archive(job_config: bytes) -> bytes:
    return newc_archive([CpioEntry(JOB_CONFIG_PATH, stat.S_IFREG | 0o600, job_config)])


def base_initramfs(cache: Path, agent: Path, modules: Iterable[Path]) -> Path:
    """Path of the cached base archive for this agent and module set, building it if needed."""
    modules = list(modules)
    key = hashlib.sha256()
    for path in (agent, *modules):
        key.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    target = cache / "initramfs" / f"{key.hexdigest()[:32]}.cpio"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # atomic: concurrent runners never see a half-written archive
        write_atomic(target, newc_archive(base_entries(agent, modules)))
    return target


def write_job_initramfs(base: Path, job_config: bytes, dest: Path) -> None:
    """The job's initramfs: the cached base archive followed by the job's config archive."""
    with dest.open("wb") as out:
        out.write(base.read_bytes())
        out.write(job_archive(job_config))
