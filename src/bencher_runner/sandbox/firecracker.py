"""The Firecracker backend: QEMU's kernel, initramfs, agent and disks, driven over Firecracker's API.

Firecracker is configured by HTTP requests on a Unix socket, not by argv. `boot_requests` builds the
whole sequence from a :class:`VmSpec` as pure data (tested against Firecracker's OpenAPI schema without a
VM); `FirecrackerVm` owns the process with the same shape as `QemuVm`. Differences from QEMU that
matter here:

- x86_64 Firecracker boots only an ELF vmlinux (see ``vmlinux.py``), and the guest resets through the
  i8042 controller, so the command line says ``reboot=k`` instead of ``reboot=t``;
- the guest's serial console is Firecracker's stdout (sent to the spec's serial log), Firecracker's own
  log goes to the file named in ``PUT /logger``;
- virtio-mmio devices are described to the guest by ACPI (Firecracker >= 1.8) and on the kernel
  command line (``virtio_mmio.device=``); Debian's kernel reads the ACPI tables only;
- networking is a TAP device only (no user-mode NAT), in the job's network namespace;
- it runs under the jailer (chroot, uid/gid drop, netns, cgroup, rlimits), given the jail policy every
  VMM gets (jail.py's JailPlan: `jailer_config`): the jail uid/gid, the job's or an empty network
  namespace, the files at the jail's fixed paths, an empty environment, no core dumps and bounded open
  files and processes (`prlimit` in front for the limits the jailer does not set): `jailer_argv`,
  `prepare_jail`, `JailLayout.cleanup`. Without the jailer only with --danger-no-jail.
"""

import contextlib
import errno
import fcntl
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from bencher_runner.sandbox.accel import KVM_DEVICE, kvm_device_problem
from bencher_runner.sandbox.jail import (
    JAIL_INITRD,
    JAIL_KERNEL,
    JAIL_OUTPUT,
    JAIL_ROOTFS,
    NOFILE_LIMIT,
    NPROC_LIMIT,
    VMM_ENV,
    JailPlan,
)
from bencher_runner.sandbox.network import NetworkPlan
from bencher_runner.sandbox.vm import VmSpec
from bencher_runner.sandbox.vmprocess import RunsAsVmProcess, VmProcess
from bencher_runner.spec.config import DEFAULT_LOG_LEVEL, LOG_LEVELS, LogLevel
from bencher_runner.spec.errors import SandboxError

FIRECRACKER_BINARY = "firecracker"
JAILER_BINARY = "jailer"
MAX_VCPUS = 32  # Firecracker's limit (MachineConfiguration.vcpu_count maximum)
API_TIMEOUT_S = 5.0
SOCKET_WAIT_S = 5.0
SHUTDOWN_WAIT_S = 2.0
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL
ROOT_DRIVE = "rootfs"
OUTPUT_DRIVE = "output"
GUEST_IFACE = "eth0"
GUEST_MAC = "06:00:c0:a8:f1:02"  # fixed (Firecracker's 06:00:<IPv4> convention for 192.168.241.2)
VM_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # what Firecracker and the jailer accept as --id
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


# ---- pure: the request sequence -----------------------------------------------------------------


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    body: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class GuestFiles:
    """The paths Firecracker opens, as Firecracker sees them (absolute, or inside the jailer's chroot)."""

    kernel: str
    initrd: str
    rootfs: str
    output_disk: str
    log: str
    metrics: str | None = None

    @classmethod
    def direct(cls, spec: VmSpec, vmlinux: Path, log: Path, metrics: Path | None = None) -> "GuestFiles":
        return cls(
            kernel=str(vmlinux),
            initrd=str(spec.initrd),
            rootfs=str(spec.rootfs),
            output_disk=str(spec.output_disk),
            log=str(log),
            metrics=str(metrics) if metrics else None,
        )


def firecracker_cmdline(cmdline: str) -> str:
    """The shared command line with ``reboot=k``: Firecracker stops the VM on the i8042 reset only."""
    words = [w for w in cmdline.split() if not w.startswith("reboot=")]
    return " ".join([*words, "reboot=k"])


def tap_device(plan: NetworkPlan) -> str:
    """The host TAP device of a TAP network plan (Firecracker has no user-mode NAT)."""
    for arg in plan.qemu_args:
        fields = dict(f.split("=", 1) for f in arg.split(",")[1:] if "=" in f)
        if arg.startswith("tap,") and fields.get("ifname"):
            return fields["ifname"]
    raise SandboxError(
        "Firecracker supports TAP networking only (no user-mode NAT); use --network-mode tap (needs root)"
    )


def check_resources(spec: VmSpec) -> None:
    if not 1 <= spec.vcpus <= MAX_VCPUS:
        raise SandboxError(
            f"Firecracker supports 1 to {MAX_VCPUS} vCPUs, {spec.vcpus} requested; lower --vcpus "
            "or use --sandbox qemu"
        )
    if spec.memory_mib < 1:
        raise SandboxError(f"guest memory must be at least 1 MiB, {spec.memory_mib} MiB requested")


def boot_requests(
    spec: VmSpec, files: GuestFiles, log_level: LogLevel = DEFAULT_LOG_LEVEL
) -> list[ApiRequest]:
    """Every request from a fresh Firecracker to a running guest, in order (InstanceStart last)."""
    check_resources(spec)
    if log_level not in LOG_LEVELS:
        raise SandboxError(f"Firecracker log level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    requests = [
        ApiRequest(
            "PUT",
            "/logger",
            {"log_path": files.log, "level": log_level, "show_level": True, "show_log_origin": False},
        )
    ]
    if files.metrics is not None:
        requests.append(ApiRequest("PUT", "/metrics", {"metrics_path": files.metrics}))
    requests += [
        ApiRequest(
            "PUT",
            "/machine-config",
            {"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib, "smt": False},
        ),
        ApiRequest(
            "PUT",
            "/boot-source",
            {
                "kernel_image_path": files.kernel,
                "initrd_path": files.initrd,
                "boot_args": firecracker_cmdline(spec.cmdline),
            },
        ),
    ]
    # Drives are attached in this order: the guest sees the root disk as vda and the output disk as vdb.
    for drive_id, path in ((ROOT_DRIVE, files.rootfs), (OUTPUT_DRIVE, files.output_disk)):
        body = {"drive_id": drive_id, "path_on_host": path, "is_root_device": False, "is_read_only": False}
        requests.append(ApiRequest("PUT", f"/drives/{drive_id}", body))
    if spec.network is not None:
        body = {"iface_id": GUEST_IFACE, "host_dev_name": tap_device(spec.network), "guest_mac": GUEST_MAC}
        requests.append(ApiRequest("PUT", f"/network-interfaces/{GUEST_IFACE}", body))
    requests.append(ApiRequest("PUT", "/actions", {"action_type": "InstanceStart"}))
    return requests


def firecracker_argv(firecracker: str, api_sock: str, vm_id: str, log_level: LogLevel) -> list[str]:
    return [firecracker, "--api-sock", api_sock, "--id", vm_id, "--level", log_level]


# ---- finding the binaries and KVM ---------------------------------------------------------------


def _executable(path: str, what: str, flag: str) -> str:
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise SandboxError(f"{what} {path!r} does not exist or is not executable; check {flag}")
    return path


def _find(explicit: str | Path | None, flag: str, env: str, binary: str, missing: str) -> str:
    """The flag's path, else the env var's, else ``binary`` on PATH; ``missing`` says how to get it."""
    if explicit:
        return _executable(str(explicit), f"{binary} binary", flag)
    if value := os.environ.get(env):
        return _executable(value, f"{binary} binary", env)
    found = shutil.which(binary)
    if not found:
        raise SandboxError(missing)
    return found


def find_firecracker(explicit: str | Path | None = None) -> str:
    """``--firecracker PATH``, else $BENCHER_RUNNER_FIRECRACKER, else ``firecracker`` on PATH."""
    return _find(
        explicit,
        "--firecracker",
        "BENCHER_RUNNER_FIRECRACKER",
        FIRECRACKER_BINARY,
        "Firecracker is not installed: download a release from "
        "github.com/firecracker-microvm/firecracker/releases and pass --firecracker PATH",
    )


def find_jailer(explicit: str | Path | None = None) -> str:
    """``--jailer PATH``, else $BENCHER_RUNNER_JAILER, else ``jailer`` on PATH."""
    return _find(
        explicit,
        "--jailer",
        "BENCHER_RUNNER_JAILER",
        JAILER_BINARY,
        "the Firecracker jailer is not installed: it ships in the same release archive as firecracker "
        "(github.com/firecracker-microvm/firecracker/releases); pass --jailer PATH",
    )


def kvm_problem(device: Path = KVM_DEVICE) -> str | None:
    """None when KVM can be used (the device opens and speaks API version 12), else why not."""
    problem = kvm_device_problem(device)
    if problem:
        return problem
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return f"{device} cannot be opened ({err.strerror})"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as err:
        return f"{device} is not a KVM device ({err.strerror})"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"{device} reports KVM API version {version}, not {KVM_API_VERSION}"
    return None


def require_kvm(device: Path = KVM_DEVICE) -> None:
    problem = kvm_problem(device)
    if problem:
        raise SandboxError(
            f"Firecracker needs KVM: {problem}; use --sandbox qemu (which can emulate with TCG) on this host"
        )


# ---- the API client -----------------------------------------------------------------------------


def fault_message(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        return response.text.strip() or "(empty response)"
    if isinstance(doc, dict) and isinstance(doc.get("fault_message"), str):
        return str(doc["fault_message"])
    return response.text.strip()


class FirecrackerApi:
    """Firecracker's API over its Unix socket; every non-2xx answer is a SandboxError."""

    def __init__(
        self, socket: Path, *, timeout_s: float = API_TIMEOUT_S, transport: httpx.BaseTransport | None = None
    ) -> None:
        if len(os.fsencode(socket)) > UNIX_PATH_MAX:
            raise SandboxError(
                f"Firecracker API socket path {socket} is longer than {UNIX_PATH_MAX} bytes; "
                "use a shorter --cache-dir"
            )
        self.socket = socket
        self._client = httpx.Client(
            transport=transport or httpx.HTTPTransport(uds=str(socket)),
            base_url="http://localhost",
            timeout=timeout_s,
        )

    def close(self) -> None:
        self._client.close()

    def send(self, request: ApiRequest) -> httpx.Response:
        try:
            body = None if request.method == "GET" else request.body  # a GET with a body confuses the server
            response = self._client.request(request.method, request.path, json=body)
        except httpx.HTTPError as err:
            raise SandboxError(f"Firecracker API request {request} failed: {err}") from None
        if response.status_code >= 300:
            raise SandboxError(
                f"Firecracker refused {request} (HTTP {response.status_code}): {fault_message(response)}"
            )
        return response

    def describe(self) -> dict[str, Any]:
        """``GET /``: the instance info (answers once the API server is up)."""
        response = self.send(ApiRequest("GET", "/", {}))
        doc = response.json()
        return doc if isinstance(doc, dict) else {}


# ---- the jailer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JailerConfig:
    jailer: str  # the jailer binary
    uid: int
    gid: int
    chroot_base: Path  # the jailer's --chroot-base-dir (default /srv/jailer)
    netns: str | None = None  # name of the job's network namespace (`ip netns` name)
    cpuset: str | None = None  # e.g. "2-7": the VM's cgroup gets cpuset.cpus (and cpuset.mems=0)
    parent_cgroup: str | None = None
    nofile: int = NOFILE_LIMIT  # the jailer's --resource-limit no-file
    nproc: int = NPROC_LIMIT  # set by prlimit in front of the jailer (it has no such limit)
    prlimit: str | None = None  # the prlimit binary; None: no prlimit in front (tests, old configs)
    env: tuple[tuple[str, str], ...] = tuple(VMM_ENV.items())


def jailer_config(
    plan: JailPlan,
    jailer: str,
    chroot_base: Path,
    *,
    cpuset: str | None = None,
    parent_cgroup: str | None = None,
) -> JailerConfig:
    """The jail policy of every VMM, as the jailer takes it: one uid/gid, network namespace and bounds."""
    if plan.netns is None:
        raise SandboxError("a jailed Firecracker needs a network namespace (the job's, or an empty one)")
    return JailerConfig(
        jailer=jailer,
        uid=plan.uid,
        gid=plan.gid,
        chroot_base=chroot_base,
        netns=plan.netns,
        cpuset=cpuset,
        parent_cgroup=parent_cgroup,
        nofile=plan.nofile,
        nproc=plan.nproc,
        prlimit=shutil.which("prlimit") or "prlimit",
        env=plan.env,
    )


JAIL_API_SOCK = "/run/firecracker.socket"


def jail_files(metrics: bool) -> GuestFiles:
    """Where `prepare_jail` puts each file, as Firecracker sees it inside the chroot."""
    return GuestFiles(
        kernel=JAIL_KERNEL,
        initrd=JAIL_INITRD,
        rootfs=JAIL_ROOTFS,
        output_disk=JAIL_OUTPUT,
        log="/firecracker.log",
        metrics="/metrics.json" if metrics else None,
    )


def jail_cgroup(config: JailerConfig, vm_id: str) -> Path | None:
    """The cgroup (v2) the jailer creates for the VM when it is given --cgroup values."""
    if not config.cpuset:
        return None
    return Path("/sys/fs/cgroup") / (config.parent_cgroup or "firecracker") / vm_id


def jail_root(chroot_base: Path, exec_file: str, vm_id: str) -> Path:
    """Where the jailer chroots: ``<chroot_base>/<exec file name>/<id>/root``."""
    return chroot_base / Path(exec_file).name / vm_id / "root"


def jailer_argv(
    config: JailerConfig, firecracker: str, vm_id: str, api_sock: str, log_level: LogLevel
) -> list[str]:
    """The jailer's argv; what follows ``--`` is Firecracker's (paths inside the chroot)."""
    if not VM_ID_RE.match(vm_id):
        raise SandboxError(f"VM id {vm_id!r} is not 1-64 letters, digits and hyphens")
    if "firecracker" not in Path(firecracker).name:
        raise SandboxError(
            f"the jailer only runs an executable whose name contains 'firecracker', not {firecracker!r}; "
            "rename it or pass the release's firecracker binary with --firecracker"
        )
    limits = [config.prlimit, "--core=0", f"--nproc={config.nproc}", "--"] if config.prlimit else []
    argv = [
        *limits,
        config.jailer,
        "--id", vm_id,
        "--exec-file", firecracker,
        "--uid", str(config.uid),
        "--gid", str(config.gid),
        "--chroot-base-dir", str(config.chroot_base),
    ]  # fmt: skip
    if config.netns:
        argv += ["--netns", f"/var/run/netns/{config.netns}"]
    argv += ["--resource-limit", f"no-file={config.nofile}", "--cgroup-version", "2"]
    if config.parent_cgroup:
        argv += ["--parent-cgroup", config.parent_cgroup]
    if config.cpuset:
        argv += ["--cgroup", f"cpuset.cpus={config.cpuset}", "--cgroup", "cpuset.mems=0"]
    return [*argv, "--", "--api-sock", api_sock, "--level", log_level]


@dataclass
class JailLayout:
    """The files linked into a jail; ``cleanup`` copies back what had to be copied, then removes the jail."""

    root: Path  # <chroot_base>/firecracker/<id>/root
    files: GuestFiles  # paths inside the chroot
    cgroup: Path | None = None
    copied_back: list[tuple[Path, Path]] = field(default_factory=list)  # (jail copy, original)

    @property
    def instance_dir(self) -> Path:
        return self.root.parent

    def host_path(self, jail_path: str) -> Path:
        return self.root / jail_path.lstrip("/")

    def cleanup(self) -> None:
        for copy, original in self.copied_back:
            with contextlib.suppress(OSError):
                shutil.copyfile(copy, original)
        shutil.rmtree(self.instance_dir, ignore_errors=True)
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()


def _place(src: Path, dest: Path, *, writable: bool, uid: int, gid: int) -> bool:
    """Hard-link (or copy, across filesystems) src to dest; True when it was copied.

    Writable files (the disks) are chowned to the jail's user; read-only ones (kernel, initrd) keep
    their owner: chowning a hard link would hand the shared, cached kernel to the jailed user.
    """
    copied = False
    try:
        os.link(src, dest)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(src, dest)
        copied = True
    if writable:
        os.chown(dest, uid, gid)
        os.chmod(dest, 0o600)
    elif copied:
        os.chmod(dest, 0o444)
    return copied


def prepare_jail(
    config: JailerConfig,
    firecracker: str,
    vm_id: str,
    spec: VmSpec,
    vmlinux: Path,
    *,
    metrics: bool = False,
) -> JailLayout:
    """Put kernel, initrd, disks and empty log/metrics files into the jail; paths for the API requests."""
    root = jail_root(config.chroot_base, firecracker, vm_id)
    if root.parent.exists():
        raise SandboxError(f"jail {root.parent} already exists (a VM with id {vm_id} is running or was left)")
    root.mkdir(parents=True)
    layout = JailLayout(root=root, files=jail_files(metrics), cgroup=jail_cgroup(config, vm_id))
    try:
        run_dir = root / "run"  # where Firecracker creates its API socket, as the jail's user
        run_dir.mkdir()
        os.chown(run_dir, config.uid, config.gid)
        for src, jail_path, writable in (
            (vmlinux, layout.files.kernel, False),
            (spec.initrd, layout.files.initrd, False),
            (spec.rootfs, layout.files.rootfs, True),
            (spec.output_disk, layout.files.output_disk, True),
        ):
            dest = layout.host_path(jail_path)
            if _place(src, dest, writable=writable, uid=config.uid, gid=config.gid) and writable:
                layout.copied_back.append((dest, src))
        for created in (layout.files.log, layout.files.metrics):
            if created is not None:  # Firecracker opens these without O_CREAT
                path = layout.host_path(created)
                path.touch(mode=0o600)
                os.chown(path, config.uid, config.gid)
    except OSError as err:
        layout.cleanup()
        raise SandboxError(f"cannot prepare the jail in {root}: {err}") from None
    return layout


# ---- the process --------------------------------------------------------------------------------


def new_vm_id() -> str:
    return f"bencher-{os.urandom(8).hex()}"


class FirecrackerVm(RunsAsVmProcess):
    """One running Firecracker microVM; use as a context manager, the process is gone when it exits.

    ``work`` holds the API socket, Firecracker's log and (optional) metrics file. The guest serial
    console (Firecracker's stdout) goes to ``spec.serial_log``. ``prefix`` runs Firecracker inside the
    job's network namespace (``JobNetwork.command_prefix()``) when not jailed; with ``jailer`` the
    jailer joins the namespace itself (``JailerConfig.netns``). Start and wait from the same thread.
    """

    def __init__(
        self,
        spec: VmSpec,
        vmlinux: Path,
        work: Path,
        *,
        firecracker: str | Path | None = None,
        jailer: JailerConfig | None = None,
        log_level: LogLevel = DEFAULT_LOG_LEVEL,
        metrics: bool = False,
        prefix: list[str] | None = None,
        vm_id: str | None = None,
    ) -> None:
        if spec.accel != "kvm":
            raise SandboxError(
                f"Firecracker runs on KVM only, not {spec.accel}; use --sandbox qemu for emulation"
            )
        self.spec = spec
        self.vmlinux = vmlinux
        self.work = work
        self.jailer = jailer
        self.log_level = log_level
        self.vm_id = vm_id or new_vm_id()
        self.firecracker = find_firecracker(firecracker)
        self.jail: JailLayout | None = None
        self.stderr_path = work / "firecracker.stderr"
        if jailer is None:
            self.log_path = work / "firecracker.log"
            self.metrics_path = work / "firecracker.metrics" if metrics else None
            self.socket = work / "fc.sock"
            self.files = GuestFiles.direct(spec, vmlinux, self.log_path, self.metrics_path)
            self.argv = [
                *(prefix or []),
                *firecracker_argv(self.firecracker, str(self.socket), self.vm_id, log_level),
            ]
        else:
            root = jail_root(jailer.chroot_base, self.firecracker, self.vm_id)
            self.files = jail_files(metrics)
            self.socket = root / JAIL_API_SOCK.lstrip("/")
            self.log_path = root / self.files.log.lstrip("/")
            self.metrics_path = root / self.files.metrics.lstrip("/") if self.files.metrics else None
            self.argv = jailer_argv(jailer, self.firecracker, self.vm_id, JAIL_API_SOCK, log_level)
        self.requests = boot_requests(spec, self.files, log_level)  # validates before anything starts
        self._metrics = metrics
        self._proc: VmProcess | None = None
        self._api: FirecrackerApi | None = None
        self._log_text: str | None = None  # kept when the VM is shut down (the jail is removed)

    def __enter__(self) -> "FirecrackerVm":
        require_kvm()
        try:
            self._start()
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._shutdown()

    def _start(self) -> None:
        if self.jailer is not None:
            self.jail = prepare_jail(
                self.jailer, self.firecracker, self.vm_id, self.spec, self.vmlinux, metrics=self._metrics
            )
        else:
            for path in (self.log_path, self.metrics_path):
                if path is not None:
                    path.touch(mode=0o600)  # Firecracker opens these without O_CREAT
        self.socket.unlink(missing_ok=True)
        with self.spec.serial_log.open("wb") as serial, self.stderr_path.open("wb") as stderr:
            env = dict(self.jailer.env) if self.jailer is not None else VMM_ENV
            self._proc = VmProcess(self.argv, stdout=serial, stderr=stderr, env=env)
        self._api = FirecrackerApi(self.socket)
        self._wait_for_api()
        for request in self.requests:
            self._api.send(request)

    def _wait_for_api(self) -> None:
        assert self._proc is not None and self._api is not None
        deadline = time.monotonic() + SOCKET_WAIT_S
        last = "the socket was not created"
        while time.monotonic() < deadline:
            status = self._proc.poll()
            if status is not None:
                raise SandboxError(
                    f"Firecracker exited with status {status} before its API was up: "
                    f"{self.log() or '(no output)'}"
                )
            if self.socket.exists():
                try:
                    self._api.describe()
                    return
                except SandboxError as err:
                    last = str(err)
            time.sleep(0.05)
        raise SandboxError(
            f"Firecracker API socket {self.socket} not ready after {SOCKET_WAIT_S:.0f} s ({last}): "
            + (self.log() or "(no output)")
        )

    def kill(self) -> None:
        """Ctrl-Alt-Del (the guest reboots, Firecracker exits), up to 2 s, then SIGKILL."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        if self._api is not None:
            with contextlib.suppress(SandboxError):
                self._api.send(ApiRequest("PUT", "/actions", {"action_type": "SendCtrlAltDel"}))
            if proc.wait(time.monotonic() + SHUTDOWN_WAIT_S) is not None:
                return
        proc.kill()

    def _shutdown(self) -> None:
        self.kill()
        self._log_text = self._read_log()  # before the jail (holding the log) is removed
        if self._api is not None:
            self._api.close()
        self.socket.unlink(missing_ok=True)
        if self.jail is not None:
            self.jail.cleanup()
            self.jail = None

    def _read_log(self) -> str:
        parts = []
        for path in (self.stderr_path, self.log_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip()
                if text:
                    parts.append(text)
        return "\n".join(parts)

    def log(self) -> str:
        """Firecracker's own output (stderr and its logger file), not the guest's serial console."""
        return self._log_text if self._log_text is not None else self._read_log()
