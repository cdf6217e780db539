"""Lean guest kernel (`runner kernel build`) against Debian's cloud kernel, in one run.

    .venv/bin/python -m bench.kernel [--repeat N] [--lean PATH] [--json OUT]

The same example image and warm template boot with each kernel, alternating so both see the same
load: the cloud kernel as the runner boots it by default (its extracted vmlinux plus its modules),
the lean one as `runner kernel build` installed it (BENCHER_RUNNER_CACHE_DIR's or --lean's
``kernel-lean/vmlinux``). Figures: medians of ``boot_to_command_s`` (guest clock, VM start to the
command) and of the whole `runner run` wall time; the numeric /proc entries a 1-vCPU guest running
`ls /proc` sees; whether a 64 MiB guest runs the example. Goal: lean/cloud boot_to_command <= 0.40.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bencher_runner.paths import cache_dir

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples/hello/oci"
SHARED_KERNEL = Path.home() / ".cache" / "bencher-runner" / "kernel"


def cloud_args() -> list[str]:
    base = cache_dir() / "kernel" if (cache_dir() / "kernel" / "vmlinux").is_file() else SHARED_KERNEL
    return ["--kernel", str(base / "vmlinux"), "--kernel-modules", str(base / "modules")]


def lean_kernel(override: Path | None) -> Path | None:
    path = override or cache_dir() / "kernel-lean" / "vmlinux"
    return path if path.is_file() else None


def run_job(kernel_args: list[str], *extra: str) -> tuple[dict[str, Any], float]:
    argv = [
        sys.executable, "-m", "bencher_runner", "run", "--image", f"{IMAGE}:latest",
        "--accel", "tcg", "--json", "-q", *kernel_args, *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.decode(errors='replace')[-400:]}")
    return json.loads(proc.stdout), wall


def proc_entries(kernel_args: list[str]) -> int:
    entry = ("--entrypoint", "/bin/sh", "--entrypoint", "-c", "--entrypoint", "ls /proc")
    doc, _ = run_job(kernel_args, "--vcpus", "1", *entry)  # the example's entrypoint is its benchmark
    out = str(doc["results"][0]["stdout"])
    return sum(1 for word in out.split() if word.isdigit())


def runs_at(kernel_args: list[str], memory: int) -> bool:
    try:
        doc, _ = run_job(kernel_args, "--memory", str(memory))
    except RuntimeError:
        return False
    return bool(doc["status"] == "completed" and doc["results"][0]["exit_code"] == 0)


def measure(repeat: int, lean: Path) -> dict[str, Any]:
    kernels = {"cloud": cloud_args(), "lean": ["--kernel", str(lean)]}
    for args in kernels.values():
        run_job(args)  # warm the template and each kernel's initramfs
    samples: dict[str, dict[str, list[float]]] = {k: {"boot": [], "wall": []} for k in kernels}
    for _ in range(repeat):
        for name, args in kernels.items():
            doc, wall = run_job(args)
            samples[name]["boot"].append(float(doc["timings"]["boot_to_command_s"]))
            samples[name]["wall"].append(wall)
    out: dict[str, Any] = {"samples": samples}
    for name in kernels:
        out[f"{name}_boot_to_command_s"] = statistics.median(samples[name]["boot"])
        out[f"{name}_wall_s"] = statistics.median(samples[name]["wall"])
        out[f"{name}_proc_entries"] = proc_entries(kernels[name])
    out["lean_64mib_runs"] = runs_at(kernels["lean"], 64)
    out["boot_ratio"] = out["lean_boot_to_command_s"] / out["cloud_boot_to_command_s"]
    out["wall_ratio"] = out["lean_wall_s"] / out["cloud_wall_s"]
    return out


def run(repeat: int, lean_override: Path | None = None) -> dict[str, float]:
    """The figures `python -m bench` reports; none when no lean kernel was built."""
    lean = lean_kernel(lean_override)
    if lean is None:
        print("no lean kernel (run `runner kernel build`): lean kernel figures not measured", flush=True)
        return {}
    r = measure(repeat, lean)
    print(
        f"boot to command: lean {r['lean_boot_to_command_s']:.2f} s / cloud "
        f"{r['cloud_boot_to_command_s']:.2f} s = {r['boot_ratio']:.3f} (goal <= 0.40)\n"
        f"whole run: lean {r['lean_wall_s']:.2f} s / cloud {r['cloud_wall_s']:.2f} s "
        f"= {r['wall_ratio']:.3f}\n"
        f"numeric /proc entries (1 vCPU, ls /proc): lean {r['lean_proc_entries']}, "
        f"cloud {r['cloud_proc_entries']} (goal <= 30)\n"
        f"64 MiB guest runs the example with the lean kernel: {'yes' if r['lean_64mib_runs'] else 'NO'}",
        flush=True,
    )
    return {
        "kernel_boot_ratio": r["boot_ratio"],
        "kernel_wall_ratio": r["wall_ratio"],
        "kernel_lean_boot_to_command_s": r["lean_boot_to_command_s"],
        "kernel_cloud_boot_to_command_s": r["cloud_boot_to_command_s"],
        "kernel_lean_proc_entries": float(r["lean_proc_entries"]),
        "kernel_cloud_proc_entries": float(r["cloud_proc_entries"]),
        "kernel_lean_64mib_fails": 0.0 if r["lean_64mib_runs"] else 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lean", type=Path, help="the lean vmlinux (default: the cache's kernel-lean/)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    lean = lean_kernel(args.lean)
    if lean is None:
        sys.exit("no lean kernel: run `runner kernel build` or pass --lean")
    result = measure(args.repeat, lean)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
