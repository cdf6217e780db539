"""`runner kernel build`: a lean guest kernel from the distribution's kernel source and a pinned config.

Debian's cloud kernel is a general kernel: seven modules loaded from the initramfs, ~50 kernel
threads, 2.3 s from VM start to the command under TCG. The lean kernel is built from Debian's
``linux-source-6.1`` with ``guest-kernel/6.1-lean.config`` (a ``make tinyconfig`` base plus only what a
benchmark guest uses: virtio-mmio, -blk, -net, ext4, the 8250 console, devtmpfs, PVH; no modules).
It lives in its own cache directory (``kernel-lean/``) beside the fetched cloud bundle (``kernel/``)
so that neither ``fetch`` nor ``build`` replaces the other; the unpacked source tree is kept
(``kernel-build/``) so a second build is incremental.

The pure parts (config parsing and checks, the make argv, progress parsing) are apart from the I/O
(:func:`build_lean_kernel`) so they are tested without a compiler.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bencher_runner.sandbox.kernel import BUNDLE_FILE, LEAN_DIR, LEAN_MEMORY_FLOOR_MIB, lean_dir
from bencher_runner.spec.errors import KernelBundleError

SOURCE_PACKAGE = "linux-source-6.1"
CONFIG_RESOURCE = "6.1-lean.config"
BUILD_DIR = "kernel-build"
BUILD_LOG = "build.log"
FAILURE_TAIL = 40  # lines of make's output saved next to the log when a build fails
MIN_FREE_BYTES = 3 << 30  # unpacked source (~1.4 GB) + objects + headroom
# Objects a full build of the pinned config compiles (CC and AS lines, counted from a fresh build here):
# the progress total.
EXPECTED_OBJECTS = 920

# The options a guest cannot boot or run a job without; `make olddefconfig` must leave them so.
REQUIRED_OPTIONS: dict[str, str] = {
    "CONFIG_64BIT": "y",
    "CONFIG_SMP": "y",
    "CONFIG_PVH": "y",
    "CONFIG_KVM_GUEST": "y",
    "CONFIG_BLK_DEV_INITRD": "y",
    "CONFIG_BINFMT_ELF": "y",
    "CONFIG_BINFMT_SCRIPT": "y",
    "CONFIG_MULTIUSER": "y",
    "CONFIG_FUTEX": "y",
    "CONFIG_EPOLL": "y",
    "CONFIG_SIGNALFD": "y",
    "CONFIG_SHMEM": "y",
    "CONFIG_PRINTK": "y",
    "CONFIG_VIRTIO_MMIO": "y",
    "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "y",
    "CONFIG_VIRTIO_BLK": "y",
    "CONFIG_VIRTIO_NET": "y",
    "CONFIG_EXT4_FS": "y",
    "CONFIG_SERIAL_8250": "y",
    "CONFIG_SERIAL_8250_CONSOLE": "y",
    "CONFIG_UNIX98_PTYS": "y",
    "CONFIG_DEVTMPFS": "y",
    "CONFIG_PROC_FS": "y",
    "CONFIG_SYSFS": "y",
    "CONFIG_TMPFS": "y",
    "CONFIG_UNIX": "y",
    "CONFIG_INET": "y",
    "CONFIG_MODULES": "n",
}

# Build tool -> the Debian package that provides it (what the error tells the user to install).
BUILD_TOOLS = {
    "make": "make",
    "gcc": "gcc",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "tar": "tar",
    "xz": "xz-utils",
}
LIBELF_HEADER = Path("/usr/include/gelf.h")  # objtool links against libelf (libelf-dev)
BUILD_PACKAGES = (SOURCE_PACKAGE, "make", "gcc", "flex", "bison", "bc", "libelf-dev", "xz-utils")

_MAKE_LINE = re.compile(r"^\s+([A-Z][A-Z0-9_]{1,8})\s+(\S.*)$")
_COUNTED = frozenset({"CC", "AS"})


def pinned_config() -> str:
    """The pinned config's text (package data)."""
    return resources.files("bencher_runner.sandbox").joinpath("guest-kernel", CONFIG_RESOURCE).read_text()


def config_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def parse_config(text: str) -> dict[str, str]:
    """Option -> value of a kernel .config; ``# CONFIG_X is not set`` reads as ``n``."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            options[line[2 : -len(" is not set")]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            name, _, value = line.partition("=")
            options[name] = value
    return options


def config_problems(text: str, required: dict[str, str] = REQUIRED_OPTIONS) -> list[str]:
    """The required options the config does not have as required (absent reads as ``n``)."""
    options = parse_config(text)
    return [
        f"{name}={options.get(name, 'n')} (needs {want})"
        for name, want in required.items()
        if options.get(name, "n") != want
    ]


def make_argv(source: Path, jobs: int, target: str = "vmlinux") -> list[str]:
    return ["make", "-C", str(source), f"-j{jobs}", target]


def make_env(base: dict[str, str]) -> dict[str, str]:
    """Fixed build user/host/timestamp: the same config and source give the same banner."""
    env = dict(base)
    env.update(KBUILD_BUILD_USER="bencher", KBUILD_BUILD_HOST="bencher-runner", LC_ALL="C")
    return env


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) or 1


@dataclass
class BuildProgress:
    """What make has done so far, from its ``  CC      kernel/fork.o`` lines."""

    compiled: int = 0
    current: str = ""
    total: int = EXPECTED_OBJECTS

    def feed(self, line: str) -> bool:
        """Update from one line of make's output; True when it named a new step."""
        match = _MAKE_LINE.match(line.rstrip("\n"))
        if match is None:
            return False
        verb, target = match.groups()
        if verb in _COUNTED:
            self.compiled += 1
        self.current = f"{verb} {target}"
        return True

    def describe(self) -> str:
        shown = min(self.compiled, self.total)
        return f"{shown}/~{self.total} objects: {self.current}"


@dataclass(frozen=True)
class LeanKernel:
    kernel: Path
    release: str
    config_sha256: str
    seconds: float


def find_source_tarball(package: str = SOURCE_PACKAGE) -> Path | None:
    tarball = Path("/usr/src") / f"{package}.tar.xz"
    return tarball if tarball.is_file() else None


def missing_build_tools(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """Debian packages to install for the build tools that are absent."""
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if which(tool) is None]
    if not LIBELF_HEADER.exists():
        missing.append("libelf-dev")
    return missing


def _apt_install(packages: Iterable[str]) -> None:
    packages = list(packages)
    argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError:
        raise KernelBundleError(
            f"`apt-get` is not installed; install {' '.join(packages)} with the system's package manager"
        ) from None
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise KernelBundleError(
            f"`apt-get install {' '.join(packages)}` failed ({last[0]}); install them by hand (as root)"
        )


def ensure_build_inputs(package: str) -> Path:
    """The source tarball, with the build tools installed; apt-get installs what is missing."""
    needed = missing_build_tools()
    tarball = find_source_tarball(package)
    if tarball is None:
        needed.insert(0, package)
    if needed:
        _apt_install(needed)
        tarball = find_source_tarball(package)
        if still := missing_build_tools():
            raise KernelBundleError(f"build tools still missing after apt-get: install {' '.join(still)}")
    if tarball is None:
        raise KernelBundleError(
            f"{package} is installed but /usr/src/{package}.tar.xz is absent; name the source package "
            "with --source (e.g. linux-source-6.1)"
        )
    return tarball


def _check_space(path: Path, need: int = MIN_FREE_BYTES) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need:
        raise KernelBundleError(
            f"not enough disk space to build the kernel in {path}: {free >> 20} MiB free, "
            f"{need >> 20} MiB needed; free some space or use another --cache-dir"
        )


def _tarball_stamp(tarball: Path) -> str:
    st = tarball.stat()
    return json.dumps({"tarball": str(tarball), "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def unpack_source(tarball: Path, build_root: Path) -> Path:
    """The unpacked source tree under build_root, reused while the tarball is the same."""
    stamp = build_root / "source.json"
    source = build_root / tarball.name.removesuffix(".tar.xz")
    if source.is_dir() and stamp.is_file() and stamp.read_text() == _tarball_stamp(tarball):
        return source
    if build_root.exists():
        shutil.rmtree(build_root)
    build_root.mkdir(parents=True)
    _check_space(build_root)
    proc = subprocess.run(["tar", "-xf", str(tarball), "-C", str(build_root)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelBundleError(f"unpacking {tarball} failed: {_disk_hint(proc.stderr)}")
    if not source.is_dir():
        raise KernelBundleError(
            f"{tarball} did not unpack into {source.name}/; is it a kernel source tarball?"
        )
    stamp.write_text(_tarball_stamp(tarball))
    return source


def _disk_hint(stderr: str) -> str:
    text = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    if "No space left" in stderr:
        return f"the disk is full ({text}); free some space or use another --cache-dir"
    return text


def apply_config(source: Path, config: str) -> str:
    """Write the pinned config, let `make olddefconfig` settle it, check it; the settled text."""
    (source / ".config").write_text(config)
    proc = subprocess.run(
        ["make", "-C", str(source), "-s", "olddefconfig"],
        capture_output=True,
        text=True,
        env=make_env(dict(os.environ)),
    )
    if proc.returncode != 0:
        raise KernelBundleError(f"`make olddefconfig` failed in {source}: {_disk_hint(proc.stderr)}")
    settled = (source / ".config").read_text()
    if problems := config_problems(settled):
        raise KernelBundleError(
            f"the pinned kernel config does not hold in {source.name}: {', '.join(problems)}; "
            "the source package's Kconfig differs from the one the config was pinned for"
        )
    return settled


def run_make(
    argv: list[str], log_path: Path, progress: Callable[[BuildProgress], None] | None = None
) -> None:
    """Run make with its output in log_path, calling progress per step; a failure names the log."""
    state = BuildProgress()
    tail: deque[str] = deque(maxlen=FAILURE_TAIL)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=make_env(dict(os.environ))
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail.append(line)
            if state.feed(line) and progress is not None:
                progress(state)
        code = proc.wait()
    if code != 0:
        failed = log_path.with_name("build-failed.log")
        failed.write_text("".join(tail))
        text = "".join(tail)
        reason = "the disk is full; free some space" if "No space left" in text else "see its last lines"
        raise KernelBundleError(f"`{' '.join(argv)}` failed (exit {code}): {reason} in {failed}")


def kernel_release(source: Path) -> str:
    proc = subprocess.run(["make", "-C", str(source), "-s", "kernelrelease"], capture_output=True, text=True)
    release = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not release:
        raise KernelBundleError(f"`make kernelrelease` failed in {source}: {proc.stderr.strip()}")
    return release


def install_lean(
    cache: Path, vmlinux: Path, release: str, config_text: str, pinned_sha: str, floor_mib: int
) -> Path:
    """Put the built vmlinux and its metadata into kernel-lean/ (replaced atomically)."""
    dest = lean_dir(cache)
    staged = cache / f".{LEAN_DIR}.tmp{os.getpid()}"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    shutil.copy2(vmlinux, staged / "vmlinux")
    (staged / "config").write_text(config_text)
    doc = {
        "kind": "lean",
        "release": release,
        "kernel": "vmlinux",
        "modules": [],
        "config_sha256": pinned_sha,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory_floor_mib": floor_mib,
        "acpi": False,  # the pinned config has none: QEMU gives the devices on the command line
    }
    (staged / BUNDLE_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    old = cache / f".{LEAN_DIR}.old{os.getpid()}"
    if dest.exists():
        dest.rename(old)
    staged.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    return dest / "vmlinux"


def build_lean_kernel(
    cache: Path,
    jobs: int | None = None,
    package: str = SOURCE_PACKAGE,
    progress: Callable[[BuildProgress], None] | None = None,
    phase: Callable[[str], None] | None = None,
) -> LeanKernel:
    """Build the lean kernel into the cache: source, config, `make vmlinux`, install."""
    say = phase or (lambda _text: None)
    t0 = time.monotonic()
    build_root = cache / BUILD_DIR
    _check_space(cache)
    say(f"source: {package}")
    tarball = ensure_build_inputs(package)
    say(f"unpacking {tarball}")
    source = unpack_source(tarball, build_root)
    config = pinned_config()
    say("config: make olddefconfig")
    settled = apply_config(source, config)
    argv = make_argv(source, jobs or default_jobs())
    say(f"building: {' '.join(argv)} (log: {build_root / BUILD_LOG})")
    run_make(argv, build_root / BUILD_LOG, progress)
    release = kernel_release(source)
    sha = config_sha256(config)
    kernel = install_lean(cache, source / "vmlinux", release, settled, sha, LEAN_MEMORY_FLOOR_MIB)
    return LeanKernel(kernel=kernel, release=release, config_sha256=sha, seconds=time.monotonic() - t0)


class BuildDisplay:
    """Progress on the terminal (a rich spinner with the count and current file) or as plain lines
    (one per phase and per PLAIN_EVERY objects) when the output is not a terminal."""

    PLAIN_EVERY = 200

    def __init__(self, terminal: bool, echo: Callable[[str], None]) -> None:
        self.terminal = terminal
        self.echo = echo
        self._status: Any = None
        self._next_plain = self.PLAIN_EVERY

    def __enter__(self) -> "BuildDisplay":
        if self.terminal:
            from rich.console import Console

            self._status = Console(stderr=True).status("kernel build")
            self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)

    def phase(self, text: str) -> None:
        if self._status is not None:
            self._status.console.log(text)
            self._status.update(text)
        else:
            self.echo(text)

    def progress(self, state: BuildProgress) -> None:
        if self._status is not None:
            self._status.update(state.describe())
        elif state.compiled >= self._next_plain:
            self._next_plain += self.PLAIN_EVERY
            self.echo(state.describe())
