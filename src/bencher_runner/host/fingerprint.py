"""The host fingerprint: what a result was measured on, once per job.

Two numbers compare only if they came from the same kind of machine in the same state: CPU model and
microcode, host kernel and its boot arguments (the isolation ones picked out), the tuning the job
applied, the accelerator, the guest kernel (and the hash of its config when the bundle has one), and
the runner's version. Read from /proc under a root path (tests feed recorded trees); never sent to
Bencher (the protocol has no field for it).
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from bencher_runner import __version__
from bencher_runner.spec.errors import RunnerError

# Boot arguments that change what the benchmark CPUs do.
ISOLATION_ARGS = (
    "isolcpus", "nohz_full", "rcu_nocbs", "irqaffinity", "nosmt", "idle", "intel_idle.max_cstate",
    "processor.max_cstate", "intel_pstate", "amd_pstate", "cpufreq.default_governor", "mitigations",
    "threadirqs", "skew_tick", "nowatchdog", "nmi_watchdog", "tsc",
)  # fmt: skip
CONFIG_NAME = "config"  # a bundle's kernel config, next to its kernel


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def cpu_identity(cpuinfo: str) -> dict[str, str | None]:
    """The first processor's model name and microcode revision from /proc/cpuinfo."""
    found: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in ("model name", "microcode") and key not in found:
            found[key] = value.strip()
        if not line.strip() and found:
            break
    return {"cpu_model": found.get("model name"), "microcode": found.get("microcode")}


def isolation_args(cmdline: str) -> list[str]:
    return [arg for arg in cmdline.split() if arg.partition("=")[0] in ISOLATION_ARGS]


def file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def host_fingerprint(
    *,
    accel: str | None,
    guest_kernel: Path | None = None,
    guest_release: str | None = None,
    tuning: object = None,
    root: Path = Path("/"),
) -> dict[str, Any]:
    cmdline = _read(root / "proc/cmdline")
    guest: dict[str, Any] | None = None
    if guest_kernel is not None:
        config = guest_kernel.parent / CONFIG_NAME
        guest = {
            "release": guest_release,
            "path": str(guest_kernel),
            "config_sha256": file_sha256(config) if config.is_file() else None,
        }
    return {
        **cpu_identity(_read(root / "proc/cpuinfo")),
        "kernel_release": _read(root / "proc/sys/kernel/osrelease") or None,
        "kernel_cmdline": cmdline,
        "isolation_args": isolation_args(cmdline),
        "tuning": tuning,
        "accel": accel,
        "guest_kernel": guest,
        "runner_version": __version__,
    }


HOST_JSON = "host.json"


def save_host_json(output_dir: Path, fingerprint: object, interference: object) -> None:
    """`runner run --output-dir`: the fingerprint and every iteration's interference report."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        doc = {"fingerprint": fingerprint, "interference": interference}
        (output_dir / HOST_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as err:
        raise RunnerError(
            f"cannot write {output_dir / HOST_JSON}: {err.strerror or err}; "
            "pass an --output-dir you can write to"
        ) from None
