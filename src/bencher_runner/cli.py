"""The `runner` command line (click): `run`, `daemon`/`up`, `kernel fetch/build/show`.

Flags map one to one onto RunConfig; `BENCHER_RUNNER_*` env vars give defaults where noted.
"""

import importlib
import sys
from pathlib import Path
from typing import Any, ClassVar

import click

from bencher_runner import __version__
from bencher_runner.cli_options import shared_job_options
from bencher_runner.host.options import tuning_options, tuning_options_from
from bencher_runner.paths import cache_dir
from bencher_runner.spec.config import make_run_config
from bencher_runner.spec.errors import RunnerError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE with a non-empty KEY", param_hint="--env")
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


class LazyGroup(click.Group):
    """Subcommands imported when they run (click's documented lazy-loading pattern): `runner run` does
    not pay for the daemon's WebSocket and metrics stack or for doctor, about 0.2 s of start-up."""

    LAZY: ClassVar[dict[str, str]] = {
        "daemon": "bencher_runner.daemon.command:daemon_command",
        "up": "bencher_runner.daemon.command:daemon_command",
        "doctor": "bencher_runner.host.commands:doctor_command",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.LAZY.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, attr = target.split(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="runner")
def main() -> None:
    """Run Bencher benchmark jobs (OCI images) inside microVMs."""


@main.command(context_settings=CONTEXT)
@click.option(
    "--image",
    required=True,
    help="OCI layout directory (DIR[:TAG]), archive (oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG], "
    "FILE.tar[:TAG]), or registry reference host[:port]/repo[:tag][@digest].",
)
@click.option("--token", envvar="BENCHER_RUNNER_TOKEN", help="Bearer token for the registry (never logged).")
@click.option("--registry-username", help="Registry user, for registries that want a password login.")
@click.option("--registry-password", envvar="BENCHER_RUNNER_REGISTRY_PASSWORD", help="Registry password.")
@click.option(
    "--insecure-registry", is_flag=True, help="Pull over plain HTTP (for loopback test registries)."
)
@click.option(
    "--entrypoint",
    multiple=True,
    help="Override the image ENTRYPOINT (repeat for each argument; drops the image CMD).",
)
@click.option("--cmd", "cmd_opts", multiple=True, help="Override the image CMD (repeat for each argument).")
@click.argument("cmd_args", nargs=-1)
@click.option(
    "--env",
    "env_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set an environment variable (repeatable; overrides the image's).",
)
@click.option("--vcpus", type=click.IntRange(1, 255), default=1, show_default=True, help="Guest vCPUs.")
@click.option(
    "--memory", type=click.IntRange(64), default=512, show_default=True, help="Guest memory in MiB."
)
@click.option(
    "--disk", type=click.IntRange(64), default=1024, show_default=True, help="Root disk size in MiB."
)
@click.option(
    "--timeout",
    type=click.IntRange(1),
    default=300,
    show_default=True,
    help="Seconds for the whole job: the image pull, every boot and every iteration together.",
)
@click.option(
    "--iter",
    "iterations",
    type=click.IntRange(0),
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
    type=click.Path(path_type=Path, file_okay=False),
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
    "--max-symlinks",
    type=click.IntRange(0),
    default=40,
    show_default=True,
    help="With --sandbox none: symlinks followed resolving a path in the image.",
)
@click.option(
    "--kernel",
    type=click.Path(path_type=Path),
    envvar="BENCHER_RUNNER_KERNEL",
    help="Guest kernel image (default: the built lean kernel, else the fetched Debian cloud kernel).",
)
@click.option(
    "--kernel-modules",
    type=click.Path(path_type=Path),
    envvar="BENCHER_RUNNER_KERNEL_MODULES",
    help="Directory with the kernel's modules (.ko).",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
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
@click.option(
    "--jailer", type=click.Path(path_type=Path), help="With --sandbox firecracker: run it under this jailer."
)
@click.option(
    "--sandbox-log-level",
    type=click.Choice(["Error", "Warning", "Info", "Debug", "Trace", "Off"], case_sensitive=False),
    default="Warning",
    show_default=True,
    help="Firecracker's log level.",
)
@shared_job_options
@tuning_options
def run(
    image: str,
    no_wait: bool,
    token: str | None,
    registry_username: str | None,
    registry_password: str | None,
    insecure_registry: bool,
    entrypoint: tuple[str, ...],
    cmd_opts: tuple[str, ...],
    cmd_args: tuple[str, ...],
    env_opts: tuple[str, ...],
    vcpus: int,
    memory: int,
    disk: int,
    timeout: int,
    iterations: int,
    allow_failure: bool,
    max_output_size: int,
    max_disk: int,
    outputs: tuple[str, ...],
    build_time: bool,
    file_size: bool,
    output_dir: Path | None,
    max_file_count: int,
    grace_period: int,
    network: bool,
    network_mode: str,
    sandbox: str,
    max_symlinks: int,
    accel: str,
    kernel: Path | None,
    kernel_modules: Path | None,
    cache_dir: Path | None,
    as_json: bool,
    quiet: bool,
    firecracker_bin: Path | None,
    jailer: Path | None,
    sandbox_log_level: str,
    jail_uid: int,
    jail_gid: int,
    danger_no_jail: bool,
    **tuning_flags: Any,
) -> None:
    """Run an OCI image's entrypoint/cmd inside a microVM and print its output.

    Arguments after `--` replace the image CMD, like `--cmd` given once per argument.
    """
    from bencher_runner.run import EXIT_USAGE, run_command

    if cmd_opts and cmd_args:
        raise click.UsageError("give the command either with --cmd or after --, not both")
    source = click.get_current_context().get_parameter_source
    if sandbox == "none" and network:
        raise click.UsageError(
            "--network needs a sandbox: with --sandbox none the command uses the host's network"
        )
    checked = ("max_symlinks", "sandbox_log_level", "firecracker_bin", "jailer", "network_mode")
    given = {name for name in checked if source(name) == click.core.ParameterSource.COMMANDLINE}
    if sandbox != "none" and "max_symlinks" in given:
        raise click.UsageError("--max-symlinks applies to --sandbox none only")
    if sandbox != "firecracker" and given & {"sandbox_log_level", "firecracker_bin", "jailer"}:
        raise click.UsageError("--sandbox-log-level, --firecracker and --jailer need --sandbox firecracker")
    if not network and "network_mode" in given:
        raise click.UsageError("--network-mode needs --network")
    if file_size and not outputs:
        raise click.UsageError("--file-size needs the files to measure: give them with --output PATH")
    if disk > max_disk:
        raise click.BadParameter(
            f"{disk} MiB is more than --max-disk ({max_disk} MiB); raise --max-disk if this host should "
            "give a job that much",
            param_hint="--disk",
        )
    cmd = cmd_opts or cmd_args
    tuning = tuning_options_from(tuning_flags)
    try:
        config = make_run_config(
            image=image,
            token=token,
            registry_username=registry_username,
            registry_password=registry_password,
            insecure_registry=insecure_registry,
            entrypoint=entrypoint or None,
            cmd=cmd or None,
            env=_parse_env(env_opts),
            vcpus=vcpus,
            memory_mib=memory,
            disk_mib=disk,
            timeout_s=timeout,
            iterations=iterations,
            allow_failure=allow_failure,
            max_output_bytes=max_output_size,
            output_paths=outputs,
            build_time=build_time,
            file_size=file_size,
            max_file_count=max_file_count,
            grace_period_s=grace_period,
            network=network,
            network_mode=network_mode,
            backend=sandbox,
            max_symlinks=max_symlinks,
            firecracker=firecracker_bin,
            jailer=jailer,
            jail_uid=jail_uid,
            jail_gid=jail_gid,
            danger_no_jail=danger_no_jail,
            sandbox_log_level=sandbox_log_level.capitalize(),
            accel=accel,
            kernel=kernel,
            kernel_modules=kernel_modules,
        )
    except RunnerError as err:
        click.echo(f"runner: error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(
        run_command(
            config,
            cache=_cache(cache_dir),
            as_json=as_json,
            quiet=quiet,
            output_dir=output_dir,
            tuning=tuning,
            wait=not no_wait,
        )
    )


def _cache(override: Path | None) -> Path:
    return cache_dir(override)


@main.group(context_settings=CONTEXT)
def kernel() -> None:
    """Manage the guest kernel bundle."""


@kernel.command("fetch", context_settings=CONTEXT)
@click.option(
    "--package", default="linux-image-cloud-amd64", show_default=True, help="Debian kernel package."
)
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
def kernel_fetch(package: str, cache_dir: Path | None) -> None:
    """Download the distribution's kernel package and unpack kernel + guest modules into the cache."""
    from bencher_runner.sandbox.kernel import fetch_debian_bundle
    from bencher_runner.sandbox.vmlinux import ensure_vmlinux

    try:
        bundle = fetch_debian_bundle(_cache(cache_dir), package)
        ensure_vmlinux(bundle.kernel, bundle.kernel.parent / "vmlinux")  # what VMs boot: ready before a job
    except RunnerError as err:
        click.echo(f"runner: error: {err}", err=True)
        sys.exit(2)
    click.echo(f"kernel {bundle.release}: {bundle.kernel}")
    for module in bundle.modules:
        click.echo(f"  module {module.name}")


@kernel.command("build", context_settings=CONTEXT)
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None, help="make -j (default: all CPUs).")
@click.option("--source", default="linux-source-6.1", show_default=True, help="Debian kernel source package.")
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
def kernel_build(jobs: int | None, source: str, cache_dir: Path | None) -> None:
    """Build the lean guest kernel from the distribution's source and the pinned config."""
    from bencher_runner.sandbox.kernelbuild import BuildDisplay, build_lean_kernel

    try:
        with BuildDisplay(sys.stderr.isatty(), lambda text: click.echo(text, err=True)) as display:
            built = build_lean_kernel(_cache(cache_dir), jobs, source, display.progress, display.phase)
    except RunnerError as err:
        click.echo(f"runner: error: {err}", err=True)
        sys.exit(2)
    click.echo(f"lean kernel {built.release} (config sha256 {built.config_sha256[:12]}): {built.kernel}")
    click.echo(f"built in {built.seconds:.0f} s")


@kernel.command("show", context_settings=CONTEXT)
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
def kernel_show(cache_dir: Path | None) -> None:
    """Print the kernel bundle `runner run` would use (lean when built, else the fetched cloud one)."""
    from bencher_runner.sandbox.kernel import resolve_bundle

    try:
        bundle = resolve_bundle(_cache(cache_dir), None, None)
    except RunnerError as err:
        click.echo(f"runner: error: {err}", err=True)
        sys.exit(2)
    click.echo(bundle.describe())
    for module in bundle.modules:
        click.echo(f"  module {module}")


@main.group(context_settings=CONTEXT)
def cache() -> None:
    """Inspect and prune the image blob cache and the cached root disks of layer chains."""


@cache.command("ls", context_settings=CONTEXT)
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def cache_ls(cache_dir: Path | None, as_json: bool) -> None:
    """List cached blobs, then cached root disks of layer chains, least recently used first."""
    import json

    from bencher_runner.layercache import ChainCache
    from bencher_runner.oci.blobcache import image_cache_dir, list_cache

    entries = list_cache(image_cache_dir(_cache(cache_dir)))
    chains = ChainCache(_cache(cache_dir)).entries()
    if as_json:
        doc = [
            {"kind": "blob", "digest": e.digest, "size": e.size, "last_used": e.last_used.isoformat()}
            for e in entries
        ] + [
            {
                "kind": "layer-chain",
                "chain_id": c.chain_id,
                "layers": c.depth,
                "top_layer": c.top_layer,
                "disk_mib": c.disk_mib,
                "size": c.allocated,
                "last_used": c.last_used.isoformat(),
            }
            for c in chains
        ]
        click.echo(json.dumps(doc))
        return
    for e in entries:
        used = e.last_used.strftime("%Y-%m-%d %H:%M")
        click.echo(f"{e.digest}  {e.size / 2**20:10.1f} MiB  {used}")
    click.echo(f"{len(entries)} blobs, {sum(e.size for e in entries) / 2**20:.1f} MiB")
    for c in chains:
        used = c.last_used.strftime("%Y-%m-%d %H:%M")
        what = f"root disk of {c.depth} layer(s) up to {c.top_layer[:19]}…, {c.disk_mib} MiB disk"
        click.echo(f"chain {c.chain_id[:19]}…  {c.allocated / 2**20:10.1f} MiB  {used}  {what}")
    click.echo(
        f"{len(chains)} cached root disks of layer chains, {sum(c.allocated for c in chains) / 2**20:.1f} MiB"
    )


@cache.command("prune", context_settings=CONTEXT)
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
@click.option(
    "--max-size", type=click.IntRange(0), help="Keep at most this many MiB (least recently used go)."
)
@click.option(
    "--chains-max-size",
    type=click.IntRange(0),
    help="Keep at most this many MiB of cached root disks of layer chains (default: 4096).",
)
@click.option("--all", "prune_all", is_flag=True, help="Remove every cached blob and layer-chain disk.")
def cache_prune(
    cache_dir: Path | None, max_size: int | None, chains_max_size: int | None, prune_all: bool
) -> None:
    """Remove cached blobs and root disks of layer chains, least recently used first."""
    from bencher_runner.layercache import MAX_CHAIN_BYTES, ChainCache
    from bencher_runner.oci.blobcache import image_cache_dir, prune_cache

    if prune_all == (max_size is not None):
        raise click.UsageError("give exactly one of --max-size MiB or --all")
    limit = None if max_size is None else max_size * 2**20
    result = prune_cache(image_cache_dir(_cache(cache_dir)), limit)
    click.echo(
        f"removed {len(result.removed)} blobs ({result.freed_bytes / 2**20:.1f} MiB); "
        f"kept {result.kept_count} ({result.kept_bytes / 2**20:.1f} MiB)"
    )
    chains = ChainCache(_cache(cache_dir))
    if prune_all:  # a job that finds its base gone builds the disk in full
        pruned = chains.prune(None, None, min_age=0)
    else:
        cap = MAX_CHAIN_BYTES if chains_max_size is None else chains_max_size * 2**20
        pruned = chains.prune(cap)
    click.echo(
        f"removed {len(pruned.removed)} layer-chain disks ({pruned.freed_bytes / 2**20:.1f} MiB); "
        f"kept {pruned.kept_count} ({pruned.kept_bytes / 2**20:.1f} MiB)"
    )


@main.command(context_settings=CONTEXT)
@click.option("--name", help="Hold the marker maintenance.NAME (several tools can each hold one).")
@click.option("--wait", is_flag=True, help="Return only once no job runs and none can start.")
@click.option(
    "--timeout", type=click.IntRange(1), default=3600, show_default=True, help="Seconds --wait waits."
)
@click.option("--why", default="", help="A note kept in the marker (who drained the host, and why).")
def drain(name: str | None, wait: bool, timeout: int, why: str) -> None:
    """Take this host out of service: `runner up` finishes its job, then asks for no new one.

    It stays connected and resumes within a second of `runner undrain`.
    """
    from bencher_runner.host.maintenance import drain as make_marker
    from bencher_runner.host.maintenance import run_dir, wait_until_idle

    directory = run_dir()
    try:
        marker = make_marker(directory, name, why)
    except (RunnerError, OSError) as err:
        click.echo(f"runner: error: cannot drain: {err}", err=True)
        sys.exit(2)
    click.echo(f"drained: {marker}")
    if wait:
        problem = wait_until_idle(directory, timeout, say=lambda text: click.echo(text, err=True))
        if problem:
            click.echo(f"runner: error: {problem}", err=True)
            sys.exit(1)
        click.echo("no job runs on this host")


@main.command(context_settings=CONTEXT)
@click.option("--name", help="Remove the marker maintenance.NAME (default: the plain one).")
@click.option("--all", "every", is_flag=True, help="Remove every maintenance marker.")
def undrain(name: str | None, every: bool) -> None:
    """Put this host back in service (remove a drain marker); `runner up` asks for jobs within a second."""
    from bencher_runner.host.maintenance import markers, run_dir
    from bencher_runner.host.maintenance import undrain as remove_marker

    directory = run_dir()
    try:
        removed = remove_marker(directory, name, every=every)
    except (RunnerError, OSError) as err:
        click.echo(f"runner: error: cannot undrain: {err}", err=True)
        sys.exit(2)
    left = markers(directory)
    click.echo(f"removed: {', '.join(n or 'maintenance' for n in removed) or 'nothing'}")
    if left:
        click.echo(f"still drained by: {', '.join(f'maintenance.{n}' if n else 'maintenance' for n in left)}")
