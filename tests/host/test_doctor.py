"""`runner doctor` on this machine (TCG-only KVM, a virtualised host, no isolation boot args) and its
individual checks against fake trees."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bencher_runner.cli.doctor import doctor_command
from bencher_runner.doctor.checks import (
    DoctorEnv,
    check_cgroup,
    check_irqbalance,
    check_isolation_args,
    check_kvm,
    check_virtualised,
)
from bencher_runner.host.tuning import HostPaths
from bencher_runner.paths import cache_dir
from bencher_runner.sandbox.kernel import resolve_bundle
from bencher_runner.spec.errors import RunnerError


def _real_cache() -> Path:
    cache = cache_dir()
    try:
        resolve_bundle(cache, None, None)
    except RunnerError:
        pytest.skip("no kernel bundle on this host (run `runner kernel fetch`)")
    return cache


def test_doctor_on_this_machine_json() -> None:
    cache = _real_cache()  # the KVM probe answer is cached here (up to 15 s on the first run)
    result = CliRunner().invoke(doctor_command, ["--cache-dir", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["ok"] is True
    checks = {c["name"]: c for c in doc["checks"]}
    for name in ("QEMU", "kernel bundle", "guest agent", "e2fsprogs"):
        assert checks[name]["status"] == "ok", checks[name]
    kvm = checks["KVM"]
    assert kvm["status"] == "warn" and kvm["detail"].startswith("TCG only") and kvm["fix"]
    virt = checks["virtualisation"]
    assert virt["status"] == "warn" and "virtualised host" in virt["detail"] and virt["fix"]
    iso = checks["isolation boot args"]
    assert iso["status"] == "warn"
    for arg in ("isolcpus", "nohz_full", "rcu_nocbs"):
        assert arg in iso["detail"] and f"{arg}=" in iso["fix"]
    assert "cgroup" in checks and "irqbalance" in checks
    assert any(name.startswith("tuning: swappiness") for name in checks)
    assert any(name.startswith("tuning: cstates") for name in checks)


def test_doctor_table_output() -> None:
    cache = _real_cache()
    result = CliRunner().invoke(doctor_command, ["--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    for text in ("TCG only", "virtualised host", "isolcpus", "this host can run jobs"):
        assert text in result.output


def test_doctor_fails_without_kernel_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCHER_RUNNER_KERNEL", raising=False)
    monkeypatch.delenv("BENCHER_RUNNER_KERNEL_MODULES", raising=False)
    result = CliRunner().invoke(doctor_command, ["--cache-dir", str(tmp_path), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.output)
    bundle = next(c for c in doc["checks"] if c["name"] == "kernel bundle")
    assert bundle["status"] == "fail" and "runner kernel fetch" in bundle["fix"]
    assert doc["ok"] is False


def test_kvm_probe_answer_is_cached(tmp_path: Path) -> None:
    qemu, kernel = tmp_path / "qemu", tmp_path / "vmlinuz"
    qemu.write_text("q")
    kernel.write_text("k")
    calls: list[str] = []

    def probe(q: str, k: Path) -> str | None:
        calls.append(q)
        return "a test guest did not boot under KVM"

    env = DoctorEnv(cache=tmp_path / "cache", kvm_probe=probe)
    first = check_kvm(env, str(qemu), kernel)
    second = check_kvm(env, str(qemu), kernel)
    assert first == second and first.status == "warn" and "TCG only" in first.detail
    assert len(calls) == 1
    ok = check_kvm(DoctorEnv(cache=tmp_path / "other", kvm_probe=lambda q, k: None), str(qemu), kernel)
    assert ok.status == "ok"


def test_isolation_args() -> None:
    assert check_isolation_args("quiet isolcpus=1-3 nohz_full=1-3 rcu_nocbs=1-3", (0, 1, 2, 3)).status == "ok"
    partial = check_isolation_args("quiet isolcpus=1-3", (0, 1, 2, 3))
    assert partial.status == "warn" and "nohz_full" in partial.detail and "isolcpus" not in partial.detail
    assert partial.fix and "nohz_full=1-3" in partial.fix
    assert check_isolation_args("quiet", (0,)).status == "info"


def test_cgroup_check(tmp_path: Path) -> None:
    assert check_cgroup(tmp_path).status == "warn"  # no cgroup.controllers: v1/hybrid
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert check_cgroup(tmp_path).status == "ok"
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    partial = check_cgroup(tmp_path)
    assert partial.status == "warn" and "cpuset" in partial.detail and "memory" in partial.detail


def test_irqbalance_check(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1/comm").write_text("systemd\n")
    assert check_irqbalance(tmp_path).status == "ok"
    (tmp_path / "77").mkdir()
    (tmp_path / "77/comm").write_text("irqbalance\n")
    running = check_irqbalance(tmp_path)
    assert running.status == "warn" and "77" in running.detail and running.fix


def test_virtualised_check(tmp_path: Path) -> None:
    paths = HostPaths(proc=tmp_path / "proc", sys=tmp_path / "sys", dev=tmp_path / "dev")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("flags\t\t: fpu vme sse\n")
    (tmp_path / "sys/class/dmi/id").mkdir(parents=True)
    (tmp_path / "sys/class/dmi/id/sys_vendor").write_text("Dell Inc.\n")
    assert check_virtualised(paths, lambda name: None).status == "ok"
    (tmp_path / "sys/class/dmi/id/sys_vendor").write_text("QEMU\n")
    (tmp_path / "proc/cpuinfo").write_text("flags\t\t: fpu vme sse hypervisor\n")
    virt = check_virtualised(paths, lambda name: None)
    assert virt.status == "warn" and "QEMU" in virt.detail and "hypervisor" in virt.detail


def test_doctor_shows_the_daemon_preflight_verdict(tmp_path: Path) -> None:
    from bencher_runner.cli.doctor import _preflight_check

    check = _preflight_check(tmp_path / "empty-cache")
    assert check.status == "fail" and "runner kernel fetch" in (check.fix or "")


def test_doctor_fix_writes_what_the_checks_print(tmp_path: Path) -> None:
    """`runner doctor --fix` plans from the same inputs as the checks: the drop-in holds the exact
    arguments the isolation and cgroup rows print, and the irqbalance command is the one its row gives."""
    from bencher_runner.doctor.fixes import DROPIN, RunCommand, WriteFile, boot_args, plan_fixes

    root = tmp_path
    (root / "proc/4242").mkdir(parents=True)
    (root / "proc/4242/comm").write_text("irqbalance\n")
    (root / "proc/cmdline").write_text("ro quiet\n")
    (root / "sys/devices/system/cpu").mkdir(parents=True)
    (root / "sys/devices/system/cpu/online").write_text("0-5\n")
    (root / "sys/fs/cgroup").mkdir(parents=True)
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/grub").write_text('GRUB_CMDLINE_LINUX_DEFAULT="quiet"\n')
    (root / "run/systemd/system").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/systemctl").write_text("#!/bin/sh\n")
    (root / "usr/bin/systemctl").chmod(0o755)

    iso = check_isolation_args("ro quiet\n", (0, 1, 2, 3, 4, 5))
    cgroup = check_cgroup(root / "sys/fs/cgroup")
    irq = check_irqbalance(root / "proc")
    grub, irqbalance = plan_fixes(root).fixes
    write = grub.steps[0]
    assert isinstance(write, WriteFile) and write.path == root / DROPIN
    words = " ".join(f"{k}={v}" for k, v in boot_args(write.content).items())
    assert iso.fix and words.startswith("isolcpus=1-5 nohz_full=1-5 rcu_nocbs=1-5")
    assert f'"{words.removesuffix(" systemd.unified_cgroup_hierarchy=1")}"' in iso.fix
    assert (
        cgroup.fix
        and "systemd.unified_cgroup_hierarchy=1" in cgroup.fix
        and words.endswith("systemd.unified_cgroup_hierarchy=1")
    )
    assert irqbalance.steps == (RunCommand(("/usr/bin/systemctl", *(irq.fix or "").split()[1:])),)
    assert "pid 4242" in irqbalance.summary


def test_doctor_table_points_at_fix_when_it_has_fixes_to_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bencher_runner.doctor import fixes

    monkeypatch.delenv("BENCHER_RUNNER_KERNEL", raising=False)
    monkeypatch.delenv("BENCHER_RUNNER_KERNEL_MODULES", raising=False)
    step = fixes.RunCommand(("/usr/bin/systemctl", "disable", "--now", "irqbalance"))
    plan = fixes.FixPlan((fixes.Fix("irqbalance", "running", (step,)),))
    monkeypatch.setattr(fixes, "plan_fixes", lambda root: plan)
    result = CliRunner().invoke(doctor_command, ["--cache-dir", str(tmp_path)])
    assert "`runner doctor --fix` applies 1 of these fixes" in result.output
    monkeypatch.setattr(fixes, "plan_fixes", lambda root: fixes.FixPlan(()))
    result = CliRunner().invoke(doctor_command, ["--cache-dir", str(tmp_path)])
    assert "runner doctor --fix" not in result.output and "this host cannot run jobs yet" in result.output
