"""The jail plan and the argv that applies it (sandbox/jail.py), its Firecracker mapping, the sweep."""

import contextlib
import ipaddress
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bencher_runner.cli import main
from bencher_runner.recovery import kill_jail_processes, orphaned_jail_processes, remove_stale_work_dirs
from bencher_runner.sandbox import firecracker as fc
from bencher_runner.sandbox.jail import (
    JAIL_KERNEL,
    JAIL_SERIAL,
    TUN,
    Bind,
    JailPlan,
    JailTools,
    bwrap_argv,
    hand_over,
    jail_problem,
    jail_vm,
    private_device,
    read_child_pid,
    vmm_pid,
)
from bencher_runner.sandbox.netns import RECORD, JobNetwork
from bencher_runner.sandbox.network import user_nat
from bencher_runner.sandbox.qemu import qemu_argv
from bencher_runner.sandbox.vm import VmSpec
from bencher_runner.spec.config import DEFAULT_JAIL_UID, HostSettings, make_run_config
from bencher_runner.spec.errors import SandboxError, SpecError
from bencher_runner.spec.jobspec import build_config_from_job, parse_job

TOOLS = JailTools(
    "/usr/bin/bwrap", "/usr/bin/setpriv", "/usr/bin/prlimit", "/usr/bin/nsenter", "/usr/bin/env"
)
LINK = ipaddress.IPv4Network("100.64.0.0/30")
MERGED = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/sbin"}


def spec(work: Path = Path("/w/job-1/iter-1"), **kw: object) -> VmSpec:
    base: dict[str, object] = dict(
        kernel=Path("/cache/kernel/vmlinux"), initrd=work / "initrd.cpio", rootfs=work / "rootfs.ext4",
        output_disk=work / "output.img", serial_log=work / "serial.log", vcpus=2, memory_mib=512, accel="tcg",
    )  # fmt: skip
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def pairs(argv: list[str], flag: str, arity: int = 2) -> list[tuple[str, ...]]:
    return [tuple(argv[i + 1 : i + 1 + arity]) for i, a in enumerate(argv) if a == flag]


def chain(argv: list[str]) -> list[str]:
    """The programs of the chain, in order (each one's argv ends at its `--`)."""
    programs, take = [], True
    for arg in argv:
        if take:
            programs.append(arg)
        take = arg == "--"
    return programs


# ---- the plan -----------------------------------------------------------------------------------


def test_the_vm_files_are_bound_at_the_jail_paths_and_qemu_is_told_those() -> None:
    plan, inside = jail_vm(spec(), "/usr/bin/qemu-system-x86_64", uid=64434, gid=64435)
    assert {(str(b.source), b.target, b.writable) for b in plan.binds} == {
        ("/cache/kernel/vmlinux", "/vmlinux", False),
        ("/w/job-1/iter-1/initrd.cpio", "/initrd.cpio", False),
        ("/w/job-1/iter-1/rootfs.ext4", "/rootfs.ext4", True),
        ("/w/job-1/iter-1/output.img", "/output.img", True),
        ("/w/job-1/iter-1/serial.log", "/serial.log", True),
    }
    argv = qemu_argv(str(plan.binary), inside)
    assert argv[argv.index("-kernel") + 1] == JAIL_KERNEL
    assert f"file:{JAIL_SERIAL}" in argv
    assert not any("/w/job-1" in a or "/cache" in a for a in argv)  # no host path reaches QEMU
    assert plan.devices == () and plan.netns is None and plan.environment == {}


def test_devices_and_resolver_follow_the_vm() -> None:
    kvm, _ = jail_vm(spec(accel="kvm"), "/q", uid=1, gid=1)
    assert [d.target for d in kvm.devices] == ["/dev/kvm"]
    tap_plan = JobNetwork("bencher-00000001", LINK, "")
    tap, _ = jail_vm(spec(network=tap_plan.plan), "/q", uid=1, gid=1, netns="bencher-00000001")
    assert [d.target for d in tap.devices] == [TUN] and tap.netns == "bencher-00000001"
    user, _ = jail_vm(spec(network=user_nat()), "/q", uid=1, gid=1, netns="n", resolv_conf=Path("/w/r"))
    assert Bind(Path("/w/r"), "/etc/resolv.conf") in user.binds and user.devices == ()


@pytest.mark.parametrize(("uid", "gid"), [(0, 64434), (64434, 0), (0, 0)])
def test_root_is_refused(uid: int, gid: int) -> None:
    with pytest.raises(SandboxError, match="0 is root; give --jail-uid/--jail-gid"):
        JailPlan(uid=uid, gid=gid, binary=Path("/q"))


# ---- the argv chain -----------------------------------------------------------------------------


def test_chain_without_network() -> None:
    plan, _ = jail_vm(spec(), "/usr/bin/qemu-system-x86_64", uid=64434, gid=64435)
    argv = bwrap_argv(
        plan, TOOLS, ["/usr/bin/qemu-system-x86_64", "-M", "microvm"], root_links=MERGED, info_fd=9
    )
    assert chain(argv) == [
        "/usr/bin/prlimit",
        "/usr/bin/bwrap",
        "/usr/bin/setpriv",
        "/usr/bin/env",
        "/usr/bin/qemu-system-x86_64",
    ]
    assert argv[-3:] == ["/usr/bin/qemu-system-x86_64", "-M", "microvm"]
    assert {"--core=0", "--nofile=4096", "--nproc=1024"} <= set(argv[: argv.index("--")])
    bwrap = argv[argv.index("/usr/bin/bwrap") : argv.index("/usr/bin/setpriv")]
    for flag in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
                 "--new-session", "--clearenv"):  # fmt: skip
        assert flag in bwrap, flag
    assert "--unshare-user" not in bwrap and "--unshare-all" not in bwrap  # uid 64434 must be the host's
    assert pairs(bwrap, "--cap-drop", 1) == [("ALL",)]
    assert pairs(bwrap, "--cap-add", 1) == [("CAP_SETUID",), ("CAP_SETGID",), ("CAP_SETPCAP",)]
    assert ("/usr", "/usr") in pairs(bwrap, "--ro-bind") and ("usr/lib", "/lib") in pairs(bwrap, "--symlink")
    assert ("/cache/kernel/vmlinux", "/vmlinux") in pairs(bwrap, "--ro-bind")
    assert ("/w/job-1/iter-1/rootfs.ext4", "/rootfs.ext4") in pairs(bwrap, "--bind")
    assert set(pairs(bwrap, "--bind")) == {
        ("/w/job-1/iter-1/rootfs.ext4", "/rootfs.ext4"), ("/w/job-1/iter-1/output.img", "/output.img"),
        ("/w/job-1/iter-1/serial.log", "/serial.log"),
    }  # fmt: skip
    assert ("/",) in pairs(bwrap, "--remount-ro", 1) and ("9",) in pairs(bwrap, "--info-fd", 1)
    assert "--proc" not in bwrap  # no /proc: nothing of other processes to list
    setpriv = argv[argv.index("/usr/bin/setpriv") : argv.index("/usr/bin/env")]
    for flag in ("--reuid=64434", "--regid=64435", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
                 "--no-new-privs", "--pdeathsig=SIGKILL"):  # fmt: skip
        assert flag in setpriv, flag
    assert argv[argv.index("/usr/bin/env") + 1 : argv.index("/usr/bin/env") + 3] == ["-i", "--"]


def test_chain_with_a_job_network_joins_it_and_gets_no_empty_one() -> None:
    plan, _ = jail_vm(spec(network=user_nat()), "/usr/bin/q", uid=5, gid=5, netns="bencher-0000abcd")
    argv = bwrap_argv(plan, TOOLS, ["/usr/bin/q"], root_links=MERGED)
    assert argv[:3] == ["/usr/bin/nsenter", "--net=/run/netns/bencher-0000abcd", "--"]
    assert "--unshare-net" not in argv and "--info-fd" not in argv


def test_a_binary_outside_usr_and_device_parents_are_bound_with_traversable_parents() -> None:
    tap = JobNetwork("bencher-1", LINK, "").plan
    plan, _ = jail_vm(spec(network=tap), "/opt/qemu/bin/qemu", uid=5, gid=5, netns="bencher-1")
    argv = bwrap_argv(plan, TOOLS, ["/opt/qemu/bin/qemu"], root_links={"lib": None})
    dirs = [argv[i + 3] for i, a in enumerate(argv) if a == "--perms" and argv[i + 1] == "0755"]
    assert dirs == ["/dev/net", "/opt", "/opt/qemu", "/opt/qemu/bin"]  # bwrap would make them 0700
    assert ("/opt/qemu/bin/qemu", "/opt/qemu/bin/qemu") in pairs(argv, "--ro-bind")
    assert ("/lib", "/lib") in pairs(argv, "--ro-bind")  # a host without merged /usr
    assert ("/dev/net/tun", "/dev/net/tun") in pairs(argv, "--dev-bind")


# ---- the host's side ----------------------------------------------------------------------------


def test_an_unprivileged_runner_is_refused_with_the_fix() -> None:
    problem = jail_problem(euid=1000)
    assert problem is not None and "needs root" in problem and "--danger-no-jail" in problem
    assert "\n" not in problem


def test_missing_tools_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    problem = jail_problem(euid=0)
    assert problem is not None and "bwrap, setpriv, prlimit, nsenter" in problem
    assert "apt-get install bubblewrap util-linux" in problem


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the jail uid needs root")
def test_hand_over_gives_the_jail_uid_its_files_only(tmp_path: Path) -> None:
    for name in ("rootfs.ext4", "output.img", "initrd.cpio"):
        (tmp_path / name).write_bytes(b"x")
    plan, _ = jail_vm(spec(tmp_path, kernel=tmp_path / "initrd.cpio"), "/q", uid=64434, gid=64435)
    hand_over(plan)
    owners = {
        p.name: (p.stat().st_uid, p.stat().st_gid, p.stat().st_mode & 0o777) for p in tmp_path.iterdir()
    }
    assert owners["serial.log"] == owners["rootfs.ext4"] == owners["output.img"] == (64434, 64435, 0o600)
    assert owners["initrd.cpio"][:2] == (0, 0)  # read-only inputs stay root's


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_root_only_device_becomes_a_private_node(tmp_path: Path) -> None:
    null = Path("/dev/null")  # 0666: used as it is
    assert private_device(null, tmp_path, 64434, 64434) == null
    device = tmp_path / "root-only"
    os.mknod(device, 0o600 | 0o020000, os.stat("/dev/null").st_rdev)
    node = private_device(device, tmp_path, 64434, 64434)
    st = node.stat()
    assert node.parent == tmp_path and st.st_rdev == os.stat("/dev/null").st_rdev
    assert (st.st_uid, st.st_mode & 0o777) == (64434, 0o600)
    assert device.stat().st_mode & 0o777 == 0o600  # the host's node is never opened up


def test_read_child_pid(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.write(w, b'{\n    "child-pid": 4242\n}\n')
    os.close(w)
    assert read_child_pid(r, timeout_s=1) == 4242
    os.close(r)
    r, w = os.pipe()
    os.close(w)  # bwrap failed before it started the sandbox
    assert read_child_pid(r, timeout_s=1) is None
    os.close(r)


def test_vmm_pid_is_the_child_of_the_init(tmp_path: Path) -> None:
    task = tmp_path / "7" / "task" / "7"
    task.mkdir(parents=True)
    (task / "children").write_text("12 ")
    assert vmm_pid(7, timeout_s=0.1, proc=tmp_path) == 12
    assert vmm_pid(8, timeout_s=0.1, proc=tmp_path) is None  # the init is gone


# ---- Firecracker: the same policy through its jailer ---------------------------------------------


def test_the_jailer_gets_the_plan() -> None:
    plan, _ = jail_vm(spec(accel="kvm"), "/opt/firecracker", uid=64434, gid=64435, netns="bencher-0000abcd")
    config = fc.jailer_config(plan, "/usr/bin/jailer", Path("/srv/jailer"))
    argv = fc.jailer_argv(config, "/opt/firecracker", "bencher-1", fc.JAIL_API_SOCK, "Warning")
    assert argv[0].endswith("prlimit") and argv[1:4] == ["--core=0", "--nproc=1024", "--"]
    jailer = argv[4 : argv.index("--", 4)]
    assert jailer[0] == "/usr/bin/jailer"
    opts = list(zip(jailer[1::2], jailer[2::2], strict=True))
    assert ("--uid", "64434") in opts and ("--gid", "64435") in opts
    assert ("--netns", "/var/run/netns/bencher-0000abcd") in opts
    assert ("--resource-limit", "no-file=4096") in opts
    assert config.env == () and fc.jail_files(False).kernel == JAIL_KERNEL


def test_a_jailed_firecracker_never_gets_the_hosts_network() -> None:
    plan, _ = jail_vm(spec(accel="kvm"), "/opt/firecracker", uid=64434, gid=64434)
    with pytest.raises(SandboxError, match="needs a network namespace"):
        fc.jailer_config(plan, "/usr/bin/jailer", Path("/srv/jailer"))


# ---- flags ----------------------------------------------------------------------------------------


def test_jail_ids_default_and_refuse_root() -> None:
    config = make_run_config(image="x")
    assert (config.host.jail_uid, config.host.jail_gid, config.host.danger_no_jail) == (
        DEFAULT_JAIL_UID,
        DEFAULT_JAIL_UID,
        False,
    )
    with pytest.raises(SpecError, match="jail_uid=0"):
        make_run_config(image="x", jail_uid=0)
    with pytest.raises(SpecError, match="jail_gid=0"):
        make_run_config(image="x", jail_gid=0)


@pytest.mark.parametrize(
    "command",
    [["run", "--image", "x"], ["up", "--host", "http://127.0.0.1:1", "--runner", "r", "--key", "k"]],
)
def test_the_cli_refuses_uid_0(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--jail-uid", "0"])
    assert result.exit_code == 2 and "--jail-uid" in result.output


def test_host_settings_reach_the_run_config() -> None:
    job = parse_job(
        {
            "uuid": "00000000-0000-4000-8000-000000000001",
            "spec": {"cpu": 1, "memory": 1 << 28, "disk": 1 << 28, "network": False,
                     "sandbox": "firecracker"},
            "config": {"registry": "https://r.example", "project": "00000000-0000-4000-8000-000000000002",
                       "digest": "sha256:" + "a" * 64, "timeout": 10},
        }
    )  # fmt: skip
    config = build_config_from_job(job, HostSettings(jail_uid=70000, jail_gid=70001, danger_no_jail=True))
    assert (config.host.jail_uid, config.host.jail_gid, config.host.danger_no_jail) == (70000, 70001, True)


# ---- the sweep ----------------------------------------------------------------------------------


TEST_UID = 64499  # not the default jail uid: a test never touches a real jail's processes


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_the_sweep_kills_orphans_of_the_jail_uid_only() -> None:
    setpriv = ["setpriv", f"--reuid={TEST_UID}", f"--regid={TEST_UID}", "--clear-groups", "sleep", "60"]
    live = subprocess.Popen(setpriv)  # its parent (this test) is alive: a live job's VMM
    orphan = subprocess.run(
        ["sh", "-c", f"{' '.join(setpriv)} >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan_pid = int(orphan.stdout)
    try:
        deadline = time.monotonic() + 5
        while orphan_pid not in orphaned_jail_processes(TEST_UID) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert orphaned_jail_processes(TEST_UID) == [orphan_pid]
        assert kill_jail_processes(TEST_UID) == [orphan_pid]
        assert live.poll() is None
        assert kill_jail_processes(0) == []  # never root's
    finally:
        live.kill()
        live.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan_pid, signal.SIGKILL)


def test_the_sweep_removes_an_iterations_network_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bencher_runner import recovery

    released: list[Path] = []
    monkeypatch.setattr(recovery, "release_stale_network", lambda work: released.append(work))
    stale = tmp_path / "work" / "job-stale"
    (stale / "iter-2").mkdir(parents=True)
    (stale / "iter-2" / RECORD).write_text('{"name": "bencher-00000001"}')
    os.utime(stale, (0, 0))
    assert remove_stale_work_dirs(tmp_path) == [stale]
    assert released == [stale, stale / "iter-2"]
