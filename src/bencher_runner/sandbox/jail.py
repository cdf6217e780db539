"""The jail around every VM monitor process (QEMU, Firecracker): the second wall after the microVM.

A benchmark image is untrusted code; one device-model or TCG bug turns the guest into the VMM process.
So the VMM never runs as root, sees only its own files, holds no secret and reaches no network it was
not given. `JailPlan` says what the VMM gets (pure data, built from the VM's inputs); two small
adapters turn it into a process:

- QEMU: a chain of standard tools in the argv, no Python code between fork and exec (a preexec_fn in a
  threaded runner is fragile): ``nsenter --net`` (the job's netns, when it has network) -> ``prlimit``
  (no core dumps, bounded open files and processes) -> ``bwrap`` (bubblewrap: fresh mount, PID, IPC,
  UTS and cgroup namespaces and, without network, an empty network namespace holding only ``lo``; a
  new root on a tmpfs made read-only, with /usr read-only, a minimal /dev and the VM's files bound at
  the fixed paths of JAIL_PATHS; every capability but the three setpriv needs dropped; dies with the
  runner) -> ``setpriv`` (the jail uid/gid, no groups, no capabilities, no_new_privs) -> ``env -i``
  (bwrap always sets PWD) -> the VMM. Bound into the jail, setpriv and env run from its /usr.
  Measured on QEMU 7.2 (Debian 12), its own ``-chroot DIR -runas 64434:64434`` instead: with our
  ``-sandbox ...,elevateprivileges=deny`` QEMU dies of SIGSYS at its setgid (the filter is in place
  first), so it needs elevateprivileges=allow; then it runs in the runner's mount and network
  namespaces, with the full capability bounding set, the runner's whole environment (35 variables
  here, the key among them), a core limit it may raise (hard: unlimited), no bound on processes or
  open files, and root-opened files reachable until it chroots after start-up. bwrap + setpriv give
  all of that up before QEMU's first instruction, with QEMU's seccomp filter unchanged.
- Firecracker: its own jailer, given the same uid/gid, network namespace and open-file bound, the same
  file names inside its chroot (JAIL_PATHS), and prlimit in front for what the jailer does not set.

The environment of every VMM is empty (VMM_ENV): no BENCHER_* variable, no key, no proxy settings.
Mounts live in the jail's own mount namespace and vanish with it; the only host state is the jail
uid's ownership of the iteration's disks and serial log, removed with the work directory.
"""

import contextlib
import json
import os
import select
import shutil
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from bencher_runner.sandbox.vm import VmSpec
from bencher_runner.sandbox.vmprocess import VmProcess
from bencher_runner.spec.errors import SandboxError

NOFILE_LIMIT = 4096  # a QEMU microVM with two disks and a NIC holds about 40
NPROC_LIMIT = 1024  # tasks (threads count) of the jail uid: QEMU's vCPU and I/O worker threads
VMM_ENV: dict[str, str] = {}  # what the VMM needs from the runner's environment: nothing

# Where a VM's files are inside every jail (QEMU's and Firecracker's chroot alike).
JAIL_KERNEL = "/vmlinux"
JAIL_INITRD = "/initrd.cpio"
JAIL_ROOTFS = "/rootfs.ext4"
JAIL_OUTPUT = "/output.img"
JAIL_SERIAL = "/serial.log"
JAIL_RESOLV = "/etc/resolv.conf"
KVM = "/dev/kvm"
TUN = "/dev/net/tun"
ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")  # merged-/usr names at the root
# setpriv needs these three to switch uid/gid and clear the bounding set; it drops them itself.
SETPRIV_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
INFO_WAIT_S = 10.0
JAIL_TOOLS = ("bwrap", "setpriv", "prlimit", "nsenter")


@dataclass(frozen=True)
class Bind:
    """A host file visible in the jail at ``target``; writable ones are handed to the jail uid."""

    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class JailPlan:
    """Everything the VMM gets; nothing else of the host is visible or reachable."""

    uid: int
    gid: int
    binary: Path  # the VMM, visible at its own path (its data files are found next to it)
    binds: tuple[Bind, ...] = ()
    devices: tuple[Bind, ...] = ()  # /dev/kvm, /dev/net/tun when the VM needs them
    node_dir: Path | None = None  # where private device nodes go (the iteration's dir)
    netns: str | None = None  # a job network namespace (`ip netns` name); None: a new, empty one
    nofile: int = NOFILE_LIMIT
    nproc: int = NPROC_LIMIT
    env: tuple[tuple[str, str], ...] = field(default_factory=lambda: tuple(VMM_ENV.items()))

    def __post_init__(self) -> None:
        if self.uid == 0 or self.gid == 0:
            raise SandboxError(
                f"the VM jail cannot run as uid {self.uid} / gid {self.gid}: 0 is root; "
                "give --jail-uid/--jail-gid an unused id (default 64434)"
            )

    @property
    def environment(self) -> dict[str, str]:
        return dict(self.env)


@dataclass(frozen=True)
class JailTools:
    bwrap: str
    setpriv: str
    prlimit: str
    nsenter: str
    env: str = "/usr/bin/env"


def jail_vm(
    spec: VmSpec,
    binary: str,
    *,
    uid: int,
    gid: int,
    netns: str | None = None,
    resolv_conf: Path | None = None,
) -> tuple[JailPlan, VmSpec]:
    """The plan for one VM and its spec as the VMM sees it inside the jail (its files at JAIL_*)."""
    binds = [
        Bind(spec.kernel, JAIL_KERNEL),
        Bind(spec.initrd, JAIL_INITRD),
        Bind(spec.rootfs, JAIL_ROOTFS, writable=True),
        Bind(spec.output_disk, JAIL_OUTPUT, writable=True),
        Bind(spec.serial_log, JAIL_SERIAL, writable=True),
    ]
    tap = spec.network is not None and any(a.startswith("tap,") for a in spec.network.qemu_args)
    if spec.network is not None and not tap and resolv_conf is not None:
        binds.append(Bind(resolv_conf, JAIL_RESOLV))  # user-mode NAT forwards DNS to this resolver
    devices = ((KVM,) if spec.accel == "kvm" else ()) + ((TUN,) if tap else ())
    plan = JailPlan(
        uid=uid,
        gid=gid,
        binary=Path(binary),
        binds=tuple(binds),
        devices=tuple(Bind(Path(device), device, writable=True) for device in devices),
        node_dir=spec.rootfs.parent,
        netns=netns,
    )
    inside = replace(
        spec,
        kernel=Path(JAIL_KERNEL),
        initrd=Path(JAIL_INITRD),
        rootfs=Path(JAIL_ROOTFS),
        output_disk=Path(JAIL_OUTPUT),
        serial_log=Path(JAIL_SERIAL),
    )
    return plan, inside


def _parents(path: str) -> list[str]:
    parts = Path(path).parts[1:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def bwrap_argv(
    plan: JailPlan,
    tools: JailTools,
    vmm_argv: Sequence[str],
    *,
    root_links: Mapping[str, str | None],
    info_fd: int | None = None,
) -> list[str]:
    """The whole chain for one VMM (see the module docstring); ``root_links``: the host's
    /bin, /lib... as symlink targets (merged /usr), None for a real directory (bound read-only)."""
    argv: list[str] = []
    if plan.netns is not None:
        argv += [tools.nsenter, f"--net=/run/netns/{plan.netns}", "--"]
    argv += [tools.prlimit, "--core=0", f"--nofile={plan.nofile}", f"--nproc={plan.nproc}", "--"]
    argv += [tools.bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if plan.netns is None:
        argv.append("--unshare-net")  # only lo, which bwrap brings up
    argv += ["--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL"]
    for cap in SETPRIV_CAPS:
        argv += ["--cap-add", cap]
    argv += ["--ro-bind", "/usr", "/usr"]
    for name, target in sorted(root_links.items()):
        argv += (
            ["--symlink", target, f"/{name}"] if target is not None else ["--ro-bind", f"/{name}", f"/{name}"]
        )
    argv += ["--dev", "/dev"]
    for device in plan.devices:
        for parent in _parents(device.target)[1:]:  # below /dev: bwrap would make them 0700
            argv += ["--perms", "0755", "--dir", parent]
        argv += ["--dev-bind", str(device.source), device.target]
    binary = str(plan.binary)
    if not binary.startswith("/usr/"):
        for parent in _parents(binary):
            argv += ["--perms", "0755", "--dir", parent]
        argv += ["--ro-bind", binary, binary]
    for bind in plan.binds:
        for parent in _parents(bind.target):
            argv += ["--perms", "0755", "--dir", parent]
        argv += ["--bind" if bind.writable else "--ro-bind", str(bind.source), bind.target]
    argv += ["--remount-ro", "/", "--chdir", "/"]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    argv += [
        "--", tools.setpriv,
        f"--reuid={plan.uid}", f"--regid={plan.gid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--pdeathsig=SIGKILL",
        "--", tools.env, "-i", *(f"{name}={value}" for name, value in plan.env),  # bwrap always sets PWD
        "--", *vmm_argv,
    ]  # fmt: skip
    return argv


# ---- I/O: the host's side ------------------------------------------------------------------------


def jail_problem(euid: int | None = None) -> str | None:
    """Why this runner cannot build the jail, with the fix; None when it can."""
    if (os.geteuid() if euid is None else euid) != 0:
        return (
            "the VM jail needs root (mount and network namespaces, a switch to the jail uid): run the "
            "runner as root, or pass --danger-no-jail on a development host (the VMM then runs as you)"
        )
    missing = [tool for tool in JAIL_TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"the VM jail needs {', '.join(missing)}: install them with `apt-get install bubblewrap "
            "util-linux`, or pass --danger-no-jail on a development host"
        )
    return None


def find_jail_tools() -> JailTools:
    problem = jail_problem()
    if problem:
        raise SandboxError(problem)
    found = {tool: shutil.which(tool) or tool for tool in (*JAIL_TOOLS, "env")}
    return JailTools(found["bwrap"], found["setpriv"], found["prlimit"], found["nsenter"], found["env"])


def host_root_links(root: Path = Path("/")) -> dict[str, str | None]:
    """The host's top-level library and binary directories: a symlink target, or None for a directory."""
    links: dict[str, str | None] = {}
    for name in ROOT_LINKS:
        path = root / name
        if path.is_symlink():
            links[name] = os.readlink(path)
        elif path.is_dir():
            links[name] = None
    return links


def private_device(device: Path, node_dir: Path, uid: int, gid: int) -> Path:
    """``device`` itself when anyone may open it (/dev/net/tun and /dev/kvm usually are 0666), else a
    node of the same device in ``node_dir`` that only the jail uid may open. Never a group or a mode
    change on the host's node: that would open it to every process of that group or to everyone."""
    st = device.stat()
    if st.st_mode & 0o006 == 0o006:
        return device
    if os.statvfs(node_dir).f_flag & os.ST_NODEV:
        raise SandboxError(
            f"{device} may be opened by root only and the work dir {node_dir} is on a nodev mount, so "
            f"the VM jail cannot get a private {device}: `chmod 0666 {device}` (its usual mode) or use "
            "a --cache-dir on a filesystem mounted without nodev"
        )
    node = node_dir / f"dev-{device.name}"
    node.unlink(missing_ok=True)
    os.mknod(node, 0o600 | stat.S_IFCHR, st.st_rdev)
    os.chown(node, uid, gid)
    return node


def hand_over(plan: JailPlan) -> JailPlan:
    """The writable files (the iteration's disks and serial log) to the jail uid, readable by it alone;
    the plan with the devices it may open."""
    for bind in plan.binds:
        if bind.writable:
            bind.source.touch(mode=0o600)  # the serial log exists before the VMM opens it
            os.chown(bind.source, plan.uid, plan.gid)
            os.chmod(bind.source, 0o600)
    if not plan.devices or plan.node_dir is None:
        return plan
    node_dir = plan.node_dir
    devices = tuple(
        replace(d, source=private_device(d.source, node_dir, plan.uid, plan.gid)) for d in plan.devices
    )
    return replace(plan, devices=devices)


def write_resolv_conf(path: Path, nameserver: str | None) -> Path:
    """A resolv.conf for the jail: its network namespace cannot reach a resolver on the host's lo."""
    path.write_text(f"nameserver {nameserver}\n" if nameserver else "")
    return path


def read_child_pid(fd: int, timeout_s: float = INFO_WAIT_S) -> int | None:
    """The sandbox's PID from bwrap's --info-fd (None: bwrap failed before it started the sandbox)."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        with contextlib.suppress(ValueError):
            pid = json.loads(data).get("child-pid")
            if isinstance(pid, int):
                return pid
    return None


def vmm_pid(init_pid: int, timeout_s: float = INFO_WAIT_S, proc: Path = Path("/proc")) -> int | None:
    """The VMM's PID: the one child of the sandbox's init (bwrap's PID 1 of the jail)."""
    children = proc / str(init_pid) / "task" / str(init_pid) / "children"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pids = children.read_text().split()
        except OSError:
            return None  # the init is gone: so is the VMM
        if pids:
            return int(pids[0])
        time.sleep(0.005)
    return None


def start_jailed(
    plan: JailPlan,
    vmm_argv: Sequence[str],
    *,
    stdout: IO[bytes],
    stderr: IO[bytes],
    cpus: tuple[int, ...] | None = None,
) -> tuple[VmProcess, int | None]:
    """Start ``vmm_argv`` in the jail; the process (bwrap, what to wait for and kill) and the VMM's PID
    (None: the jail could not be built; bwrap said why on ``stderr``)."""
    tools = find_jail_tools()
    plan = hand_over(plan)
    read_fd, write_fd = os.pipe()
    try:
        argv = bwrap_argv(plan, tools, vmm_argv, root_links=host_root_links(), info_fd=write_fd)
        proc = VmProcess(
            argv, stdout=stdout, stderr=stderr, cpus=cpus, env=plan.environment, pass_fds=[write_fd]
        )
    finally:
        os.close(write_fd)
    try:
        init = read_child_pid(read_fd)
    finally:
        os.close(read_fd)
    pid = vmm_pid(init) if init is not None else None
    if pid is None:
        proc.kill()
        return proc, None
    proc.also_kill.append(pid)
    return proc, pid
