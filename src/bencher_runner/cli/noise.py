"""`runner noise`: is this host quiet enough to trust? (the work is noise.py's)."""

import sys
from pathlib import Path
from typing import Any

import click

from bencher_runner.cli.common import CONTEXT, fail
from bencher_runner.cli.host_options import host_options, host_settings_from, vm_sandbox_option
from bencher_runner.cli.tuning_options import tuning_options, tuning_options_from
from bencher_runner.cli.types import SafePath
from bencher_runner.paths import cache_dir as cache_dir_for
from bencher_runner.spec.errors import RunnerError


@click.command(context_settings=CONTEXT)
@click.option(
    "--runs", type=click.IntRange(2, 100), default=5, show_default=True, help="Runs of each workload."
)
@click.option(
    "--cpu", type=click.IntRange(0), help="The CPU of the host runs (default: the last benchmark CPU)."
)
@vm_sandbox_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--cache-dir", type=SafePath(path_type=Path), envvar="BENCHER_RUNNER_CACHE_DIR")
@host_options
@tuning_options
def noise(
    runs: int, cpu: int | None, sandbox: str, as_json: bool, cache_dir: Path | None, **flags: Any
) -> None:
    """Measure this host: reference workloads on a bare CPU and in the sandbox, spread and overhead."""
    from bencher_runner.noise import noise_command

    try:
        host = host_settings_from(flags, backend=sandbox, allow_no_sandbox=False)
    except RunnerError as err:
        fail(err)
    tuning = tuning_options_from(flags)
    cache = cache_dir_for(cache_dir)
    sys.exit(noise_command(runs=runs, as_json=as_json, cpu=cpu, cache=cache, tuning=tuning, host=host))
