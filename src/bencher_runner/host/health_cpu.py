"""CPU thermal throttling counters, for the host health probe.

The kernel counts each time a core or its package crossed its thermal limit and was slowed down, in
`/sys/devices/system/cpu/cpuN/thermal_throttle/{core,package}_throttle_count` (x86 with the therm
interrupt; absent on other CPUs and in most VMs, which the probe treats as "nothing to report").
Counts only ever rise, so what matters is a rise between two probes: the CPUs throttle now.
"""

import os
from pathlib import Path

COUNTERS = ("core_throttle_count", "package_throttle_count")

# (cpu number, counter name) -> count
ThrottleCounts = dict[tuple[int, str], int]


def _read_int(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return int(os.read(fd, 64))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def read_throttle_counts(sys: Path) -> ThrottleCounts:
    """Every CPU's counters; os-level reads of string paths, as a 128-CPU host has 256 of them."""
    counts: ThrottleCounts = {}
    base = sys / "devices/system/cpu"
    try:
        names = [n for n in os.listdir(base) if n.startswith("cpu") and n[3:].isdigit()]
    except OSError:
        return counts
    for name in names:
        for counter in COUNTERS:
            value = _read_int(f"{base}/{name}/thermal_throttle/{counter}")
            if value is not None:
                counts[int(name[3:]), counter] = value
    return counts


def rises(before: ThrottleCounts, after: ThrottleCounts) -> dict[tuple[int, str], int]:
    """Counters that rose from ``before`` to ``after`` (a counter new in ``after`` did not rise)."""
    return {key: after[key] - old for key, old in before.items() if after.get(key, old) > old}
