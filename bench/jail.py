"""What the VM jail costs (sandbox/jail.py): job wall time with and without it, in one run.

    .venv/bin/python -m bench.jail [--repeat N] [--json OUT]

1. job: `runner run --json` on the example image (warm template), jailed and with --danger-no-jail,
   alternating so both see the same load; medians of total_s and vm_s. Goal: jailed/unjailed < 1.02.
2. start-up: the jail's chain (nsenter-less: prlimit, bwrap, setpriv, env) around /bin/true against
   /bin/true alone, median of 20: the fixed cost each VM start pays.
Medians over --repeat; this machine is noisy (TCG, shared cores).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bencher_runner.sandbox.jail import bwrap_argv, find_jail_tools, host_root_links, jail_vm
from bencher_runner.sandbox.vm import VmSpec
from bencher_runner.spec.config import DEFAULT_JAIL_UID

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples/hello/oci"
RUNNER = [
    sys.executable,
    "-m",
    "bencher_runner",
    "run",
    "--image",
    f"{IMAGE}:latest",
    "--accel",
    "tcg",
    "--json",
]


def job_times(extra: list[str]) -> dict[str, float]:
    proc = subprocess.run([*RUNNER, *extra], capture_output=True, check=True)
    timings = json.loads(proc.stdout)["timings"]
    return {"total_s": float(timings["total_s"]), "vm_s": float(timings["vm_s"])}


def start_cost(repeat: int = 20) -> dict[str, float]:
    """Median wall time of /bin/true alone and inside the jail's chain."""
    tmp = Path("/tmp") / f"bench-jail-{time.monotonic_ns()}"
    tmp.mkdir()
    files = {name: tmp / name for name in ("k", "i", "r", "o", "s")}
    for path in files.values():
        path.write_bytes(b"")
    spec = VmSpec(files["k"], files["i"], files["r"], files["o"], files["s"], 1, 64, "tcg")
    plan, _ = jail_vm(spec, "/usr/bin/true", uid=DEFAULT_JAIL_UID, gid=DEFAULT_JAIL_UID)
    argv = bwrap_argv(plan, find_jail_tools(), ["/usr/bin/true"], root_links=host_root_links())

    def median(cmd: list[str]) -> float:
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={})
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    try:
        return {"direct_s": median(["/usr/bin/true"]), "jailed_s": median(argv)}
    finally:
        for path in files.values():
            path.unlink()
        tmp.rmdir()


def measure(repeat: int) -> dict[str, object]:
    runs: dict[str, list[dict[str, float]]] = {"jailed": [], "unjailed": []}
    job_times([])  # warm the template and the caches
    for _ in range(repeat):
        runs["jailed"].append(job_times([]))
        runs["unjailed"].append(job_times(["--danger-no-jail"]))
    result: dict[str, object] = {
        mode: {key: statistics.median(r[key] for r in samples) for key in ("total_s", "vm_s")}
        for mode, samples in runs.items()
    }
    jailed, unjailed = result["jailed"], result["unjailed"]
    assert isinstance(jailed, dict) and isinstance(unjailed, dict)
    result["ratio_total"] = jailed["total_s"] / unjailed["total_s"]
    result["samples"] = runs
    result["start"] = start_cost()
    return result


def run(repeat: int) -> dict[str, float]:
    """The figures `python -m bench` reports: jailed/unjailed job wall time, the chain's start cost."""
    result = measure(repeat)
    start = result["start"]
    assert isinstance(start, dict)
    ratio = float(result["ratio_total"])  # type: ignore[arg-type]
    cost_ms = (start["jailed_s"] - start["direct_s"]) * 1000
    print(f"jailed / unjailed job wall time: {ratio:.3f}; jail start-up: {cost_ms:.1f} ms per VM", flush=True)
    return {"jail_ratio": ratio, "jail_start_ms": cost_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.repeat)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
