"""Host tuning on this machine (root): real /proc and /sys knobs changed inside `tuned_host` and put back,
also after a SIGKILLed runner; unwritable knobs skipped (fake tree); the host lock.

Every real value this module may touch is snapshotted first and written back after each test, whatever
the code under test did.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bencher_runner.host import tuning
from bencher_runner.host.cgroup import PARENT, job_cgroup, memory_max_bytes
from bencher_runner.host.tuning import (
    STATE_FILE,
    HostPaths,
    TuningOptions,
    TuningPlan,
    restore_leftover_tuning,
    tuned_host,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0, reason="host tuning needs root on Linux"
)

REAL_FILES = {
    "aslr": "/proc/sys/kernel/randomize_va_space",
    "nmi_watchdog": "/proc/sys/kernel/nmi_watchdog",
    "swappiness": "/proc/sys/vm/swappiness",
    "perf_event_paranoid": "/proc/sys/kernel/perf_event_paranoid",
    "numa_balancing": "/proc/sys/kernel/numa_balancing",
    "timer_migration": "/proc/sys/kernel/timer_migration",
    "soft_watchdog": "/proc/sys/kernel/soft_watchdog",
    "ksm": "/sys/kernel/mm/ksm/run",
    "thp_enabled": "/sys/kernel/mm/transparent_hugepage/enabled",
    "thp_defrag": "/sys/kernel/mm/transparent_hugepage/defrag",
}
# Knobs already at the runner's target are first set to this value so the test sees them change.
PRESET = {
    "numa_balancing": "1",
    "ksm": "1",
    "timer_migration": "1",
    "soft_watchdog": "1",
    "swappiness": "60",
    "aslr": "2",
}
TARGETS = TuningPlan.from_options(TuningOptions()).as_dict()
# A 2-CPU host can steer; the real IRQ files are snapshotted too.
IRQ_FILES = ["/proc/irq/default_smp_affinity", "/sys/devices/virtual/workqueue/cpumask"]

CHILD = """
import sys, time
from pathlib import Path
from bencher_runner.host.tuning import TuningOptions, tuned_host
state_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
with tuned_host(TuningOptions(), state_dir=state_dir, log=lambda line: print(line, flush=True)) as report:
    ready.write_text(report.status)
    time.sleep(120)
"""


def _value(knob: str, text: str) -> str:
    text = text.strip()
    return tuning._bracketed(text) if knob.startswith("thp_") else text


def _read(knob: str) -> str:
    return _value(knob, Path(REAL_FILES[knob]).read_text())


def _writable(path: str) -> bool:
    try:
        current = Path(path).read_text().strip()
        if "[" in current:
            current = tuning._bracketed(current)
        Path(path).write_text(current)
        return True
    except OSError:
        return False


def _irq_files() -> list[str]:
    return IRQ_FILES + sorted(str(p) for p in Path("/proc/irq").glob("[0-9]*/smp_affinity_list"))


@pytest.fixture
def real_host() -> Iterator[dict[str, str]]:
    """The writable real knobs (knob -> original value); everything is written back afterwards."""
    snapshot: dict[str, str] = {}
    for path in list(REAL_FILES.values()) + _irq_files():
        with contextlib.suppress(OSError):
            text = Path(path).read_text().strip()
            snapshot[path] = tuning._bracketed(text) if "transparent_hugepage" in path else text
    writable = {k: _read(k) for k, p in REAL_FILES.items() if p in snapshot and _writable(p)}
    try:
        yield writable
    finally:
        for path, value in snapshot.items():
            with contextlib.suppress(OSError):
                if Path(path).read_text().strip() != value:
                    Path(path).write_text(value)


def _preset(writable: dict[str, str]) -> dict[str, str]:
    """Move knobs that are already at the target away from it; returns the values the test starts with."""
    for knob, value in PRESET.items():
        if knob in writable and writable[knob] == TARGETS[knob]:
            with contextlib.suppress(OSError):
                Path(REAL_FILES[knob]).write_text(value)
    return {knob: _read(knob) for knob in writable}


def _expected_changes(start: dict[str, str]) -> dict[str, str]:
    return {k: TARGETS[k] for k, v in start.items() if v != TARGETS[k]}


def _irq_state() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in _irq_files():
        with contextlib.suppress(OSError):
            out[path] = Path(path).read_text().strip()
    return out


def test_real_knobs_changed_and_restored(real_host: dict[str, str], tmp_path: Path) -> None:
    start = _preset(real_host)
    expected = _expected_changes(start)
    assert expected, "no writable knob to test on this host"
    irq_before = _irq_state()
    lines: list[str] = []
    with tuned_host(TuningOptions(), state_dir=tmp_path, log=lines.append) as report:
        for knob, target in expected.items():
            assert _read(knob) == target, knob
        changed = {c.knob for c in report.changed}
        assert set(expected) <= changed
        state = json.loads((tmp_path / STATE_FILE).read_text())
        assert {e["knob"] for e in state["entries"]} >= set(expected)
        if Path("/dev/cpu_dma_latency").exists():
            assert "cstates" in changed
    assert {knob: _read(knob) for knob in start} == start
    assert _irq_state() == irq_before
    assert not (tmp_path / STATE_FILE).exists()
    assert report.status == "tuned" and not report.restore_problems
    json.dumps(report.to_dict())  # serialisable into result metadata
    # one line per skipped knob, none for changed ones
    for skip in report.skipped:
        assert sum(f"skipping {skip.knob}:" in line for line in lines) == 1


def test_no_tuning_touches_nothing(real_host: dict[str, str], tmp_path: Path) -> None:
    start = _preset(real_host)
    with tuned_host(TuningOptions(enabled=False), state_dir=tmp_path, log=print) as report:
        assert {knob: _read(knob) for knob in start} == start
    assert report.status == "disabled" and not report.changed


def _start_child(state_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    ready = tmp_path / f"ready-{len(list(tmp_path.glob('ready-*')))}"
    argv = [sys.executable, "-c", CHILD, str(state_dir), str(ready)]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert child.poll() is None, child.communicate()[0]
        assert time.monotonic() < deadline, "child did not tune in time"
        time.sleep(0.05)
    return child, ready


def test_sigkilled_runner_is_restored_by_restore_leftover(real_host: dict[str, str], tmp_path: Path) -> None:
    start = _preset(real_host)
    expected = _expected_changes(start)
    irq_before = _irq_state()
    state_dir = tmp_path / "state"
    child, _ = _start_child(state_dir, tmp_path)
    try:
        for knob, target in expected.items():
            assert _read(knob) == target, knob
        # While the runner lives its tuning is not "leftover".
        assert restore_leftover_tuning(state_dir, log=print) == []
        assert all(_read(k) == t for k, t in expected.items())
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    for knob, target in expected.items():
        assert _read(knob) == target, f"{knob} was restored without restore_leftover_tuning"
    assert (state_dir / STATE_FILE).exists()
    lines: list[str] = []
    restored = restore_leftover_tuning(state_dir, log=lines.append)
    assert {c.knob for c in restored} >= set(expected)
    assert {knob: _read(knob) for knob in start} == start
    assert _irq_state() == irq_before
    assert not (state_dir / STATE_FILE).exists()
    assert any("previous runner" in line for line in lines)
    assert restore_leftover_tuning(state_dir, log=lines.append) == []  # idempotent


def test_second_concurrent_runner_does_not_tune(real_host: dict[str, str], tmp_path: Path) -> None:
    start = _preset(real_host)
    expected = _expected_changes(start)
    state_dir = tmp_path / "state"
    child, _ = _start_child(state_dir, tmp_path)
    try:
        lines: list[str] = []
        with tuned_host(TuningOptions(), state_dir=state_dir, log=lines.append) as report:
            assert report.status == "untuned" and not report.changed
            assert "another runner" in (report.note or "")
        assert any("another runner holds" in line for line in lines)
        # the second runner's exit restored nothing: the first runner's tuning is still in place
        assert all(_read(k) == t for k, t in expected.items())
    finally:
        child.send_signal(signal.SIGTERM)  # default action: dies without restoring
        child.communicate()
    restore_leftover_tuning(state_dir, log=print)
    assert {knob: _read(knob) for knob in start} == start


def test_in_process_nested_runner_sees_lock(tmp_path: Path) -> None:
    fake = _fake_tree(tmp_path)
    with tuned_host(TuningOptions(), state_dir=tmp_path / "s", log=print, paths=fake) as first:
        with tuned_host(TuningOptions(), state_dir=tmp_path / "s", log=print, paths=fake) as second:
            assert second.status == "untuned"
        assert first.status == "tuned" and first.changed


# ---- fake tree: unwritable and missing knobs, per-CPU governor, turbo, IRQ steering ----------------


def _fake_tree(tmp_path: Path) -> HostPaths:
    proc, sysfs, dev = tmp_path / "proc", tmp_path / "sys", tmp_path / "dev"
    files = {
        proc / "sys/vm/swappiness": "60\n",
        proc / "sys/kernel/timer_migration": "1\n",
        proc / "irq/default_smp_affinity": "f\n",
        proc / "irq/5/smp_affinity_list": "0-3\n",
        proc / "irq/9/smp_affinity_list": "0\n",
        sysfs / "devices/system/cpu/online": "0-3\n",
        sysfs / "devices/system/cpu/cpufreq/boost": "1\n",
        sysfs / "devices/system/cpu/smt/control": "notsupported\n",
        sysfs / "kernel/mm/transparent_hugepage/enabled": "always [madvise] never\n",
    }
    for cpu in range(4):
        files[sysfs / f"devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor"] = (
            "performance\n" if cpu == 2 else "powersave\n"
        )
        files[sysfs / f"devices/system/cpu/cpu{cpu}/cpufreq/scaling_available_governors"] = (
            "performance powersave\n"
        )
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # An unwritable knob: root can write any regular file, so point it at a read-only procfs file.
    (proc / "sys/kernel").mkdir(parents=True, exist_ok=True)
    (proc / "sys/kernel/randomize_va_space").symlink_to("/proc/version")
    dev.mkdir()
    return HostPaths(proc=proc, sys=sysfs, dev=dev)


def test_unwritable_and_missing_knobs_are_skipped_with_one_line(tmp_path: Path) -> None:
    paths = _fake_tree(tmp_path)
    before = {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    lines: list[str] = []
    with tuned_host(TuningOptions(), state_dir=tmp_path / "state", log=lines.append, paths=paths) as report:
        skipped = {s.knob: s.reason for s in report.skipped}
        assert "cannot write '0' to" in skipped["aslr"] and "/proc/version" not in skipped["aslr"]
        assert "does not exist" in skipped["nmi_watchdog"]
        assert "does not exist" in skipped["ksm"]
        assert "notsupported" in skipped["smt"]
        assert "cpu_dma_latency" in skipped["cstates"]
        for knob in skipped:
            assert sum(f"skipping {knob}:" in line for line in lines) == 1, (knob, lines)
        changed = {(c.knob, Path(c.path).name, c.after) for c in report.changed}
        assert ("swappiness", "swappiness", "10") in changed
        assert ("turbo", "boost", "0") in changed
        assert ("thp_enabled", "enabled", "never") in changed
        governors = [c for c in report.changed if c.knob == "governor"]
        assert len(governors) == 3  # cpu2 already runs "performance"
        assert (paths.proc / "irq/5/smp_affinity_list").read_text() == "0"  # steered to housekeeping CPU 0
        assert (paths.proc / "irq/default_smp_affinity").read_text() == "1"
        assert not any(c.path.endswith("irq/9/smp_affinity_list") for c in report.changed)  # already on 0
    after = {p: p.read_text() for p in before}
    # restored: same values (the fake files lose their trailing newline and THP keeps only the token)
    assert {p: v.strip() for p, v in after.items()} == {
        p: (tuning._bracketed(v.strip()) if p.name == "enabled" else v.strip()) for p, v in before.items()
    }


def test_state_file_is_written_before_the_first_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _fake_tree(tmp_path)
    state = tmp_path / "state" / STATE_FILE
    real_write = tuning._write
    checked: list[str] = []

    def write(path: Path, value: str) -> None:
        doc = json.loads(state.read_text())
        entry = next(e for e in doc["entries"] if e["path"] == str(path))
        if value == entry["after"]:  # applying (not restoring): the original is already on disk
            checked.append(entry["before"])
        real_write(path, value)

    monkeypatch.setattr(tuning, "_write", write)
    with tuned_host(TuningOptions(), state_dir=tmp_path / "state", log=lambda _: None, paths=paths) as report:
        pass
    assert len(checked) >= len(report.changed)


def test_unwritable_state_dir_means_no_tuning(tmp_path: Path) -> None:
    paths = _fake_tree(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    lines: list[str] = []
    with tuned_host(TuningOptions(), state_dir=blocker / "state", log=lines.append, paths=paths) as report:
        assert report.status == "untuned" and not report.changed
    assert (paths.proc / "sys/vm/swappiness").read_text() == "60\n"
    assert len(lines) == 1


# ---- per-job cgroup ------------------------------------------------------------------------------------


def _v2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def test_job_cgroup_skips_without_v2(tmp_path: Path) -> None:
    lines: list[str] = []
    with job_cgroup("x", (1,), 512, log=lines.append, root=tmp_path) as group:
        assert group is None
    assert len(lines) == 1 and "no cgroup v2" in lines[0]


def test_job_cgroup_confines_and_kills_leftovers() -> None:
    root = _v2_mount()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    parent_existed = (root / PARENT).exists()
    lines: list[str] = []
    try:
        with job_cgroup("test-1", (0,), 256, log=lines.append, root=root) as group:
            assert group is not None
            sleeper = subprocess.Popen(["sleep", "60"])
            assert group.add(sleeper.pid)
            assert str(sleeper.pid) in (group.path / "cgroup.procs").read_text().split()
            active = (group.path / "cgroup.controllers").read_text().split()
            if "memory" in active:
                assert (group.path / "memory.max").read_text().strip() == str(memory_max_bytes(256))
                assert (group.path / "memory.swap.max").read_text().strip() == "0"
            else:
                assert any("unavailable" in line for line in lines)
        assert sleeper.wait(timeout=5) == -signal.SIGKILL  # cgroup.kill took the leftover
        assert not group.path.exists()
    finally:
        if not parent_existed:
            with contextlib.suppress(OSError):
                (root / PARENT).rmdir()
