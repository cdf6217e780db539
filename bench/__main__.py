"""Every benchmark in one command: `make bench` (= `.venv/bin/python -m bench [--repeat N] [--out DIR]`).

Runs bench/job.py (job overhead, boot to command, job phases), bench/prep.py (image prep against
skopeo + umoci + mkfs, warm and incremental against cold, RSS of a 512 MiB pull), bench/daemon.py
(heartbeats under load, cancel latency, RSS, throughput), bench/jail.py (what the VMM jail costs)
and bench/kernel.py (the lean guest kernel against the cloud one).
Each prints its figures with the reference measured in the same run; this prints the goals table at
the end and writes DIR/results.json and DIR/phases.png.
"""

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

from bench import daemon, jail, job, kernel, prep
from bench.plot import plot_phases

# (figure, goal: at most this, what it is): shared/design/BENCHMARKS.md's table (raised 2026-12-02)
GOALS = (
    ("warm_job_ratio", 1.02, "warm-image job: runner run / hand-written QEMU, cloud kernel"),
    ("warm_job_lean_ratio", 1.02, "the same with the lean kernel"),
    ("prep_cold_over_reference", 0.40, "cold image prep / skopeo + umoci + mkfs"),
    ("prep_warm_over_cold", 0.01, "warm image prep (spare disk) / cold image prep"),
    ("prep_incremental_over_cold", 0.15, "new image, +1 MiB layer on a cached base / its cold prep"),
    ("heartbeat_p99_s", 1.2, "heartbeat interval p99 during a cold 512 MiB-image job (s)"),
    ("cancel_vm_s", 1.0, "cancel -> canceled, VM running the benchmark (s)"),
    ("idle_rss_mib", 50, "daemon idle RSS (MiB)"),
    ("rss_pull_peak_mib", 120, "peak RSS pulling a 512 MiB layer (MiB)"),
    ("pull_hwm_mib", 120, "daemon peak RSS (VmHWM) after a cold 512 MiB job (MiB)"),
    ("jail_ratio", 1.02, "job wall time: jailed VMM / --danger-no-jail"),
    ("kernel_boot_ratio", 0.40, "boot_to_command: lean kernel / cloud kernel"),
    ("kernel_lean_proc_entries", 30, "numeric /proc entries, 1-vCPU lean guest running ls /proc"),
    ("kernel_lean_64mib_fails", 0, "a 64 MiB lean guest fails to run the example (0 = it runs)"),
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, float] = {}
    sections: dict[str, float] = {}

    def job_section() -> dict[str, float]:
        figures, phases = job.run(args.repeat)
        plot_phases(
            {"cold job": phases["cold"], "warm job": phases["warm"]},
            args.out / "phases.png",
            f"Realistic image (debootstrap + python3), 1024 MiB disk, TCG; medians of {args.repeat}",
        )
        return figures

    sections_run: tuple[tuple[str, Callable[[], dict[str, float]]], ...] = (
        ("job", job_section),
        ("prep", lambda: prep.run(args.repeat)),
        ("daemon", lambda: daemon.run(args.repeat)),
        ("jail", lambda: jail.run(args.repeat)),
        ("kernel", lambda: kernel.run(args.repeat)),
    )
    for name, section in sections_run:
        print(f"\n== {name} ==", flush=True)
        t0 = time.monotonic()
        results.update(section())
        sections[name] = time.monotonic() - t0

    print("\n== goals ==")
    for key, goal, what in GOALS:
        value = results.get(key)
        verdict = "not measured" if value is None else ("met" if value <= goal else "NOT met")
        shown = "-" if value is None else f"{value:.3f}"
        print(f"{what:<62} {shown:>9}  goal <= {goal:<5} {verdict}")
    total = time.monotonic() - started
    print(f"\nall benchmarks: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in sections.items())})")
    doc = {
        "host": platform.node(),
        "repeat": args.repeat,
        "seconds": total,
        "figures": results,
        "goals": {key: {"goal": goal, "value": results.get(key), "what": what} for key, goal, what in GOALS},
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'phases.png'}")


if __name__ == "__main__":
    main()
