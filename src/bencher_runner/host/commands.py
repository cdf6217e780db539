"""Click commands for host operations (`runner doctor`); cli.py registers them."""

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from bencher_runner.host.doctor import Check, DoctorEnv, can_run_jobs, run_checks, to_json
from bencher_runner.paths import cache_dir

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "info": "cyan"}


@click.command("doctor", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--cache-dir",
    "cache_opt",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Runner cache (kernel bundle, KVM probe answer); default: BENCHER_RUNNER_CACHE_DIR or user cache.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_command(cache_opt: Path | None, as_json: bool) -> None:
    """Check whether this host can run jobs, and what makes its timings noisy (with fixes).

    Exits 0 when jobs can run (QEMU, kernel bundle, guest agent and mkfs.ext4 present); TCG-only KVM is
    a warning. The KVM probe boots a guest once (up to 15 s) and caches the answer.
    """
    cache = cache_dir(cache_opt)
    checks = run_checks(DoctorEnv(cache=cache))
    checks.append(_preflight_check(cache))
    ok = can_run_jobs(checks)
    if as_json:
        click.echo(json.dumps(to_json(checks), indent=2))
    else:
        table = Table(title="runner doctor", show_lines=False)
        for column in ("check", "status", "detail", "fix"):
            table.add_column(column, overflow="fold")
        for check in checks:
            style = _STYLE[check.status]
            table.add_row(check.name, f"[{style}]{check.status}[/{style}]", check.detail, check.fix or "")
        console = Console(width=max(Console().width, 160))
        console.print(table)
        console.print(
            "[green]this host can run jobs[/green]"
            if ok
            else "[bold red]this host cannot run jobs yet[/bold red]"
        )
    raise SystemExit(0 if ok else 1)


def _preflight_check(cache: Path) -> Check:
    """The verdict `runner up` reaches before each `ready` (daemon/preflight.py), for this cache."""
    from bencher_runner.daemon.preflight import HostPreflight
    from bencher_runner.spec.jobspec import JobOptions

    verdict = HostPreflight(cache, JobOptions())()
    if verdict.problem is not None:
        return Check("runner up preflight", "fail", "runner up would not ask for jobs", verdict.problem)
    if verdict.pause:
        return Check("runner up preflight", "warn", "runner up is paused: " + "; ".join(verdict.pause))
    return Check("runner up preflight", "ok", "runner up would ask for jobs")
