"""Click commands for host operations (`runner doctor`, `runner doctor --fix`); cli/main.py registers them."""

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from bencher_runner.cli.common import CONTEXT
from bencher_runner.cli.types import SafePath
from bencher_runner.doctor import fixes
from bencher_runner.doctor.checks import Check, DoctorEnv, can_run_jobs, run_checks, to_json
from bencher_runner.paths import cache_dir
from bencher_runner.spec.errors import RunnerError

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "info": "cyan"}


@click.command("doctor", context_settings=CONTEXT)
@click.option(
    "--cache-dir",
    "cache_opt",
    type=SafePath(file_okay=False, path_type=Path),
    default=None,
    help="Runner cache (kernel bundle, KVM probe answer); default: BENCHER_RUNNER_CACHE_DIR or user cache.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option(
    "--fix",
    is_flag=True,
    help="Apply the persistent fixes: a GRUB drop-in with isolcpus/nohz_full/rcu_nocbs (and cgroup v2 on "
    "a cgroup v1 host), irqbalance disabled. Each is shown and confirmed.",
)
@click.option("--yes", "-y", is_flag=True, help="With --fix: apply without asking (for scripts).")
@click.option(
    "--dry-run", is_flag=True, help="With --fix: print the exact file contents and commands; change nothing."
)
@click.option(
    "--root",
    type=SafePath(file_okay=False, path_type=Path),
    default=Path("/"),
    hidden=True,
    help="Host root for --fix (tests use a fake tree).",
)
def doctor_command(
    cache_opt: Path | None, as_json: bool, fix: bool, yes: bool, dry_run: bool, root: Path
) -> None:
    """Check whether this host can run jobs, and what makes its timings noisy (with fixes).

    Exits 0 when jobs can run (QEMU, kernel bundle, guest agent and mkfs.ext4 present); TCG-only KVM is
    a warning. The KVM probe boots a guest once (up to 15 s) and caches the answer.

    With --fix: applies the boot-parameter and irqbalance fixes instead of checking (exit 0 when every
    fix applied or nothing was needed, 1 when one failed, 2 without a terminal to confirm and no --yes).
    """
    if not fix:
        for flag, given in (("--yes", yes), ("--dry-run", dry_run)):
            if given:
                raise click.UsageError(f"{flag} goes with --fix")
    else:
        if as_json:
            raise click.UsageError("--json does not go with --fix (use --fix --dry-run to see the plan)")
        raise SystemExit(_fix(root, yes=yes, dry_run=dry_run))
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
        count = len(fixes.plan_fixes(Path("/")).applicable)
        if count:
            console.print(
                f"`runner doctor --fix` applies {count} of these fixes (`--fix --dry-run` shows them first)"
            )
    raise SystemExit(0 if ok else 1)


# Tests replace these two: the recorded commands, and whether a person can answer a prompt.
COMMAND_RUNNER: fixes.CommandRunner = fixes.run_subprocess


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _refuse_commands(root: Path) -> fixes.CommandRunner:
    def refuse(argv: object) -> tuple[int, str]:
        return 1, f"not run: --root {root} is not /, and commands act on the running host"

    return refuse


def _show(fix: fixes.Fix, index: int, total: int) -> None:
    click.echo(f"[{index}/{total}] {fix.name}: {fix.summary}")
    for step in fix.steps:
        if isinstance(step, fixes.WriteFile):
            what = "new file" if step.replaces is None else "replacing its current content"
            click.echo(f"  write {step.shown} ({what}, mode 0644):")
            for line in step.content.splitlines():
                click.echo(f"    {line}")
        else:
            click.echo(f"  run: {step.shown}")
    for note in fix.notes:
        click.echo(f"  note: {note}")
    if fix.reboot:
        click.echo("  then reboot: the kernel reads its boot parameters only at boot")


def _fix(root: Path, *, yes: bool, dry_run: bool) -> int:
    plan = fixes.plan_fixes(root)
    for line in plan.settled:
        click.echo(f"already done: {line}")
    if not plan.fixes:
        click.echo("nothing to fix: this host needs none of the fixes runner doctor --fix applies")
        return 0
    applicable = plan.applicable
    if not dry_run and applicable and not yes and not stdin_is_terminal():
        click.echo(
            f"runner doctor --fix: no terminal to confirm {len(applicable)} fix(es); run it in a terminal, "
            "pass --yes to apply them unasked, or --dry-run to see them",
            err=True,
        )
        return 2
    runner = COMMAND_RUNNER
    if runner is fixes.run_subprocess and root.resolve() != Path("/"):
        runner = _refuse_commands(root)
    total = len(plan.fixes)
    failed = applied = 0
    reboot = False
    for index, fix in enumerate(plan.fixes, 1):
        _show(fix, index, total)
        if dry_run:
            continue
        if fix.manual:
            click.echo("  not applied: this one is for you to do (see the note)")
            continue
        if not yes and not click.confirm("  apply this fix?", default=False):
            click.echo("  skipped")
            continue
        try:
            for line in fixes.apply_fix(fix, runner):
                click.echo(f"  {line}")
        except RunnerError as err:
            click.echo(f"  failed: {err}", err=True)
            failed += 1
            continue
        applied += 1
        reboot = reboot or fix.reboot
    if dry_run:
        click.echo("dry run: nothing was changed")
        return 0
    click.echo(f"applied {applied} of {total} fix(es)" + (f", {failed} failed" if failed else ""))
    if reboot:
        click.echo("reboot this host for the new boot parameters to take effect")
    return 1 if failed else 0


def _preflight_check(cache: Path) -> Check:
    """The verdict `runner up` reaches before each `ready` (daemon/preflight.py), for this cache."""
    from bencher_runner.daemon.preflight import HostPreflight
    from bencher_runner.spec.config import HostSettings

    verdict = HostPreflight(cache, HostSettings())()
    if verdict.problem is not None:
        return Check("runner up preflight", "fail", "runner up would not ask for jobs", verdict.problem)
    if verdict.pause:
        return Check("runner up preflight", "warn", "runner up is paused: " + "; ".join(verdict.pause))
    return Check("runner up preflight", "ok", "runner up would ask for jobs")
