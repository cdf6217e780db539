"""The host settings' click options, shared by `runner run` and `runner daemon`, declared once, and
the one function that turns them into HostSettings with the same policy for both commands.

`@host_options` adds the options; `host_settings_from(kwargs, ...)` pops them from the command's
keyword arguments. A combination this host cannot run is refused here, with the same text whichever
command was given it.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bencher_runner.cli.types import SafePath
from bencher_runner.sandbox.outputdisk import MAX_OUTPUT_LIMIT
from bencher_runner.spec.config import (
    DEFAULT_GRACE_PERIOD_S,
    DEFAULT_JAIL_UID,
    DEFAULT_JAILER_CHROOT_BASE,
    DEFAULT_LOG_LEVEL,
    DEFAULT_MAX_DISK_MIB,
    DEFAULT_MAX_FILE_COUNT,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_SYMLINKS,
    LOG_LEVELS,
    MAX_DISK_MIB,
    MAX_FILE_COUNT,
    MAX_ID,
    MIN_DISK_MIB,
    HostSettings,
    make_host_settings,
)

F = TypeVar("F", bound=Callable[..., Any])

FIRECRACKER_ONLY = {
    "firecracker_bin": "--firecracker",
    "jailer": "--jailer",
    "jailer_chroot_base": "--jailer-chroot-base",
    "sandbox_log_level": "--sandbox-log-level",
}

HOST_OPTIONS = (
    click.option(
        "--accel",
        type=click.Choice(["auto", "kvm", "tcg"]),
        default="auto",
        show_default=True,
        help="auto: KVM if it really boots a guest on this host, else TCG (emulated, with a warning).",
    ),
    click.option(
        "--kernel",
        type=SafePath(path_type=Path, dir_okay=False),
        envvar="BENCHER_RUNNER_KERNEL",
        help="Guest kernel image (default: the built lean kernel, else the fetched Debian cloud kernel; "
        "`runner kernel show`).",
    ),
    click.option(
        "--kernel-modules",
        type=SafePath(path_type=Path, file_okay=False),
        envvar="BENCHER_RUNNER_KERNEL_MODULES",
        help="Directory with the kernel's modules (.ko), with --kernel.",
    ),
    click.option(
        "--network-mode",
        type=click.Choice(["user", "tap"]),
        default=None,
        help="Jobs with network: QEMU user-mode NAT (QEMU's default), or a TAP in a per-job namespace "
        "(root; Firecracker's only mode).",
    ),
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
        type=click.IntRange(MIN_DISK_MIB, MAX_DISK_MIB),
        default=DEFAULT_MAX_DISK_MIB,
        show_default=True,
        help="Largest root disk in MiB a job may ask for (--disk, spec.disk); free space is checked too.",
    ),
    click.option(
        "--max-file-count",
        type=click.IntRange(0, MAX_FILE_COUNT),
        default=DEFAULT_MAX_FILE_COUNT,
        show_default=True,
        help="Most output files a job may request.",
    ),
    click.option(
        "--grace-period",
        type=click.IntRange(1, 900),
        default=DEFAULT_GRACE_PERIOD_S,
        show_default=True,
        help="Seconds the guest gets to write its results after the command exits.",
    ),
    click.option(
        "--max-symlinks",
        type=click.IntRange(0),
        default=DEFAULT_MAX_SYMLINKS,
        show_default=True,
        help="Jobs without a sandbox: symlinks followed resolving a path in the image.",
    ),
    click.option(
        "--firecracker",
        "firecracker_bin",
        type=SafePath(path_type=Path, dir_okay=False),
        envvar="BENCHER_RUNNER_FIRECRACKER",
        help="With --sandbox firecracker: the firecracker binary (default: from PATH).",
    ),
    click.option(
        "--jailer",
        type=SafePath(path_type=Path, dir_okay=False),
        help="With --sandbox firecracker: run it under this jailer (required unless --danger-no-jail).",
    ),
    click.option(
        "--jailer-chroot-base",
        type=SafePath(path_type=Path, file_okay=False),
        default=DEFAULT_JAILER_CHROOT_BASE,
        show_default=True,
        help="With --sandbox firecracker: where the jailer builds each VM's chroot.",
    ),
    click.option(
        "--sandbox-log-level",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default=DEFAULT_LOG_LEVEL,
        show_default=True,
        help="With --sandbox firecracker: Firecracker's log level.",
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
HOST_PARAMS = (
    "accel",
    "kernel",
    "kernel_modules",
    "network_mode",
    "max_output_size",
    "max_disk",
    "max_file_count",
    "grace_period",
    "max_symlinks",
    "firecracker_bin",
    "jailer",
    "jailer_chroot_base",
    "sandbox_log_level",
    "jail_uid",
    "jail_gid",
    "danger_no_jail",
)


# `runner daemon` and `runner noise` (`runner run` adds "none": a job request, not a host setting).
vm_sandbox_option = click.option(
    "--sandbox",
    type=click.Choice(["qemu", "firecracker"]),
    default="qemu",
    show_default=True,
    help="The microVM that runs sandboxed jobs.",
)


def host_options(func: F) -> F:
    for option in reversed(HOST_OPTIONS):
        func = option(func)
    return func


def given_on_command_line(names: tuple[str, ...]) -> set[str]:
    """Which of these parameters the user gave (not defaults or env vars)."""
    source = click.get_current_context().get_parameter_source
    return {name for name in names if source(name) == click.core.ParameterSource.COMMANDLINE}


def host_settings_from(
    kwargs: dict[str, Any], *, backend: str, allow_no_sandbox: bool, **only_daemon: Any
) -> HostSettings:
    """Pop the host options from a command's kwargs; the settings, or click.UsageError / SpecError
    naming the option. ``only_daemon``: settings one command alone has (the daemon's image_layout)."""
    values = {name: kwargs.pop(name) for name in HOST_PARAMS}
    given = given_on_command_line(HOST_PARAMS)
    if backend != "firecracker" and (
        wrong := sorted(FIRECRACKER_ONLY[n] for n in given & set(FIRECRACKER_ONLY))
    ):
        raise click.UsageError(f"{', '.join(wrong)} need --sandbox firecracker")
    if "max_symlinks" in given and not allow_no_sandbox:
        raise click.UsageError(
            "--max-symlinks applies to jobs without a sandbox only (runner run --sandbox none, "
            "runner daemon --danger-allow-no-sandbox)"
        )
    return make_host_settings(
        backend=backend,
        allow_no_sandbox=allow_no_sandbox,
        accel=values["accel"],
        kernel=values["kernel"],
        kernel_modules=values["kernel_modules"],
        network_mode=values["network_mode"],
        max_output_bytes=values["max_output_size"],
        max_disk_mib=values["max_disk"],
        max_file_count=values["max_file_count"],
        grace_period_s=values["grace_period"],
        max_symlinks=values["max_symlinks"],
        firecracker=values["firecracker_bin"],
        jailer=values["jailer"],
        jailer_chroot_base=values["jailer_chroot_base"],
        sandbox_log_level=values["sandbox_log_level"].capitalize(),
        jail_uid=values["jail_uid"],
        jail_gid=values["jail_gid"],
        danger_no_jail=values["danger_no_jail"],
        **only_daemon,
    )
