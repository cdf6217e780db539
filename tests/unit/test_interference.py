"""The interference report's arithmetic on recorded /proc and /sys trees (tests/data/interference).

Each case is a real recording of this 2-CPU host (before) and the same host 2 s later with one
disturbance written into CPU 1's counters (after); tests/data/interference/make_cases.py built them.
The VMM is pid 500 (its vCPU thread "CPU 0/TCG" is 502) and ran 1.96 s of the 2 s on CPU 1.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.host.fingerprint import host_fingerprint, save_host_json
from bencher_runner.host.interference import (
    Attribution,
    Snapshot,
    Thresholds,
    attribute,
    interference,
    parse_interrupts,
    parse_task_stat,
    read_snapshot,
    verdict_line,
)
from bencher_runner.host.sampler import InterferenceSampler
from bencher_runner.spec.errors import RunnerError

DATA = Path(__file__).parent.parent / "data" / "interference"
CPUS = (1,)


def snaps(case: str) -> tuple[Snapshot, Snapshot]:
    before = read_snapshot(DATA / case / "before", 100.0, CPUS, 500)
    after = read_snapshot(DATA / case / "after", 102.0, CPUS, 500)
    return before, after


def report(case: str, **kwargs: Any) -> dict[str, Any]:
    before, after = snaps(case)
    return interference(before, after, CPUS, attribute(before.tasks, after.tasks, CPUS, [500]), **kwargs)


def test_idle_host_is_clean_with_every_check_measured() -> None:
    doc = report("idle")
    assert doc["verdict"] == "clean", doc["reasons"]
    checks = doc["checks"]
    assert checks["other_tasks"]["share"] == pytest.approx(0.0, abs=0.005)
    assert checks["other_tasks"]["tasks"] == 0
    assert checks["irqs"]["verdict"] == "clean"  # the 500 local timer ticks do not count
    assert checks["softirqs"]["per_cpu_per_s"] == 0  # neither do the tick's TIMER softirqs
    assert checks["steal"]["share"] == 0
    assert checks["vmm_major_faults"]["count"] == 0
    assert checks["vcpu_preemptions"]["per_vcpu"] == {"CPU 0/TCG": 20}
    assert checks["frequency"]["verdict"] == "unavailable"  # this host exposes no cpufreq
    assert doc["seconds"] == 2.0


def test_busy_neighbour_is_named_with_its_share() -> None:
    doc = report("busy_neighbour")
    assert doc["verdict"] == "disturbed"
    other = doc["checks"]["other_tasks"]
    assert other["share"] == pytest.approx(0.40, abs=0.01)  # 0.8 s of the 2 s, VMM's 1.96 s subtracted
    assert other["tasks"] == 1
    assert other["top"][0]["name"] == "busyneighbour"
    assert other["top"][0]["cpu_s"] == pytest.approx(0.8)
    assert "other tasks took 40.0% of CPU 1 (busyneighbour 40%)" in doc["reasons"]


def test_irq_storm_names_the_device_and_the_softirq() -> None:
    doc = report("irq_storm")
    assert doc["verdict"] == "disturbed"
    irqs, soft = doc["checks"]["irqs"], doc["checks"]["softirqs"]
    assert irqs["per_cpu_per_s"] == 3000 and irqs["top"][0] == {"name": "36 virtio1-req.0", "count": 6000}
    assert soft["per_cpu_per_s"] == 2500 and soft["top"][0]["name"] == "NET_RX"
    assert any("interrupts/s" in r and "virtio1-req.0" in r for r in doc["reasons"])
    assert doc["checks"]["other_tasks"]["verdict"] == "clean"


def test_throttling_reports_the_clock_drop_and_the_events() -> None:
    doc = report("throttling")
    freq = doc["checks"]["frequency"]
    assert freq["verdict"] == "disturbed"
    assert (freq["min_khz"], freq["max_khz"], freq["throttle_events"]) == (2_200_000, 3_000_000, 4)
    assert freq["spread"] == pytest.approx(0.2667, abs=1e-3)
    assert "CPU 1 clock varied 27%, 4 thermal throttle events" in doc["reasons"]


def test_steady_clock_without_throttle_is_clean() -> None:
    before, after = snaps("throttling")
    after.throttle = dict(before.throttle)
    after.freq_khz = dict(before.freq_khz)
    doc = interference(before, after, CPUS, Attribution())
    assert doc["checks"]["frequency"]["verdict"] == "clean"


def test_steal_is_a_share_of_the_benchmark_cpus() -> None:
    doc = report("steal")
    assert doc["checks"]["steal"]["share"] == pytest.approx(0.15)
    assert "the hypervisor stole 15.0% of CPU 1" in doc["reasons"]


def test_missing_files_are_unavailable_not_clean_or_a_crash() -> None:
    doc = report("missing_files")
    checks = doc["checks"]
    assert checks["irqs"]["verdict"] == checks["softirqs"]["verdict"] == "unavailable"
    assert {c["verdict"] for c in checks["pressure"].values()} == {"unavailable"}
    assert doc["verdict"] == "clean"  # what was measured is clean


def test_memory_pressure_swapping_vmm_and_preempted_vcpu() -> None:
    assert report("memory_pressure")["checks"]["pressure"]["memory"]["share"] == pytest.approx(0.03)
    assert "memory pressure stalled tasks 3.0% of the time" in report("memory_pressure")["reasons"]
    assert report("swapping_vmm")["reasons"] == ["the VMM took 12 major page faults"]
    preempted = report("preempted_vcpu")
    assert preempted["reasons"] == ["a vCPU thread was preempted 200 times/s"]
    shared = report("preempted_vcpu", vcpu_alone=False)  # TCG: the VMM's own threads share the CPU
    assert shared["checks"]["vcpu_preemptions"]["verdict"] == "info" and shared["verdict"] == "clean"


def test_thresholds_decide() -> None:
    assert report("busy_neighbour", limits=Thresholds(other_share=0.5))["verdict"] == "clean"
    assert report("idle", limits=Thresholds(vcpu_preempt_per_s=5))["verdict"] == "disturbed"


def test_attribution_skips_the_vmm_other_cpus_and_idle_tasks() -> None:
    before, after = snaps("busy_neighbour")
    got = attribute(before.tasks, after.tasks, CPUS, [500])
    assert dict(got.ticks) == {"busyneighbour": 80} and got.tids == {700}
    assert not attribute(before.tasks, after.tasks, (0,), [500]).ticks  # it ran on CPU 1
    with_vmm = attribute(before.tasks, after.tasks, CPUS, [])
    assert with_vmm.ticks["CPU 0/TCG"] == 190  # the VMM's threads are only skipped when named
    new = attribute({}, after.tasks, CPUS, [500])
    assert new.ticks["busyneighbour"] == 180  # a task new since the last scan counts with all its time


def test_parsers() -> None:
    text = "      CPU0  CPU1\n 36:   0   12  PCI-MSIX  1-edge  virtio1-req.0\nLOC:  5  7  Local timer\n"
    assert parse_interrupts(text) == {"36 virtio1-req.0": {0: 0, 1: 12}, "LOC": {0: 5, 1: 7}}
    assert parse_interrupts("") == {}
    assert parse_task_stat("12 (a (weird) name) R 1 1 1 0 -1 0 0 0 3 0 40 2" + " 0" * 23 + " 1") == (
        "a (weird) name",
        42,
        1,
        3,
    )
    assert parse_task_stat("garbage") is None


def test_verdict_line() -> None:
    clean, busy = report("idle"), report("busy_neighbour")
    assert verdict_line([]) is None and verdict_line([None]) is None
    assert verdict_line([clean]) == "interference: clean on CPU 1 (1 iteration(s))"
    line = verdict_line([clean, busy])
    assert line is not None and line.startswith("interference: disturbed in 1/2 iteration(s): iteration 2:")
    assert "busyneighbour" in line


def test_sampler_window_excludes_boot_and_thins_losslessly(tmp_path: Path) -> None:
    """The sampler on a recorded tree: its window arithmetic, not the live host."""
    root = DATA / "busy_neighbour" / "after"
    sampler = InterferenceSampler(500, CPUS, "vmm-affinity", root=root, max_samples=4)
    for _ in range(9):
        sampler._take()
    sampler.samples[-1].command_end = True
    assert len(sampler.samples) <= 5 and sampler.interval > 0.25  # thinned, interval doubled
    times = [s.snap.t for s in sampler.samples]
    doc = sampler.report(command_s=0.0)
    assert doc is not None and doc["window"]["source"] == "command"
    assert doc["window"]["measured_s"] <= times[-1] - times[0]
    vm = sampler.report(command_s=None)
    assert vm is not None and vm["window"]["source"] == "vm"
    assert vm["window"]["measured_s"] == pytest.approx(times[-1] - times[0], abs=1e-3)


def test_fingerprint_from_a_recorded_host(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    (tmp_path / "config").write_text("CONFIG_X=y\n")
    doc = host_fingerprint(
        accel="tcg",
        guest_kernel=kernel,
        guest_release="6.1.0-g",
        tuning={"status": "off"},
        root=DATA / "fingerprint",
    )
    assert doc["cpu_model"] == "AMD EPYC" and doc["microcode"] == "0x1000065"  # the first processor's
    assert doc["kernel_release"] == "6.1.0-test"
    assert doc["isolation_args"] == ["isolcpus=2-3", "nohz_full=2-3", "mitigations=off"]
    assert doc["guest_kernel"] == {
        "release": "6.1.0-g",
        "path": str(kernel),
        "config_sha256": hashlib.sha256(b"CONFIG_X=y\n").hexdigest(),
    }
    assert doc["accel"] == "tcg" and doc["tuning"] == {"status": "off"} and doc["runner_version"]
    bare = host_fingerprint(accel="none", root=tmp_path)  # nothing readable: empty, not a crash
    assert bare["cpu_model"] is None and bare["guest_kernel"] is None and bare["isolation_args"] == []
    (tmp_path / "k2").mkdir()
    assert (
        host_fingerprint(accel="kvm", guest_kernel=tmp_path / "k2" / "bzImage")["guest_kernel"][
            "config_sha256"
        ]
        is None
    )


def test_host_json_holds_fingerprint_and_reports(tmp_path: Path) -> None:
    save_host_json(tmp_path / "out", {"accel": "tcg"}, [report("idle"), None])
    doc = json.loads((tmp_path / "out" / "host.json").read_text())
    assert doc["fingerprint"] == {"accel": "tcg"}
    assert doc["interference"][0]["verdict"] == "clean" and doc["interference"][1] is None
    (tmp_path / "file").write_text("")
    with pytest.raises(RunnerError, match=r"cannot write .*host\.json"):
        save_host_json(tmp_path / "file", {}, [])


def test_a_garbled_host_never_fails_the_job(tmp_path: Path) -> None:
    """The sampler is an observer: unreadable or malformed counters give no report, never an error."""
    (tmp_path / "proc" / "500" / "task" / "500").mkdir(parents=True)
    (tmp_path / "proc" / "stat").write_text("cpu1 12 x 4\n")
    (tmp_path / "proc" / "500" / "task" / "500" / "schedstat").write_text("garbage\n")
    (tmp_path / "proc" / "500" / "task" / "500" / "comm").write_text("qemu\n")
    (tmp_path / "proc" / "500" / "task" / "500" / "status").write_text("nonvoluntary_ctxt_switches:\tlots\n")
    sampler = InterferenceSampler(500, CPUS, "vmm-affinity", root=tmp_path, interval=0.01).start()
    sampler.command_ended()
    sampler.stop()
    assert sampler.report(1.0) is None
