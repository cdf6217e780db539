"""The `runner` group, and its small commands: `kernel`, `cache`, `drain`/`undrain`.

`run`, `daemon`/`up` and `doctor` live in their own modules, imported only when they run.
"""

import importlib
import sys
from pathlib import Path
from typing import ClassVar

import click

from bencher_runner import __version__
from bencher_runner.cli.common import CONTEXT, fail
from bencher_runner.cli.types import SafePath, Text
from bencher_runner.paths import cache_dir
from bencher_runner.spec.errors import RunnerError


class LazyGroup(click.Group):
    """Subcommands imported when they run (click's documented lazy-loading pattern): `runner run` does
    not pay for the daemon's WebSocket and metrics stack or for doctor, about 0.2 s of start-up."""

    LAZY: ClassVar[dict[str, str]] = {
        "run": "bencher_runner.cli.run:run",
        "daemon": "bencher_runner.cli.daemon:daemon_command",
        "up": "bencher_runner.cli.daemon:daemon_command",
        "doctor": "bencher_runner.cli.doctor:doctor_command",
        "noise": "bencher_runner.cli.noise:noise",
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


def _cache(override: Path | None) -> Path:
    return cache_dir(override)


@main.group(context_settings=CONTEXT)
def kernel() -> None:
    """Manage the guest kernel bundle."""


@kernel.command("fetch", context_settings=CONTEXT)
@click.option(
    "--package", default="linux-image-cloud-amd64", show_default=True, help="Debian kernel package."
)
@click.option("--cache-dir", type=SafePath(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
def kernel_fetch(package: str, cache_dir: Path | None) -> None:
    """Download the distribution's kernel package and unpack kernel + guest modules into the cache."""
    from bencher_runner.sandbox.kernel import fetch_debian_bundle
    from bencher_runner.sandbox.vmlinux import ensure_vmlinux

    try:
        bundle = fetch_debian_bundle(_cache(cache_dir), package)
        ensure_vmlinux(bundle.kernel, bundle.kernel.parent / "vmlinux")  # what VMs boot: ready before a job
    except RunnerError as err:
        fail(err)
    click.echo(bundle.describe())
    for module in bundle.modules:
        click.echo(f"  module {module.name}")


@kernel.command("build", context_settings=CONTEXT)
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None, help="make -j (default: all CPUs).")
@click.option(
    "--source",
    type=Text(empty=False, spaces=False, controls=False),
    default="linux-source-6.1",
    show_default=True,
    help="Debian kernel source package.",
)
@click.option("--cache-dir", type=SafePath(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
def kernel_build(jobs: int | None, source: str, cache_dir: Path | None) -> None:
    """Build the lean guest kernel from the distribution's source and the pinned config."""
    from bencher_runner.sandbox.kernelbuild import BuildDisplay, build_lean_kernel

    try:
        with BuildDisplay(sys.stderr.isatty(), lambda text: click.echo(text, err=True)) as display:
            built = build_lean_kernel(_cache(cache_dir), jobs, source, display.progress, display.phase)
    except RunnerError as err:
        fail(err)
    click.echo(f"lean kernel {built.release} (config sha256 {built.config_sha256[:12]}): {built.kernel}")
    click.echo(f"built in {built.seconds:.0f} s")


@kernel.command("show", context_settings=CONTEXT)
@click.option("--cache-dir", type=SafePath(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
def kernel_show(cache_dir: Path | None) -> None:
    """Print the kernel bundle `runner run` would use (lean when built, else the fetched cloud one)."""
    from bencher_runner.sandbox.kernel import resolve_bundle

    try:
        bundle = resolve_bundle(_cache(cache_dir), None, None)
    except RunnerError as err:
        fail(err)
    click.echo(bundle.describe())
    for module in bundle.modules:
        click.echo(f"  module {module}")


@main.group(context_settings=CONTEXT)
def cache() -> None:
    """Inspect and prune the image blob cache, the cached root disks of layer chains and spare disks."""


@cache.command("ls", context_settings=CONTEXT)
@click.option("--cache-dir", type=SafePath(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def cache_ls(cache_dir: Path | None, as_json: bool) -> None:
    """List cached blobs, then cached root disks of layer chains, least recently used first."""
    import json

    from bencher_runner.layercache import ChainCache
    from bencher_runner.oci.blobcache import image_cache_dir, list_cache
    from bencher_runner.sparedisk import SpareDisks

    entries = list_cache(image_cache_dir(_cache(cache_dir)))
    chains = ChainCache(_cache(cache_dir)).entries()
    spares = SpareDisks(_cache(cache_dir))
    spare_count, spare_bytes = spares.count(None), spares.allocated_bytes()
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
        if spare_count:
            doc.append({"kind": "spare-disks", "count": spare_count, "size": spare_bytes})
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
    click.echo(f"{spare_count} spare root disks, {spare_bytes / 2**20:.1f} MiB")


@cache.command("prune", context_settings=CONTEXT)
@click.option("--cache-dir", type=SafePath(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
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
    from bencher_runner.sparedisk import SpareDisks

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
    spares = SpareDisks(_cache(cache_dir))  # copies made while idle: always safe to drop
    count, size = spares.count(None), spares.allocated_bytes()
    spares.drop()
    click.echo(f"removed {count} spare root disks ({size / 2**20:.1f} MiB)")


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
        fail(f"cannot drain: {err}")
    click.echo(f"drained: {marker}")
    if wait:
        problem = wait_until_idle(directory, timeout, say=lambda text: click.echo(text, err=True))
        if problem:
            fail(problem, 1)
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
        fail(f"cannot undrain: {err}")
    left = markers(directory)
    click.echo(f"removed: {', '.join(n or 'maintenance' for n in removed) or 'nothing'}")
    if left:
        click.echo(f"still drained by: {', '.join(f'maintenance.{n}' if n else 'maintenance' for n in left)}")
