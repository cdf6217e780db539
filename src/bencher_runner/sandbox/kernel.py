"""The guest kernel bundle: a kernel image plus the modules the agent loads, in dependency order.

Two kinds live side by side in the cache: the lean kernel `runner kernel build` makes
(``kernel-lean/``, kernelbuild.py: every driver built in, no modules) and the fetched cloud kernel
(``kernel/``). The lean one is the default when it is there; ``--kernel`` overrides both.

The cloud kernel is Debian's (``linux-image-cloud-amd64`` and the versioned package it
depends on), fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the cache, never
installed as the host's kernel. Debian ships no modules.dep in the package (depmod runs at install),
so dependencies are read from each module's ``.modinfo`` ELF section (pyelftools).
"""

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bencher_runner.spec.errors import KernelBundleError, SpecError

# The drivers a guest needs: block devices over virtio-mmio, and the NIC for network jobs.
GUEST_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net")
DEFAULT_PACKAGE = "linux-image-cloud-amd64"
BUNDLE_FILE = "bundle.json"
LEAN_DIR = "kernel-lean"

# The smallest --memory (MiB) with which the kernel boots and runs examples/hello under the runner,
# found by bisection over real boots (QEMU microvm, TCG, 1 vCPU, 2026-12-02; below 64 MiB with the
# CLI's own minimum lifted for the measurement), plus a little headroom. Below it the cloud kernel
# panics at boot ("System is deadlocked on memory"); the lean one stops before reporting a result.
# The CLI's minimum (64 MiB) still applies on top; tests/vm/test_lean_kernel.py boots at the floors.
CLOUD_MEMORY_FLOOR_MIB = 72  # bisected: 70 runs, 69 and 68 panic ("deadlocked on memory"); +2 MiB
LEAN_MEMORY_FLOOR_MIB = 32  # bisected: 29 runs, 28 does not (no result); +3 MiB
MEMORY_FLOORS = {"cloud": CLOUD_MEMORY_FLOOR_MIB, "lean": LEAN_MEMORY_FLOOR_MIB}


@dataclass(frozen=True)
class KernelBundle:
    kernel: Path
    modules: tuple[Path, ...]  # load order
    release: str
    kind: str = "custom"  # "lean" (built), "cloud" (fetched) or "custom" (--kernel)
    config_sha256: str | None = None
    memory_floor_mib: int | None = None  # None: unknown (a --kernel of the user's own)
    acpi: bool = True  # False: the kernel finds its virtio-mmio devices on the command line only

    def describe(self) -> str:
        config = f", config sha256 {self.config_sha256[:12]}" if self.config_sha256 else ""
        floor = f", at least {self.memory_floor_mib} MiB" if self.memory_floor_mib else ""
        return f"{self.kind} kernel {self.release}{config}{floor}: {self.kernel}"


def check_memory_floor(bundle: KernelBundle, memory_mib: int) -> None:
    """Refuse a --memory the guest kernel cannot boot in (before any pull or work)."""
    floor = bundle.memory_floor_mib
    if floor is not None and memory_mib < floor:
        raise SpecError(
            f"--memory {memory_mib} MiB is below the floor of the {bundle.kind} kernel "
            f"{bundle.release} ({floor} MiB): the guest kernel needs {floor} MiB to boot; "
            f"ask for at least {floor} MiB"
        )


def modinfo(path: Path) -> dict[str, str]:
    """The ``key=value`` strings of a module's .modinfo section (first value of each key)."""
    from elftools.elf.elffile import ELFFile  # pyelftools: only when a bundle is fetched or checked

    try:
        with path.open("rb") as f:
            section = ELFFile(f).get_section_by_name(".modinfo")
            data = section.data() if section is not None else b""
    except Exception as err:  # pyelftools raises its own error types on bad files
        raise KernelBundleError(f"cannot read kernel module {path}: {err}; is it a valid .ko file?") from err
    info: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def index_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .ko under root (names use '_' as the kernel does)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.ko")):
        found.setdefault(path.name[: -len(".ko")].replace("-", "_"), path)
    return found


def load_order(wanted: Iterable[str], available: dict[str, Path]) -> list[str]:
    """Wanted modules plus their dependencies, each after what it depends on.

    A wanted module that is absent is skipped: a kernel with the driver built in needs no module.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise KernelBundleError(f"kernel module dependency cycle at {name}")
        visiting.add(name)
        deps = modinfo(available[name]).get("depends", "")
        for dep in filter(None, deps.split(",")):
            if dep not in available:
                raise KernelBundleError(
                    f"kernel module {name} needs {dep}, which is not in the module directory; "
                    "point --kernel-modules at the kernel's complete modules tree"
                )
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        if name in available:
            visit(name)
    return order


def bundle_from(kernel: Path, modules_dir: Path | None) -> KernelBundle:
    """A bundle from a user's own kernel and (optional) modules tree."""
    if not kernel.is_file():
        raise KernelBundleError(
            f"kernel image {kernel} does not exist; check --kernel / BENCHER_RUNNER_KERNEL"
        )
    installed = _installed_bundle(kernel)  # e.g. --kernel .../kernel-lean/vmlinux: its floor holds
    if installed is not None and installed.kind == "lean" and modules_dir is None:
        return installed
    modules: tuple[Path, ...] = ()
    if modules_dir is not None:
        if not modules_dir.is_dir():
            raise KernelBundleError(
                f"kernel modules directory {modules_dir} does not exist; "
                "check --kernel-modules / BENCHER_RUNNER_KERNEL_MODULES"
            )
        available = index_modules(modules_dir)
        modules = tuple(available[name] for name in load_order(GUEST_MODULES, available))
    if installed is not None:  # the fetched cloud kernel (or its vmlinux) named with --kernel
        return KernelBundle(
            kernel, modules, installed.release, installed.kind, installed.config_sha256,
            installed.memory_floor_mib, installed.acpi,
        )  # fmt: skip
    return KernelBundle(kernel=kernel, modules=modules, release=kernel.name)


def _installed_bundle(kernel: Path) -> "KernelBundle | None":
    """The cached bundle whose kernel (or the vmlinux extracted beside it) this file is, if any."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        if (kernel.parent / BUNDLE_FILE).is_file():
            bundle = _read_bundle(kernel.parent)
            if kernel.resolve() in (bundle.kernel.resolve(), (kernel.parent / "vmlinux").resolve()):
                return bundle
    return None


def kernel_dir(cache: Path) -> Path:
    return cache / "kernel"


def lean_dir(cache: Path) -> Path:
    return cache / LEAN_DIR


def _read_bundle(base: Path) -> KernelBundle:
    doc = json.loads((base / BUNDLE_FILE).read_text())
    kind = str(doc.get("kind", "cloud"))  # bundles fetched before kinds existed are cloud kernels
    sha = doc.get("config_sha256")
    return KernelBundle(
        kernel=base / doc["kernel"],
        modules=tuple(base / m for m in doc["modules"]),
        release=str(doc["release"]),
        kind=kind,
        config_sha256=str(sha) if sha else None,
        memory_floor_mib=int(doc.get("memory_floor_mib") or MEMORY_FLOORS.get(kind) or 0) or None,
        acpi=bool(doc.get("acpi", kind != "lean")),
    )


def load_cached_bundle(cache: Path) -> KernelBundle:
    """The default bundle: the lean kernel `runner kernel build` made, else the fetched one."""
    return load_lean_bundle(cache) or load_cloud_bundle(cache)


def load_lean_bundle(cache: Path) -> KernelBundle | None:
    """The built lean kernel, None when none was built."""
    lean = lean_dir(cache)
    if (lean / BUNDLE_FILE).is_file():
        try:
            bundle = _read_bundle(lean)
        except (OSError, ValueError, KeyError) as err:
            raise KernelBundleError(
                f"the lean kernel's metadata in {lean} is unreadable ({err.__class__.__name__}); "
                f"run `runner kernel build` again, or remove {lean} to use the cloud kernel"
            ) from None
        if not bundle.kernel.is_file():
            raise KernelBundleError(
                f"the lean kernel in {lean} is incomplete ({bundle.kernel} is missing); "
                f"run `runner kernel build` again, or remove {lean} to use the cloud kernel"
            )
        return bundle
    return None


def load_cloud_bundle(cache: Path) -> KernelBundle:
    """The bundle `runner kernel fetch` put in the cache."""
    try:
        bundle = _read_bundle(kernel_dir(cache))
    except (OSError, ValueError, KeyError) as err:
        raise KernelBundleError(
            f"no guest kernel bundle in {kernel_dir(cache)} ({err.__class__.__name__}); "
            "run `runner kernel fetch` (or `make setup`) or `runner kernel build`, or pass --kernel"
        ) from None
    missing = [p for p in (bundle.kernel, *bundle.modules) if not p.is_file()]
    if missing:
        raise KernelBundleError(
            f"guest kernel bundle in {kernel_dir(cache)} is incomplete ({missing[0]} is missing); "
            "run `runner kernel fetch` again"
        )
    return bundle


def resolve_bundle(cache: Path, kernel: Path | None, modules: Path | None) -> KernelBundle:
    kernel = kernel or _env_path("BENCHER_RUNNER_KERNEL")
    modules = modules or _env_path("BENCHER_RUNNER_KERNEL_MODULES")
    if kernel is not None:
        return bundle_from(kernel, modules)
    if modules is not None:
        raise KernelBundleError(
            "--kernel-modules needs --kernel: give the kernel image these modules belong to"
        )
    return load_cached_bundle(cache)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _run(argv: list[str], cwd: Path) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise KernelBundleError(
            f"`{argv[0]}` is not installed; the default kernel bundle needs Debian's apt tools "
            "(or pass --kernel and --kernel-modules)"
        ) from None
    if proc.returncode != 0:
        raise KernelBundleError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def fetch_debian_bundle(cache: Path, package: str = DEFAULT_PACKAGE) -> KernelBundle:
    """Download the distribution's cloud kernel and unpack kernel + needed modules into the cache."""
    dest = kernel_dir(cache)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=dest.parent) as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)  # apt's sandbox user must be able to write the download here
        _run(["apt-get", "download", package], tmp)
        debs = sorted(tmp.glob("*.deb"))
        depends = _run(["dpkg-deb", "-f", str(debs[0]), "Depends"], tmp)
        image_pkg = next(
            (d.split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-")), None
        )
        if image_pkg is None:
            raise KernelBundleError(
                f"{package} does not depend on a linux-image package; name a kernel package"
            )
        _run(["apt-get", "download", image_pkg], tmp)
        deb = next(p for p in tmp.glob("*.deb") if p.name.startswith(image_pkg + "_"))
        unpacked = tmp / "root"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], tmp)
        vmlinuz = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise KernelBundleError(f"{image_pkg} holds no /boot/vmlinuz-*")
        release = vmlinuz[0].name[len("vmlinuz-") :]
        available = index_modules(unpacked / "lib" / "modules" / release)
        names = load_order(GUEST_MODULES, available)
        staged = tmp / "bundle"
        (staged / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz[0], staged / "vmlinuz")
        config = unpacked / "boot" / f"config-{release}"
        if config.exists():
            shutil.copy2(config, staged / "config")
        rel_modules = []
        for name in names:
            shutil.copy2(available[name], staged / "modules" / f"{name}.ko")
            rel_modules.append(f"modules/{name}.ko")
        doc = {
            "kind": "cloud",
            "release": release,
            "package": image_pkg,
            "kernel": "vmlinuz",
            "modules": rel_modules,
        }
        (staged / BUNDLE_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return load_cloud_bundle(cache)
