"""Pure parts of host isolation: CPU lists, masks, the partition, vCPU assignment, the tuning plan."""

import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bencher_runner.cli.tuning_options import tuning_options, tuning_options_from
from bencher_runner.host import cpus
from bencher_runner.host.cgroup import memory_max_bytes
from bencher_runner.host.cpus import (
    format_cpu_list,
    format_cpumask,
    online_cpus,
    parse_cpu_list,
    parse_cpumask,
    partition,
    vcpu_assignment,
)
from bencher_runner.host.tuning import KNOB_ORDER, TuningOptions, TuningPlan


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-3,8,10-11", (0, 1, 2, 3, 8, 10, 11)),
        ("0,2,4-6", (0, 2, 4, 5, 6)),  # SMT off leaves holes
        ("0,2,4,6\n", (0, 2, 4, 6)),
        ("5", (5,)),
        ("", ()),
        ("3,1-2,2", (1, 2, 3)),
    ],
)
def test_parse_cpu_list(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("bad", ["a", "1-", "3-1", "1,,2", "-1", "1-2-3"])
def test_parse_cpu_list_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(bad)


@pytest.mark.parametrize(
    ("cpus", "text"),
    [
        ((0, 1, 2, 3, 8, 10, 11), "0-3,8,10-11"),
        ((0, 2, 4, 5, 6), "0,2,4-6"),
        ((7,), "7"),
        ((), ""),
        ((2, 1), "1-2"),
    ],
)
def test_format_cpu_list(cpus: tuple[int, ...], text: str) -> None:
    assert format_cpu_list(cpus) == text
    assert parse_cpu_list(text) == tuple(sorted(cpus))


@pytest.mark.parametrize(
    ("cpus", "mask"),
    [
        ((), "0"),
        ((0,), "1"),
        ((0, 1), "3"),
        ((1, 2, 3), "e"),
        ((31,), "80000000"),
        ((32,), "1,00000000"),
        ((0, 32), "1,00000001"),
        ((0, 1, 64), "1,00000000,00000003"),
        (tuple(range(64)), "ffffffff,ffffffff"),
    ],
)
def test_format_cpumask(cpus: tuple[int, ...], mask: str) -> None:
    assert format_cpumask(cpus) == mask
    assert parse_cpumask(mask) == cpus


@pytest.mark.parametrize(
    ("online", "housekeeping", "benchmark", "isolated"),
    [
        ((0,), (0,), (0,), False),
        ((0, 1), (0,), (1,), True),
        ((0, 1, 2, 3), (0,), (1, 2, 3), True),
        (tuple(range(8)), (0, 1), tuple(range(2, 8)), True),
        (tuple(range(64)), (0, 1), tuple(range(2, 64)), True),
        ((0, 2, 4, 6), (0,), (2, 4, 6), True),
        ((6, 4, 2, 0, 2), (0,), (2, 4, 6), True),
    ],
)
def test_partition(
    online: tuple[int, ...], housekeeping: tuple[int, ...], benchmark: tuple[int, ...], isolated: bool
) -> None:
    layout = partition(online)
    assert (layout.housekeeping, layout.benchmark, layout.has_isolation) == (
        housekeeping,
        benchmark,
        isolated,
    )
    if not isolated:
        assert "shares" in layout.note


def test_partition_empty() -> None:
    with pytest.raises(ValueError):
        partition(())


def test_online_cpus_reads_sysfs(tmp_path: Path) -> None:
    (tmp_path / "devices/system/cpu").mkdir(parents=True)
    (tmp_path / "devices/system/cpu/online").write_text("0,2,4-6\n")
    assert online_cpus(tmp_path) == (0, 2, 4, 5, 6)
    assert online_cpus(tmp_path / "missing")  # falls back to this process's affinity


def test_vcpu_assignment() -> None:
    comms = {10: "qemu-system-x86", 11: "CPU 0/KVM", 12: "CPU 1/KVM", 13: "CPU 2/TCG", 14: "worker"}
    assert vcpu_assignment(comms, (2, 3)) == {10: 3, 11: 2, 12: 3, 13: 2, 14: 3}


def test_memory_max() -> None:
    assert memory_max_bytes(512) == (512 + 128 + 64) * 1024 * 1024


def test_plan_defaults_covers_every_knob_in_order() -> None:
    plan = TuningPlan.from_options(TuningOptions())
    assert [k for k, _ in plan.targets] == list(KNOB_ORDER)
    targets = plan.as_dict()
    assert targets["aslr"] == "0"
    assert targets["swappiness"] == "10"
    assert targets["perf_event_paranoid"] == "-1"
    assert targets["governor"] == "performance"
    assert targets["smt"] == "off"
    assert targets["thp_enabled"] == targets["thp_defrag"] == "never"
    assert targets["cstates"] == "0"


def test_plan_opt_outs() -> None:
    options = TuningOptions(
        keep_aslr=True,
        keep_smt=True,
        keep_cstates=True,
        irq_steering=False,
        swappiness=60,
        governor="schedutil",
        perf_event_paranoid=2,
        thp="leave",
    )
    targets = TuningPlan.from_options(options).as_dict()
    assert not {"aslr", "smt", "cstates", "irq_steering", "thp_enabled", "thp_defrag"} & targets.keys()
    assert targets["swappiness"] == "60"
    assert targets["governor"] == "schedutil"
    assert targets["perf_event_paranoid"] == "2"
    assert TuningPlan.from_options(TuningOptions(enabled=False)).targets == ()


@pytest.mark.parametrize(
    "kwargs", [{"swappiness": 201}, {"perf_event_paranoid": -2}, {"thp": "sometimes"}, {"governor": "a b"}]
)
def test_options_validate(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TuningOptions(**kwargs)  # type: ignore[arg-type]


def _parse(args: list[str]) -> TuningOptions:
    seen: list[TuningOptions] = []

    @click.command()
    @tuning_options
    def cmd(**kwargs: object) -> None:
        seen.append(tuning_options_from(kwargs))
        assert not kwargs  # every tuning flag was consumed

    result = CliRunner().invoke(cmd, args)
    assert result.exit_code == 0, result.output
    return seen[0]


def test_click_flags_to_options() -> None:
    assert _parse([]) == TuningOptions()
    keeps = ["--aslr", "--nmi-watchdog", "--smt", "--turbo", "--numa-balancing", "--timer-migration", "--ksm"]
    values = [
        "--swappiness",
        "0",
        "--governor",
        "powersave",
        "--perf-event-paranoid",
        "-1",
        "--thp",
        "madvise",
    ]
    options = _parse([*keeps, "--cstates", "--no-irq-steering", *values])
    assert options.keep_aslr and options.keep_smt and options.keep_turbo and options.keep_cstates
    assert not options.irq_steering
    assert (options.swappiness, options.governor, options.perf_event_paranoid, options.thp) == (
        0,
        "powersave",
        -1,
        "madvise",
    )
    assert _parse(["--no-tuning"]).enabled is False


def test_click_flags_reject_out_of_range() -> None:
    @click.command()
    @tuning_options
    def cmd(**kwargs: object) -> None:
        pass

    assert CliRunner().invoke(cmd, ["--swappiness", "300"]).exit_code == 2
    assert CliRunner().invoke(cmd, ["--thp", "sometimes"]).exit_code == 2


def _fake_proc(root: Path, pid: int, comms: dict[int, str]) -> Path:
    """A recorded /proc/<pid>/task/*/comm listing under ``root`` (comm files end in a newline)."""
    for tid, comm in comms.items():
        task = root / str(pid) / "task" / str(tid)
        task.mkdir(parents=True)
        (task / "comm").write_text(comm + "\n")
    return root


def _record_pins(monkeypatch: pytest.MonkeyPatch) -> dict[int, set[int]]:
    pinned: dict[int, set[int]] = {}
    monkeypatch.setattr(os, "sched_setaffinity", lambda tid, cpus_: pinned.__setitem__(tid, set(cpus_)))
    return pinned


# A Firecracker process as `ls /proc/<pid>/task` + `cat comm` shows it: the main thread (the VMM's
# event loop), the API server, one thread per vCPU (Firecracker's vcpu.rs: format!("fc_vcpu {}", ...)).
FIRECRACKER_COMMS = {400: "firecracker", 401: "fc_api", 402: "fc_vmm", 403: "fc_vcpu 0", 404: "fc_vcpu 1"}
QEMU_COMMS = {500: "qemu-system-x86", 501: "qemu-system-x86", 502: "CPU 0/KVM", 503: "CPU 1/KVM"}


def test_firecracker_vcpus_each_get_their_own_benchmark_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = _fake_proc(tmp_path, 400, FIRECRACKER_COMMS)
    pinned = _record_pins(monkeypatch)
    assert cpus.pin_vcpu_threads(400, (2, 3, 5), cpus.firecracker_vcpu_index, proc_root=proc) == []
    assert pinned == {400: {5}, 401: {5}, 402: {5}, 403: {2}, 404: {3}}


def test_the_qemu_parser_pins_no_firecracker_vcpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect of issue 14: QEMU's names applied to Firecracker left every vCPU on the last core."""
    proc = _fake_proc(tmp_path, 400, FIRECRACKER_COMMS)
    pinned = _record_pins(monkeypatch)
    cpus.pin_vcpu_threads(400, (2, 3), cpus.qemu_vcpu_index, proc_root=proc)
    assert pinned == {tid: {3} for tid in FIRECRACKER_COMMS}


def test_qemu_vcpus_still_pinned_by_pin_qemu_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = _fake_proc(tmp_path, 500, QEMU_COMMS)
    pinned = _record_pins(monkeypatch)
    assert cpus.pin_qemu_threads(500, (1, 2, 3), proc_root=proc) == []
    assert pinned == {500: {3}, 501: {3}, 502: {1}, 503: {2}}


@pytest.mark.parametrize(
    ("comm", "qemu", "firecracker"),
    [
        ("CPU 0/KVM", 0, None),
        ("CPU 12/TCG", 12, None),
        ("fc_vcpu 0", None, 0),
        ("fc_vcpu 31", None, 31),
        ("fc_vmm", None, None),
        ("fc_api", None, None),
        ("fc_vcpu", None, None),  # no index
        ("fc_vcpu x", None, None),
        ("fc_vcpu 1 ", None, None),  # comm is stripped of its newline only: nothing else trails
        ("qemu-system-x86", None, None),
        ("CPU /KVM", None, None),
    ],
)
def test_vcpu_index_parsers(comm: str, qemu: int | None, firecracker: int | None) -> None:
    assert cpus.qemu_vcpu_index(comm) == qemu
    assert cpus.firecracker_vcpu_index(comm) == firecracker


def test_vcpus_beyond_the_benchmark_cpus_wrap_around(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    comms = {600: "firecracker", **{601 + i: f"fc_vcpu {i}" for i in range(5)}}
    proc = _fake_proc(tmp_path, 600, comms)
    pinned = _record_pins(monkeypatch)
    assert cpus.pin_vcpu_threads(600, (2, 3), cpus.firecracker_vcpu_index, proc_root=proc) == []
    assert pinned == {600: {3}, 601: {2}, 602: {3}, 603: {2}, 604: {3}, 605: {2}}


def test_a_process_without_threads_is_one_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pinned = _record_pins(monkeypatch)
    problems = cpus.pin_vcpu_threads(999, (2,), cpus.firecracker_vcpu_index, proc_root=tmp_path)
    assert problems == ["cannot list the threads of process 999"] and pinned == {}


def test_the_firecracker_backend_pins_by_firecracker_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend hands its own parser over (it used QEMU's, which pins no Firecracker vCPU)."""
    from bencher_runner.sandbox import firecracker_backend

    seen: list[object] = []

    def record(pid: int, benchmark: object, vcpu_index: object, **kwargs: object) -> list[str]:
        seen.append(vcpu_index)
        return []

    monkeypatch.setattr(firecracker_backend, "pin_vcpu_threads", record)
    firecracker_backend.FirecrackerBackend.pin(None, 400, (2, 3))  # type: ignore[arg-type]
    assert seen == [cpus.firecracker_vcpu_index]
