"""Builds the recorded /proc and /sys trees of tests/unit/test_interference.py (run once, committed).

The base is a real recording from the 2-CPU development host (stat, interrupts, softirqs .recorded);
each case is that host 2 s later with one kind of disturbance on CPU 1 written into the counters.
VMM: pid 500 (threads 500 main, 502 "CPU 0/TCG"); a neighbour task: pid 700 "busyneighbour".
"""

import re
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
HZ = 100


def stat_text(base: str, add: dict[int, list[int]]) -> str:
    out = []
    for line in base.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in add:
            vals = [int(v) for v in rest.split()]
            vals = [v + d for v, d in zip(vals, add[int(name[3:])] + [0] * 10, strict=False)]
            line = f"{name} " + " ".join(map(str, vals))
        out.append(line)
    return "\n".join(out) + "\n"


def bump_table(text: str, name: str, cpu_index: int, n: int) -> str:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        head = line.split(":")[0].strip()
        if head == name:
            parts = re.split(r"(\s+)", line)
            nums = [j for j, p in enumerate(parts) if p.isdigit() and j > 1]
            j = nums[cpu_index]
            parts[j] = str(int(parts[j]) + n).rjust(len(parts[j]))
            lines[i] = "".join(parts)
    return "\n".join(lines) + "\n"


def task_stat(pid: int, comm: str, ticks: int, cpu: int, majflt: int = 0) -> str:
    fields = [
        "S",
        "1",
        "1",
        "1",
        "0",
        "-1",
        "0",
        "10",
        "0",
        str(majflt),
        "0",
        str(ticks // 2),
        str(ticks - ticks // 2),
    ]
    fields += ["0"] * 23 + [str(cpu)] + ["0"] * 13
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def tree(
    root: Path,
    *,
    stat: str,
    irqs: str,
    soft: str,
    vmm_ns: int,
    vcpu_ns: int,
    invol: int,
    majflt: int,
    neighbour_ticks: int | None,
    pressure: dict[str, int] | None,
    freq: int | None,
    throttle: int | None,
) -> None:
    write(root, "proc/stat", stat)
    write(root, "proc/interrupts", irqs)
    write(root, "proc/softirqs", soft)
    if pressure is not None:
        for kind, total in pressure.items():
            write(
                root,
                f"proc/pressure/{kind}",
                f"some avg10=0.00 avg60=0.00 avg300=0.00 total={total}\n"
                "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
            )
    write(root, "proc/500/stat", task_stat(500, "qemu-system-x86", 0, 1, majflt))
    for tid, comm, ns, inv in ((500, "qemu-system-x86", vmm_ns, 3), (502, "CPU 0/TCG", vcpu_ns, invol)):
        task = f"proc/500/task/{tid}"
        write(root, f"{task}/comm", comm + "\n")
        write(root, f"{task}/schedstat", f"{ns} 0 0\n")
        write(
            root,
            f"{task}/status",
            f"Name:\t{comm}\nvoluntary_ctxt_switches:\t5\nnonvoluntary_ctxt_switches:\t{inv}\n",
        )
        write(root, f"{task}/stat", task_stat(500, comm, ns // 10_000_000, 1, majflt))
    if neighbour_ticks is not None:
        write(root, "proc/700/task/700/stat", task_stat(700, "busyneighbour", neighbour_ticks, 1))
    write(root, "proc/1/task/1/stat", task_stat(1, "init", 50, 0))
    if freq is not None:
        write(root, "sys/devices/system/cpu/cpu1/cpufreq/scaling_cur_freq", f"{freq}\n")
    if throttle is not None:
        write(root, "sys/devices/system/cpu/cpu1/thermal_throttle/core_throttle_count", f"{throttle}\n")
        write(root, "sys/devices/system/cpu/cpu1/thermal_throttle/package_throttle_count", "0\n")


def case(
    name: str,
    *,
    busy: int = 0,
    steal: int = 0,
    irq: int = 0,
    soft: int = 0,
    neighbour: int = 0,
    invol: int = 20,
    majflt: int = 0,
    pressure: bool = True,
    freq: tuple[int, int] | None = None,
    throttle: int | None = None,
    missing: bool = False,
) -> None:
    base_stat = (HERE / "stat.recorded").read_text()
    base_irq = (HERE / "interrupts.recorded").read_text()
    base_soft = (HERE / "softirqs.recorded").read_text()
    dest = HERE / name
    shutil.rmtree(dest, ignore_errors=True)
    # In the 2 s: the VMM ran 1.96 s on CPU 1 (vCPU 1.90, main thread 0.06), plus `busy` ticks of others.
    vmm_ticks = 196
    after_stat = stat_text(
        base_stat, {1: [vmm_ticks + busy, 0, 0, max(0, 200 - vmm_ticks - busy - steal), 0, 0, 0, steal]}
    )
    p0 = {"cpu": 1_000_000, "memory": 2_000_000, "io": 3_000_000}
    p1 = {
        "cpu": 1_100_000,
        "memory": 2_000_000 + (60_000 if name == "memory_pressure" else 0),
        "io": 3_010_000,
    }
    common: dict[str, Any] = dict(
        neighbour_ticks=None if missing else 100,
        pressure=None if missing or not pressure else p0,
        freq=freq[0] if freq else None,
        throttle=throttle,
    )
    tree(
        dest / "before",
        stat=base_stat,
        irqs="" if missing else base_irq,
        soft="" if missing else base_soft,
        vmm_ns=50_000_000,
        vcpu_ns=1_000_000_000,
        invol=100,
        majflt=7,
        **common,
    )
    common.update(
        neighbour_ticks=None if missing else 100 + neighbour,
        pressure=None if missing or not pressure else p1,
        freq=freq[1] if freq else None,
        throttle=throttle + 4 if throttle is not None else None,
    )
    tree(
        dest / "after",
        stat=after_stat,
        irqs="" if missing else bump_table(bump_table(base_irq, "36", 1, irq), "LOC", 1, 500),
        soft="" if missing else bump_table(bump_table(base_soft, "NET_RX", 1, soft), "TIMER", 1, 500),
        vmm_ns=110_000_000,
        vcpu_ns=2_900_000_000,
        invol=100 + invol,
        majflt=7 + majflt,
        **common,
    )


case("idle")
case("busy_neighbour", busy=80, neighbour=80)  # 40 % of CPU 1 to "busyneighbour"
case("irq_storm", irq=6000, soft=5000)
case("throttling", freq=(3_000_000, 2_200_000), throttle=10)
case("steal", steal=30)
case("missing_files", missing=True)
case("memory_pressure")
case("swapping_vmm", majflt=12)
case("preempted_vcpu", invol=400)
