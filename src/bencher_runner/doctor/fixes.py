"""`runner doctor --fix`: the persistent host fixes doctor prints, planned as data, then applied.

Why a plan: the same plan is printed by `--dry-run`, shown before each confirmation and applied, so
what a user approves is exactly what happens. Planning only reads files under a root (a fake tree in
tests) and reads the same inputs as doctor's checks (/proc/cmdline, the online CPUs and their
partition, cgroup v2 at /sys/fs/cgroup, irqbalance in /proc); applying writes files under that root
and runs commands through an injectable runner, so tests record commands instead of running
update-grub or systemctl.

Idempotence: the GRUB drop-in is ours (one file, never /etc/default/grub); a boot parameter it already
holds stays in it even after a reboot put it on /proc/cmdline, so a second run, before or after the
reboot, plans nothing. A parameter set elsewhere (the command line or another GRUB file) is left to
whoever set it.
"""

import os
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bencher_runner.atomicfile import write_atomic
from bencher_runner.doctor.checks import ISOLATION_ARGS, check_irqbalance
from bencher_runner.host.cgroup import cgroup_v2_controllers
from bencher_runner.host.cpus import format_cpu_list, online_cpus, partition
from bencher_runner.spec.errors import RunnerError

DROPIN = Path("etc/default/grub.d/bencher-runner.cfg")
GRUB_DEFAULT = Path("etc/default/grub")
GRUB_CFG = Path("boot/grub/grub.cfg")
CGROUP_ARG = "systemd.unified_cgroup_hierarchy"
MANAGED_ARGS = (*ISOLATION_ARGS, CGROUP_ARG)
_BIN_DIRS = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")
_COMMAND_TIMEOUT_S = 600
_ARG = re.compile(r"""(?:^|[\s"'])([A-Za-z_][\w.-]*)=([^\s"']*)""")

CommandRunner = Callable[[Sequence[str]], tuple[int, str]]


class FixError(RunnerError):
    """A fix could not be applied (a file not writable, a command that failed)."""


@dataclass(frozen=True)
class WriteFile:
    path: Path  # where on this host (the root joined in)
    shown: str  # the path as the user knows it (/etc/...)
    content: str
    replaces: str | None  # the current content, None for a new file


@dataclass(frozen=True)
class RunCommand:
    argv: tuple[str, ...]

    @property
    def shown(self) -> str:
        return " ".join(self.argv)


Step = WriteFile | RunCommand


@dataclass(frozen=True)
class Fix:
    """One confirmable fix: its steps run in order; a fix without steps is a manual note only."""

    name: str
    summary: str
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()
    reboot: bool = False

    @property
    def manual(self) -> bool:
        return not self.steps


@dataclass(frozen=True)
class FixPlan:
    fixes: tuple[Fix, ...]
    settled: tuple[str, ...] = field(default=())  # what is already in place, one line each

    @property
    def applicable(self) -> tuple[Fix, ...]:
        return tuple(f for f in self.fixes if not f.manual)


def boot_args(text: str) -> dict[str, str]:
    """The managed `name=value` parameters in a kernel command line or a GRUB shell file (comment lines
    skipped); the last occurrence wins, as it does for the kernel and systemd."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for name, value in _ARG.findall(line):
            if name in MANAGED_ARGS:
                found[name] = value
    return found


def render_dropin(args: dict[str, str]) -> str:
    words = " ".join(f"{name}={value}" for name, value in args.items())
    return (
        "# Written by `runner doctor --fix` (bencher-runner); running it again rewrites this file.\n"
        "# isolcpus/nohz_full/rcu_nocbs keep the scheduler, the timer tick and RCU callbacks off the\n"
        "# benchmark CPUs; systemd.unified_cgroup_hierarchy=1 boots with cgroup v2 only.\n"
        "# To undo: delete this file, run update-grub and reboot.\n"
        f'GRUB_CMDLINE_LINUX_DEFAULT="${{GRUB_CMDLINE_LINUX_DEFAULT}} {words}"\n'
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def find_program(root: Path, name: str) -> str | None:
    """``name`` in the usual bin directories of ``root``, as a path on that system (/usr/sbin/...)."""
    for directory in _BIN_DIRS:
        candidate = root / directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return f"/{directory}/{name}"
    return None


def _other_grub_args(root: Path) -> dict[str, str]:
    """Managed parameters set in /etc/default/grub or another grub.d file: name -> the file's path."""
    where: dict[str, str] = {}
    files = [root / GRUB_DEFAULT, *sorted((root / DROPIN.parent).glob("*.cfg"))]
    for path in files:
        if path.name == DROPIN.name and path.parent == root / DROPIN.parent:
            continue
        for name in boot_args(_read(path) or ""):
            where.setdefault(name, "/" + str(path.relative_to(root)))
    return where


def plan_grub(root: Path) -> tuple[Fix | None, list[str]]:
    """The GRUB drop-in with the isolation parameters for this host's benchmark CPUs and, on cgroup
    v1/hybrid, the cgroup v2 parameter. Returns (fix or None, settled lines)."""
    cmdline = boot_args(_read(root / "proc/cmdline") or "")
    dropin_path = root / DROPIN
    current = _read(dropin_path)
    ours = boot_args(current or "")
    elsewhere = _other_grub_args(root)
    notes: list[str] = []
    wanted: dict[str, str] = {}
    layout = partition(online_cpus(root / "sys"))
    if layout.has_isolation:
        cpulist = format_cpu_list(layout.benchmark)
        for arg in ISOLATION_ARGS:
            if arg in ours or (arg not in cmdline and arg not in elsewhere):
                wanted[arg] = cpulist
            elif arg in elsewhere:
                notes.append(f"{arg} is set in {elsewhere[arg]}: left as it is")
    v1 = cgroup_v2_controllers(root / "sys/fs/cgroup") is None
    if CGROUP_ARG in ours or (v1 and cmdline.get(CGROUP_ARG) != "1" and CGROUP_ARG not in elsewhere):
        wanted[CGROUP_ARG] = "1"
    if not wanted:
        return None, ["boot parameters: isolcpus, nohz_full, rcu_nocbs and cgroup v2 need nothing"]
    pending = sorted(name for name, value in wanted.items() if cmdline.get(name) != value)
    words = " ".join(f"{name}={value}" for name, value in wanted.items())
    summary = words + (
        f" (benchmark CPUs {format_cpu_list(layout.benchmark)})" if layout.has_isolation else ""
    )
    content = render_dropin(wanted)
    if (root / GRUB_DEFAULT).is_file():
        update_grub = find_program(root, "update-grub")
        if current == content:
            settled = [f"boot parameters: {DROPIN.name} is already in place ({words})"]
            if pending:
                settled.append(f"reboot pending: /proc/cmdline lacks {', '.join(pending)} until then")
            if update_grub and _older(root / GRUB_CFG, dropin_path):
                fix = Fix(
                    "update-grub",
                    f"/{GRUB_CFG} is older than /{DROPIN}: regenerate it",
                    (RunCommand((update_grub,)),),
                    reboot=bool(pending),
                )
                return fix, settled
            return None, settled
        steps: list[Step] = [WriteFile(dropin_path, f"/{DROPIN}", content, current)]
        if update_grub:
            steps.append(RunCommand((update_grub,)))
        else:
            notes.append(
                "update-grub not found: regenerate the GRUB configuration (e.g. grub-mkconfig -o "
                f"/{GRUB_CFG}) before rebooting"
            )
        return Fix("GRUB drop-in", summary, tuple(steps), tuple(notes), reboot=True), []
    notes.append(
        f"no GRUB configuration at /{GRUB_DEFAULT}: would write /{DROPIN}; add {words} to this host's "
        "boot loader kernel command line yourself, then reboot"
    )
    return Fix("boot parameters", summary, (), tuple(notes), reboot=True), []


def _older(path: Path, than: Path) -> bool:
    try:
        return path.stat().st_mtime < than.stat().st_mtime
    except OSError:
        return False


def plan_irqbalance(root: Path) -> tuple[Fix | None, list[str]]:
    """irqbalance stopped and disabled at boot, where systemd runs; otherwise say what would be done."""
    running = check_irqbalance(root / "proc")
    is_running = running.status == "warn"
    units = root / "etc/systemd/system"
    links = (wants / "irqbalance.service" for wants in sorted(units.glob("*.wants")))
    enabled = [link for link in links if link.is_symlink() or link.exists()]  # a dangling link counts
    if not is_running and not enabled:
        return None, ["irqbalance: not running and not enabled at boot"]
    state = running.detail if is_running else f"irqbalance is enabled at boot ({enabled[0].parent.name})"
    argv = ("systemctl", "disable", "--now", "irqbalance")
    systemctl = find_program(root, "systemctl")
    if (root / "run/systemd/system").is_dir() and systemctl:
        summary = f"disable irqbalance: {state}"
        return Fix("irqbalance", summary, (RunCommand((systemctl, *argv[1:])),)), []
    note = (
        f"systemd is not running here: would run `{' '.join(argv)}`; instead stop irqbalance and keep "
        "your init system from starting it at boot (e.g. `update-rc.d irqbalance disable`)"
    )
    return Fix("irqbalance", f"disable irqbalance: {state}", (), (note,)), []


def plan_fixes(root: Path = Path("/")) -> FixPlan:
    fixes: list[Fix] = []
    settled: list[str] = []
    for planner in (plan_grub, plan_irqbalance):
        fix, done = planner(root)
        settled.extend(done)
        if fix is not None:
            fixes.append(fix)
    return FixPlan(tuple(fixes), tuple(settled))


def run_subprocess(argv: Sequence[str]) -> tuple[int, str]:
    """Run a command on this host: (exit status, stderr or stdout)."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return 124, f"did not finish within {_COMMAND_TIMEOUT_S} s"
    except OSError as err:
        return 127, err.strerror or str(err)
    return proc.returncode, proc.stderr.strip() or proc.stdout.strip()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else "no output"
    return line if len(line) <= 200 else line[:199] + "…"


def write_file(step: WriteFile) -> None:
    """Atomically (a temporary file in the same directory, then rename), mode 0644."""
    try:
        step.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(step.path, step.content, mode=0o644)
    except OSError as err:
        hint = " (run as root)" if isinstance(err, PermissionError) else ""
        raise FixError(f"cannot write {step.shown}: {err.strerror or err}{hint}") from None


def apply_fix(fix: Fix, run: CommandRunner = run_subprocess) -> list[str]:
    """Apply ``fix``'s steps in order, stopping at the first failure (a FixError, one line). Returns
    one line per step done."""
    done: list[str] = []
    for step in fix.steps:
        if isinstance(step, WriteFile):
            write_file(step)
            done.append(f"wrote {step.shown}")
        else:
            status, output = run(step.argv)
            if status != 0:
                raise FixError(
                    f"{fix.name}: `{step.shown}` exited with status {status}: {_last_line(output)}"
                )
            done.append(f"ran {step.shown}")
    return done
