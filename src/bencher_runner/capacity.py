"""What this host can give a job, checked before any work is done (pull, unpack, mkfs, boot).

A job asking for more than the host has used to fail late and leave debris: `--disk 2097152` built a
33.8 GB template before its copy failed, `--memory 999999999` was refused by QEMU only after unpack
and mkfs. So before anything is written: the guest's memory against the host's RAM, the root and
output disks against the free space of the filesystem that holds the work directory (with ext4's
metadata and a margin; spare disks count as free), and the work path against what QEMU's -drive
syntax can take.
"""

from pathlib import Path

from bencher_runner.paths import work_root
from bencher_runner.rootfs import free_bytes
from bencher_runner.sandbox.outputdisk import output_disk_size
from bencher_runner.sparedisk import SpareDisks
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.errors import RootfsError, SpecError
from bencher_runner.spec.units import MIB

MEMINFO = Path("/proc/meminfo")
DISK_MARGIN = 256 * MIB  # left free on the host filesystem, for logs, the initramfs, the kernel
# ext4 metadata of the (sparse) cached template, written by mkfs: inode tables are 1/16 of a disk
# below 512 MiB (one 256-byte inode per 4 KiB), 1/64 above, plus the journal.
METADATA_FRACTION = 16


def check_host_capacity(config: RunConfig, cache: Path, *, meminfo: Path = MEMINFO) -> None:
    """SpecError or RootfsError, naming the value and the fix, when this host cannot run ``config``."""
    if config.backend == "none":
        return  # no VM: the command runs in the unpacked tree
    work = work_root(cache)
    if config.backend == "qemu" and "," in str(work):
        raise SpecError(
            f"the work directory {work} contains a comma, which QEMU's -drive option cannot take; "
            "pass a --cache-dir without commas"
        )
    total = mem_total_mib(meminfo)
    if total is not None and config.job.memory_mib > total:
        raise SpecError(
            f"the guest asks for {config.job.memory_mib} MiB of memory but this host has {total} MiB in all; "
            "ask for less (--memory, spec.memory)"
        )
    disk = config.job.disk_mib * MIB
    output = output_disk_size(len(config.job.output_paths), config.host.max_output_bytes)
    need = disk + disk // METADATA_FRACTION + output + DISK_MARGIN
    free, where = free_bytes(work)
    spares = SpareDisks(cache)
    if free is not None and free_bytes(spares.root)[1] == where:
        free += spares.allocated_bytes()  # spare disks are this job's, or dropped before it needs room
    if free is not None and need > free:
        raise RootfsError(
            f"the job needs about {need // MIB} MiB free on the filesystem of {work} (a "
            f"{config.job.disk_mib} MiB root disk, a {-(-output // MIB)} MiB output disk, ext4 metadata "
            f"and a {DISK_MARGIN // MIB} MiB margin), but {where} has only {free // MIB} MiB free; "
            "ask for a smaller disk (--disk, spec.disk), free space there, or point --cache-dir at a "
            "larger filesystem"
        )


def mem_total_mib(meminfo: Path = MEMINFO) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
