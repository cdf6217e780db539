"""CPU thermal throttling counters, for the host health probe.

The kernel counts each time a core or its package crossed its thermal limit and was slowed down, in
`/sys/devices/system/cpu/cpuN/thermal_throttle/{core,package}_throttle_count` (x86 with the therm
interrupt; absent on other CPUs and in most VMs, which the probe treats as "nothing to report").
Counts only ever rise, so what matters is a rise between two probes: the CPUs throttle now.
"""

from pathlib import Path

COUNTERS = ("core_throttle_count", "package_throttle_count")

# (cpu number, counter name) -> count
ThrottleCounts = dict[tuple[int, str], int]


def read_throttle_counts(sys: Path) -> ThrottleCounts:
    counts: ThrottleCounts = {}
    try:
        cpus = [p for p in (sys / "devices/system/cpu").iterdir() if p.name[3:].isdigit()]
    except OSError:
        return counts
    for cpu in cpus:
        if not cpu.name.startswith("cpu"):
            continue
        for counter in COUNTERS:
            try:
                counts[int(cpu.name[3:]), counter] = int((cpu / "thermal_throttle" / counter).read_text())
            except (OSError, ValueError):
                continue
    return counts


def rises(before: ThrottleCounts, after: ThrottleCounts) -> dict[tuple[int, str], int]:
    """Counters that rose from ``before`` to ``after`` (a counter new in ``after`` did not rise)."""
    return {key: after[key] - old for key, old in before.items() if after.get(key, old) > old}
