"""`runner run`: the job flags (a JobRequest), the host flags shared with `runner daemon`
(host_options.py) and the tuning flags; the work is run.py's."""

import sys
from pathlib import Path
from typing import Any

import click

from bencher_runner.cli.common import CONTEXT, fail
from bencher_runner.cli.host_options import given_on_command_line, host_options, host_settings_from
from bencher_runner.cli.tuning_options import tuning_options, tuning_options_from
from bencher_runner.cli.types import SafePath, Text
from bencher_runner.paths import cache_dir as cache_dir_for
from bencher_runner.spec.config import (
    MAX_DISK_MIB,
    MAX_ITERATIONS,
    MAX_TIMEOUT_S,
    MIN_DISK_MIB,
    MIN_MEMORY_MIB,
    JobRequest,
    RunConfig,
    make_job_request,
)
from bencher_runner.spec.errors import RunnerError

SECRET = Text(empty=False, spaces=False, controls=False, secret=True)


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or "\0" in item:
            raise click.BadParameter(
                f"{item!r}: expected KEY=VALUE with a non-empty KEY and no NUL byte", param_hint="--env"
            )
        env[name] = value
    return env


def _check_outputs(values: tuple[str, ...]) -> tuple[str, ...]:
    """Output paths as the guest can look them up: not empty, no NUL (absolute or relative both do)."""
    for value in values:
        if not value:
            raise click.BadParameter("an output path cannot be empty")
        if "\0" in value:
            raise click.BadParameter(f"{value!r} contains a NUL byte")
    return values


@click.command(context_settings=CONTEXT)
@click.option(
    "--image",
    required=True,
    type=Text(empty=False, controls=False),
    help="OCI layout directory (DIR[:TAG]), archive (oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG], "
    "FILE.tar[:TAG]), or registry reference host[:port]/repo[:tag][@digest].",
)
@click.option(
    "--token",
    type=SECRET,
    envvar="BENCHER_RUNNER_TOKEN",
    help="Bearer token for the registry (never logged).",
)
@click.option(
    "--registry-username",
    type=Text(empty=False, spaces=False, controls=False),
    help="Registry user, for registries that want a password login.",
)
@click.option(
    "--registry-password",
    type=Text(empty=False, controls=False, secret=True),
    envvar="BENCHER_RUNNER_REGISTRY_PASSWORD",
    help="Registry password.",
)
@click.option(
    "--insecure-registry", is_flag=True, help="Pull over plain HTTP (for loopback test registries)."
)
@click.option(
    "--entrypoint",
    multiple=True,
    type=Text(),
    help="Override the image ENTRYPOINT (repeat for each argument; drops the image CMD).",
)
@click.option(
    "--cmd", "cmd_opts", multiple=True, type=Text(), help="Override the image CMD (repeat for each argument)."
)
@click.argument("cmd_args", nargs=-1, type=Text())
@click.option(
    "--env",
    "env_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set an environment variable (repeatable; overrides the image's).",
)
@click.option("--vcpus", type=click.IntRange(1, 255), default=1, show_default=True, help="Guest vCPUs.")
@click.option(
    "--memory",
    type=click.IntRange(MIN_MEMORY_MIB),
    default=512,
    show_default=True,
    help="Guest memory in MiB.",
)
@click.option(
    "--disk",
    type=click.IntRange(MIN_DISK_MIB, MAX_DISK_MIB),
    default=1024,
    show_default=True,
    help="Root disk size in MiB.",
)
@click.option(
    "--timeout",
    type=click.IntRange(1, MAX_TIMEOUT_S),
    default=300,
    show_default=True,
    help="Seconds for the whole job: the image pull, every boot and every iteration together.",
)
@click.option(
    "--iter",
    "iterations",
    type=click.IntRange(0, MAX_ITERATIONS),
    default=1,
    show_default=True,
    help="Run the benchmark N times, each in a fresh VM.",
)
@click.option("--allow-failure", is_flag=True, help="Keep iterating after a non-zero exit.")
@click.option(
    "--output",
    "outputs",
    multiple=True,
    metavar="PATH",
    callback=lambda ctx, param, values: _check_outputs(values),
    help="Guest file to collect after the benchmark (repeatable; relative to the working dir).",
)
@click.option(
    "--build-time",
    is_flag=True,
    help="Report each iteration's command run time (not pull or boot) as Bencher Metric Format "
    "(measure build-time) in place of the output files.",
)
@click.option(
    "--file-size",
    is_flag=True,
    help="Report each --output file's size in bytes, keyed by file name, as Bencher Metric Format "
    "(measure file-size) in place of its content.",
)
@click.option(
    "--output-dir",
    type=SafePath(path_type=Path, file_okay=False),
    help="Also save stdout, stderr and output files byte-exact under DIR/iter-N/.",
)
@click.option(
    "--network", is_flag=True, help="Give the guest a NAT'd network interface (default: none at all)."
)
@click.option(
    "--sandbox",
    type=click.Choice(["qemu", "firecracker", "none"]),
    default="qemu",
    show_default=True,
    help="qemu or firecracker: a microVM; none: on this host from the unpacked image (no isolation).",
)
@click.option(
    "--cache-dir",
    type=SafePath(path_type=Path),
    envvar="BENCHER_RUNNER_CACHE_DIR",
    help="Cache and work directory root.",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option(
    "--no-wait",
    is_flag=True,
    help="Refuse at once (exit 2) when a job of `runner up` or another `runner run` holds this host, "
    "instead of waiting for it to finish.",
)
@host_options
@tuning_options
def run(
    cmd_opts: tuple[str, ...],
    cmd_args: tuple[str, ...],
    sandbox: str,
    output_dir: Path | None,
    cache_dir: Path | None,
    as_json: bool,
    quiet: bool,
    no_wait: bool,
    **flags: Any,
) -> None:
    """Run an OCI image's entrypoint/cmd inside a microVM and print its output.

    Arguments after `--` replace the image CMD, like `--cmd` given once per argument.
    """
    from bencher_runner.run import run_command

    if cmd_opts and cmd_args:
        raise click.UsageError("give the command either with --cmd or after --, not both")
    _check_job_flags(flags, sandbox)
    try:
        host = host_settings_from(
            flags, backend="qemu" if sandbox == "none" else sandbox, allow_no_sandbox=sandbox == "none"
        )
    except RunnerError as err:
        fail(err)
    if flags["disk"] > host.max_disk_mib:
        raise click.BadParameter(
            f"{flags['disk']} MiB is more than --max-disk ({host.max_disk_mib} MiB); raise --max-disk if "
            "this host should give a job that much",
            param_hint="--disk",
        )
    tuning = tuning_options_from(flags)
    try:
        config = RunConfig(job=_job_request(flags, sandbox=sandbox, cmd=cmd_opts or cmd_args), host=host)
    except RunnerError as err:
        fail(err)
    code = run_command(
        config,
        cache=cache_dir_for(cache_dir),
        as_json=as_json,
        quiet=quiet,
        output_dir=output_dir,
        tuning=tuning,
        wait=not no_wait,
    )
    sys.exit(code)


def _check_job_flags(flags: dict[str, Any], sandbox: str) -> None:
    """Job flags that make no sense together: a usage error naming them."""
    if sandbox == "none" and flags["network"]:
        raise click.UsageError(
            "--network needs a sandbox: with --sandbox none the command uses the host's network"
        )
    if not flags["network"] and "network_mode" in given_on_command_line(("network_mode",)):
        raise click.UsageError("--network-mode needs --network")
    if flags["file_size"] and not flags["outputs"]:
        raise click.UsageError("--file-size needs the files to measure: give them with --output PATH")


# `runner run`'s job flags -> JobRequest fields
JOB_FLAGS = {
    "image": "image",
    "token": "token",
    "registry_username": "registry_username",
    "registry_password": "registry_password",
    "insecure_registry": "insecure_registry",
    "vcpus": "vcpus",
    "memory": "memory_mib",
    "disk": "disk_mib",
    "timeout": "timeout_s",
    "iterations": "iterations",
    "allow_failure": "allow_failure",
    "outputs": "output_paths",
    "build_time": "build_time",
    "file_size": "file_size",
    "network": "network",
}


def _job_request(flags: dict[str, Any], *, sandbox: str, cmd: tuple[str, ...]) -> JobRequest:
    fields = {field: flags.pop(flag) for flag, field in JOB_FLAGS.items()}
    return make_job_request(
        **fields,
        entrypoint=flags.pop("entrypoint") or None,
        cmd=cmd or None,
        env=_parse_env(flags.pop("env_opts")),
        sandboxed=sandbox != "none",
    )
