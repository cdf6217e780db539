"""Click options that `runner run` and `runner daemon` share, defined once so they never drift."""

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bencher_runner.sandbox.outputdisk import MAX_OUTPUT_LIMIT
from bencher_runner.spec.config import DEFAULT_JAIL_UID, DEFAULT_MAX_OUTPUT, MAX_ID, MIN_DISK_MIB
from bencher_runner.spec.jobspec import DEFAULT_MAX_DISK_MIB

F = TypeVar("F", bound=Callable[..., Any])

SHARED_JOB_OPTIONS = (
    click.option(
        "--max-output-size",
        type=click.IntRange(0, MAX_OUTPUT_LIMIT),
        default=DEFAULT_MAX_OUTPUT,
        show_default=True,
        help="Byte cap for stdout, for stderr and for each output file (the benchmark never blocks on it; "
        f"at most {MAX_OUTPUT_LIMIT}, what the output disk's records hold).",
    ),
    click.option(
        "--max-disk",
        type=click.IntRange(MIN_DISK_MIB),
        default=DEFAULT_MAX_DISK_MIB,
        show_default=True,
        help="Largest root disk in MiB a job may ask for (--disk, spec.disk); free space is checked too.",
    ),
    click.option(
        "--max-file-count",
        type=click.IntRange(0),
        default=255,
        show_default=True,
        help="Most output files a job may request.",
    ),
    click.option(
        "--grace-period",
        type=click.IntRange(1, 900),
        default=1,
        show_default=True,
        help="Seconds the guest gets to write its results after the command exits.",
    ),
    click.option(
        "--accel",
        type=click.Choice(["auto", "kvm", "tcg"]),
        default="auto",
        show_default=True,
        help="auto: KVM if it really boots a guest on this host, else TCG (emulated, with a warning).",
    ),
    click.option(
        "--network-mode",
        type=click.Choice(["user", "tap"]),
        default="user",
        show_default=True,
        help="Jobs with network: QEMU user-mode NAT, or a TAP in a per-job namespace (root; Firecracker).",
    ),
    click.option(
        "--firecracker",
        "firecracker_bin",
        type=click.Path(path_type=Path),
        envvar="BENCHER_RUNNER_FIRECRACKER",
        help="With --sandbox firecracker: the firecracker binary (default: from PATH).",
    ),
    click.option(
        "--jail-uid",
        type=click.IntRange(1, MAX_ID),
        default=DEFAULT_JAIL_UID,
        show_default=True,
        help="The unprivileged uid every VMM runs as in its jail (no login account; 0 is refused).",
    ),
    click.option(
        "--jail-gid",
        type=click.IntRange(1, MAX_ID),
        default=DEFAULT_JAIL_UID,
        show_default=True,
        help="The gid every VMM runs as in its jail (0 is refused).",
    ),
    click.option(
        "--danger-no-jail",
        is_flag=True,
        help="Development hosts only: run the VMM without its jail (as this user, in the host's "
        "namespaces, seeing its files); a warning on every job.",
    ),
)


def shared_job_options(func: F) -> F:
    for option in reversed(SHARED_JOB_OPTIONS):
        func = option(func)
    return func
