"""`runner doctor --fix` on fake host roots: what it plans, what it writes and runs, and what it refuses.

Commands are recorded, never run: the recorder stands in for update-grub and systemctl and, where a
test needs it, changes the fake tree the way the real command would.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from bencher_runner.cli import doctor as commands
from bencher_runner.cli.doctor import doctor_command
from bencher_runner.doctor import fixes
from bencher_runner.doctor.fixes import DROPIN, RunCommand, WriteFile, boot_args, plan_fixes

DEFAULT_CMDLINE = "BOOT_IMAGE=/boot/vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro quiet\n"


def make_host(
    root: Path,
    *,
    cpus: str = "0-3",
    cmdline: str = DEFAULT_CMDLINE,
    cgroup_v2: bool = True,
    grub: bool = True,
    update_grub: bool = True,
    systemd: bool = True,
    irqbalance_pid: int | None = None,
    irqbalance_enabled: bool = False,
) -> Path:
    (root / "proc").mkdir(parents=True)
    (root / "proc/cmdline").write_text(cmdline)
    (root / "proc/1").mkdir()
    (root / "proc/1/comm").write_text("systemd\n" if systemd else "init\n")
    (root / "sys/devices/system/cpu").mkdir(parents=True)
    (root / "sys/devices/system/cpu/online").write_text(cpus + "\n")
    (root / "sys/fs/cgroup").mkdir(parents=True)
    if cgroup_v2:
        (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    else:
        (root / "sys/fs/cgroup/unified").mkdir()  # hybrid: v2 only below unified/
    if grub:
        (root / "etc/default").mkdir(parents=True)
        (root / "etc/default/grub").write_text(
            'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX=""\n'
        )
        (root / "boot/grub").mkdir(parents=True)
        (root / "boot/grub/grub.cfg").write_text("# generated\n")
    for name, wanted in (("update-grub", update_grub), ("systemctl", True)):
        if wanted:
            binary = root / "usr/sbin" / name if name == "update-grub" else root / "usr/bin" / name
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\nexit 99\n")  # never run: the tests record commands
            binary.chmod(0o755)
    if systemd:
        (root / "run/systemd/system").mkdir(parents=True)
    if irqbalance_pid is not None:
        (root / f"proc/{irqbalance_pid}").mkdir()
        (root / f"proc/{irqbalance_pid}/comm").write_text("irqbalance\n")
    if irqbalance_enabled:
        wants = root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True)
        (wants / "irqbalance.service").symlink_to("/lib/systemd/system/irqbalance.service")
    return root


@dataclass
class Recorder:
    """Stands in for running commands: records argv, answers with ``status``/``output``, and makes the
    change the real command would (update-grub regenerates grub.cfg, systemctl disable --now stops and
    disables irqbalance)."""

    root: Path
    status: int = 0
    output: str = ""
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        self.calls.append(tuple(argv))
        if self.status == 0:
            if argv[0].endswith("update-grub"):
                grub_cfg = self.root / "boot/grub/grub.cfg"
                grub_cfg.write_text("# regenerated\n")
                later = (self.root / DROPIN).stat().st_mtime + 1
                os.utime(grub_cfg, (later, later))
            elif argv[0].endswith("systemctl"):
                for comm in self.root.glob("proc/*/comm"):
                    if comm.read_text().strip() == "irqbalance":
                        comm.write_text("[exited]\n")
                for wants in self.root.glob("etc/systemd/system/*.wants"):
                    (wants / "irqbalance.service").unlink(missing_ok=True)
        return self.status, self.output


def snapshot(root: Path) -> dict[str, tuple[str, float]]:
    """Every file under root with its content and mtime (symlinks by target)."""
    out: dict[str, tuple[str, float]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path)] = (os.readlink(path), 0.0)
        elif path.is_file():
            out[str(path)] = (path.read_text(), path.stat().st_mtime)
        else:
            out[str(path)] = ("<dir>", 0.0)
    return out


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder(tmp_path / "host")
    monkeypatch.setattr(commands, "COMMAND_RUNNER", rec)
    return rec


def invoke(root: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(doctor_command, ["--fix", "--root", str(root), *args], input=input)


def dropin_line(args: str) -> str:
    return f'GRUB_CMDLINE_LINUX_DEFAULT="${{GRUB_CMDLINE_LINUX_DEFAULT}} {args}"'


# --- planning -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("online", "benchmark"),
    [("0-3", "1-3"), ("0-1", "1"), ("0-7", "2-7"), ("0,2,4-6", "2,4-6"), ("0-15", "2-15")],
)
def test_grub_dropin_isolates_this_hosts_benchmark_cpus(tmp_path: Path, online: str, benchmark: str) -> None:
    root = make_host(tmp_path / "host", cpus=online)
    plan = plan_fixes(root)
    [fix] = plan.fixes
    write, update = fix.steps
    assert isinstance(write, WriteFile) and isinstance(update, RunCommand)
    assert write.path == root / DROPIN and write.shown == "/etc/default/grub.d/bencher-runner.cfg"
    assert write.replaces is None
    args = f"isolcpus={benchmark} nohz_full={benchmark} rcu_nocbs={benchmark}"
    assert dropin_line(args) in write.content.splitlines()
    assert "systemd.unified_cgroup_hierarchy" not in boot_args(write.content)  # cgroup v2 already
    assert update.argv == ("/usr/sbin/update-grub",)
    assert fix.reboot


def test_single_cpu_host_gets_no_isolation_args(tmp_path: Path) -> None:
    root = make_host(tmp_path / "host", cpus="0")
    plan = plan_fixes(root)
    assert plan.fixes == ()
    assert any("need nothing" in line for line in plan.settled)


@pytest.mark.parametrize("layout", ["v1/hybrid", "v1 with isolation already booted"])
def test_cgroup_v1_host_gets_the_unified_hierarchy_parameter(tmp_path: Path, layout: str) -> None:
    cmdline = DEFAULT_CMDLINE.strip()
    if layout != "v1/hybrid":
        cmdline += " isolcpus=1-3 nohz_full=1-3 rcu_nocbs=1-3"
    root = make_host(tmp_path / "host", cmdline=cmdline, cgroup_v2=False)
    [fix] = plan_fixes(root).fixes
    write = fix.steps[0]
    assert isinstance(write, WriteFile)
    wanted = boot_args(write.content)
    assert wanted["systemd.unified_cgroup_hierarchy"] == "1"
    if layout == "v1/hybrid":
        assert wanted["isolcpus"] == wanted["nohz_full"] == wanted["rcu_nocbs"] == "1-3"
    else:  # set on the command line by someone else: not repeated
        assert set(wanted) == {"systemd.unified_cgroup_hierarchy"}


def test_only_missing_isolation_args_and_args_set_in_other_grub_files_are_left(tmp_path: Path) -> None:
    root = make_host(tmp_path / "host", cmdline=DEFAULT_CMDLINE.strip() + " isolcpus=1-3")
    (root / "etc/default/grub.d").mkdir()
    (root / "etc/default/grub.d/zz-bencher-isolation.cfg").write_text(
        "# rcu_nocbs=1-3 in a comment does not count\n"
        'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT nohz_full=1-3"\n'
    )
    [fix] = plan_fixes(root).fixes
    write = fix.steps[0]
    assert isinstance(write, WriteFile)
    assert boot_args(write.content) == {"rcu_nocbs": "1-3"}
    assert any("nohz_full is set in /etc/default/grub.d/zz-bencher-isolation.cfg" in n for n in fix.notes)


def test_boot_args_parsing() -> None:
    assert boot_args("ro isolcpus=1 quiet isolcpus=2-3 nohz_full=2-3") == {
        "isolcpus": "2-3",
        "nohz_full": "2-3",
    }
    assert boot_args("# isolcpus=1\n  # nohz_full=1\n") == {}
    assert boot_args('X="${X} rcu_nocbs=4-7"\n') == {"rcu_nocbs": "4-7"}
    assert boot_args("myisolcpus=1 isolcpus_x=2 systemd.unified_cgroup_hierarchy=0") == {
        "systemd.unified_cgroup_hierarchy": "0"
    }


@pytest.mark.parametrize(("running", "enabled"), [(True, True), (True, False), (False, True)])
def test_irqbalance_is_disabled_where_systemd_runs(tmp_path: Path, running: bool, enabled: bool) -> None:
    root = make_host(
        tmp_path / "host",
        cmdline=DEFAULT_CMDLINE.strip() + " isolcpus=1-3 nohz_full=1-3 rcu_nocbs=1-3",
        irqbalance_pid=812 if running else None,
        irqbalance_enabled=enabled,
    )
    [fix] = plan_fixes(root).fixes
    assert fix.name == "irqbalance" and not fix.reboot
    assert fix.steps == (RunCommand(("/usr/bin/systemctl", "disable", "--now", "irqbalance")),)
    assert ("pid 812" in fix.summary) == running
    if not running:
        assert "enabled at boot (multi-user.target.wants)" in fix.summary


def test_irqbalance_without_systemd_says_what_it_would_do(tmp_path: Path, recorder: Recorder) -> None:
    root = make_host(
        tmp_path / "host",
        cmdline=DEFAULT_CMDLINE.strip() + " isolcpus=1-3 nohz_full=1-3 rcu_nocbs=1-3",
        systemd=False,
        irqbalance_pid=812,
    )
    [fix] = plan_fixes(root).fixes
    assert fix.manual
    assert "systemd is not running" in fix.notes[0]
    assert "systemctl disable --now irqbalance" in fix.notes[0]
    before = snapshot(root)
    result = invoke(root)  # nothing to confirm: no terminal needed
    assert result.exit_code == 0, result.output
    assert "not applied" in result.stdout and "systemd is not running" in result.stdout
    assert recorder.calls == [] and snapshot(root) == before


def test_host_without_grub_gets_a_manual_note_and_nothing_written(tmp_path: Path, recorder: Recorder) -> None:
    root = make_host(tmp_path / "host", grub=False)
    [fix] = plan_fixes(root).fixes
    assert fix.manual and "no GRUB configuration at /etc/default/grub" in fix.notes[0]
    assert "isolcpus=1-3 nohz_full=1-3 rcu_nocbs=1-3" in fix.notes[0]
    result = invoke(root, "--yes")
    assert result.exit_code == 0, result.output
    assert not (root / "etc").exists() and recorder.calls == []


def test_missing_update_grub_is_a_note_not_a_command(tmp_path: Path) -> None:
    root = make_host(tmp_path / "host", update_grub=False)
    [fix] = plan_fixes(root).fixes
    assert [type(s) for s in fix.steps] == [WriteFile]
    assert any("update-grub not found" in n and "grub-mkconfig" in n for n in fix.notes)


# --- applying -----------------------------------------------------------------------------------


def test_fix_yes_applies_every_fix_then_a_second_run_changes_nothing(
    tmp_path: Path, recorder: Recorder
) -> None:
    root = make_host(recorder.root, cgroup_v2=False, irqbalance_pid=812, irqbalance_enabled=True)
    grub_before = (root / "etc/default/grub").read_text()
    first = invoke(root, "--yes")
    assert first.exit_code == 0, first.output
    assert recorder.calls == [
        ("/usr/sbin/update-grub",),
        ("/usr/bin/systemctl", "disable", "--now", "irqbalance"),
    ]
    dropin = root / DROPIN
    args = "isolcpus=1-3 nohz_full=1-3 rcu_nocbs=1-3 systemd.unified_cgroup_hierarchy=1"
    assert dropin_line(args) in dropin.read_text().splitlines()
    assert dropin.stat().st_mode & 0o777 == 0o644
    assert (root / "etc/default/grub").read_text() == grub_before  # never edited
    assert "applied 2 of 2" in first.stdout and "reboot this host" in first.stdout

    before = snapshot(root)
    second = invoke(root, "--yes")
    assert second.exit_code == 0, second.output
    assert "nothing to fix" in second.stdout
    assert "already in place" in second.stdout and "reboot pending" in second.stdout
    assert len(recorder.calls) == 2 and snapshot(root) == before

    # after the reboot the parameters are on /proc/cmdline (and cgroup v2 is up): still nothing to do,
    # and the drop-in keeps them rather than dropping what now "is already set"
    (root / "proc/cmdline").write_text(DEFAULT_CMDLINE.strip() + " " + args + "\n")
    (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpuset cpu memory pids\n")
    rebooted = snapshot(root)
    third = invoke(root, "--yes")
    assert third.exit_code == 0, third.output
    assert "nothing to fix" in third.stdout and "reboot pending" not in third.stdout
    assert len(recorder.calls) == 2 and snapshot(root) == rebooted
    assert rebooted[str(dropin)] == before[str(dropin)]


def test_a_changed_cpu_layout_rewrites_the_dropin(tmp_path: Path, recorder: Recorder) -> None:
    root = make_host(recorder.root)
    assert invoke(root, "--yes").exit_code == 0
    (root / "sys/devices/system/cpu/online").write_text("0-7\n")
    result = invoke(root, "--yes")
    assert result.exit_code == 0, result.output
    assert "replacing its current content" in result.stdout
    assert boot_args((root / DROPIN).read_text()) == {
        "isolcpus": "2-7",
        "nohz_full": "2-7",
        "rcu_nocbs": "2-7",
    }
    assert recorder.calls == [("/usr/sbin/update-grub",)] * 2


def test_stale_grub_cfg_reruns_update_grub_only(tmp_path: Path, recorder: Recorder) -> None:
    root = make_host(recorder.root)
    recorder.status, recorder.output = 1, "/usr/sbin/grub-probe: error: failed to get canonical path\n"
    assert invoke(root, "--yes").exit_code == 1  # the drop-in is written, update-grub fails
    recorder.status = 0
    content = (root / DROPIN).read_text()
    result = invoke(root, "--yes")
    assert result.exit_code == 0, result.output
    assert "older than /etc/default/grub.d/bencher-runner.cfg" in result.stdout
    assert "write " not in result.stdout and (root / DROPIN).read_text() == content
    assert recorder.calls == [("/usr/sbin/update-grub",)] * 2
    assert "nothing to fix" in invoke(root, "--yes").stdout


def test_dry_run_prints_exact_contents_and_commands_and_changes_nothing(
    tmp_path: Path, recorder: Recorder
) -> None:
    root = make_host(recorder.root, cgroup_v2=False, irqbalance_pid=812)
    expected = plan_fixes(root)
    before = snapshot(root)
    result = invoke(root, "--dry-run")  # no terminal and no --yes: a dry run needs neither
    assert result.exit_code == 0, result.output
    assert snapshot(root) == before and recorder.calls == []
    write = expected.fixes[0].steps[0]
    assert isinstance(write, WriteFile)
    for line in write.content.splitlines():
        assert f"    {line}\n" in result.stdout
    assert "write /etc/default/grub.d/bencher-runner.cfg (new file, mode 0644):" in result.stdout
    assert "run: /usr/sbin/update-grub\n" in result.stdout
    assert "run: /usr/bin/systemctl disable --now irqbalance\n" in result.stdout
    assert "then reboot" in result.stdout and "dry run: nothing was changed" in result.stdout


def test_no_terminal_without_yes_refuses_in_one_line(tmp_path: Path, recorder: Recorder) -> None:
    root = make_host(recorder.root, irqbalance_pid=812)
    before = snapshot(root)
    result = invoke(root)
    assert result.exit_code == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "no terminal to confirm 2 fix(es)" in line and "--yes" in line and "--dry-run" in line
    assert snapshot(root) == before and recorder.calls == []


def test_each_fix_is_confirmed_at_a_terminal(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands, "stdin_is_terminal", lambda: True)
    root = make_host(recorder.root, irqbalance_pid=812)
    result = invoke(root, input="y\nn\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("apply this fix?") == 2
    assert (root / DROPIN).is_file()
    assert recorder.calls == [("/usr/sbin/update-grub",)]  # irqbalance declined
    assert "skipped" in result.stdout and "applied 1 of 2" in result.stdout
    # declining everything changes nothing
    again = invoke(root, input="n\n")
    assert again.exit_code == 0 and recorder.calls == [("/usr/sbin/update-grub",)]


def test_a_host_that_needs_nothing_says_so(tmp_path: Path, recorder: Recorder) -> None:
    root = make_host(
        recorder.root, cmdline=DEFAULT_CMDLINE.strip() + " isolcpus=1-3 nohz_full=1-3 rcu_nocbs=1-3"
    )
    before = snapshot(root)
    result = invoke(root)  # no terminal, no --yes: nothing to confirm, so no refusal
    assert result.exit_code == 0, result.output
    assert "nothing to fix" in result.stdout and "irqbalance: not running" in result.stdout
    assert snapshot(root) == before and recorder.calls == []


@pytest.mark.parametrize(
    ("status", "output", "shown"),
    [
        (
            1,
            "Generating grub configuration file ...\n/usr/sbin/grub-probe: error: failed\n",
            "/usr/sbin/grub-probe: error: failed",
        ),
        (127, "No such file or directory", "No such file or directory"),
        (1, "", "no output"),
        (2, "x" * 5000, "x" * 199 + "…"),
    ],
)
def test_a_failing_command_is_one_line(
    tmp_path: Path, recorder: Recorder, status: int, output: str, shown: str
) -> None:
    root = make_host(recorder.root, irqbalance_pid=812)
    recorder.status, recorder.output = status, output
    result = invoke(root, "--yes")
    assert result.exit_code == 1
    grub, irq = result.stderr.splitlines()  # one line per failed fix
    assert grub.startswith("  failed: GRUB drop-in: `/usr/sbin/update-grub` ")
    assert irq.startswith("  failed: irqbalance: `/usr/bin/systemctl disable --now irqbalance` ")
    for line in (grub, irq):
        assert f"exited with status {status}: " in line and line.endswith(shown)
    assert "Traceback" not in result.output
    # the other fix still ran (and failed on its own)
    assert recorder.calls[-1] == ("/usr/bin/systemctl", "disable", "--now", "irqbalance")
    assert "applied 0 of 2 fix(es), 2 failed" in result.stdout


def test_an_unwritable_dropin_is_one_line_and_update_grub_does_not_run(
    tmp_path: Path, recorder: Recorder
) -> None:
    root = make_host(recorder.root)
    (root / "etc/default/grub.d").write_text("not a directory\n")
    result = invoke(root, "--yes")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("  failed: cannot write /etc/default/grub.d/bencher-runner.cfg: ")
    assert recorder.calls == []


def test_commands_never_run_on_this_host_for_another_root(tmp_path: Path) -> None:
    root = make_host(tmp_path / "host")  # no recorder: the real runner is in place
    result = invoke(root, "--yes")
    assert result.exit_code == 1
    assert "not run: --root" in result.stderr and (root / DROPIN).is_file()


@pytest.mark.parametrize(
    "args", [["--yes"], ["--dry-run"], ["--fix", "--json"], ["--fix", "--dry-run", "--json"]]
)
def test_flag_combinations_that_make_no_sense_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(doctor_command, [*args, "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "--fix" in result.stderr


def test_write_file_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "etc/default/grub.d/bencher-runner.cfg"
    fixes.write_file(WriteFile(target, "/x", "one\n", None))
    fixes.write_file(WriteFile(target, "/x", "two\n", "one\n"))
    assert target.read_text() == "two\n"
    assert [p.name for p in target.parent.iterdir()] == ["bencher-runner.cfg"]
