"""md RAID arrays in the health probe: fake `/sys/block/md*/md/` trees for every sync action and
failing state, and a real RAID1 on two loop files where this machine allows it."""

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bencher_runner.host.health import HealthCache, HealthReport, pause_reasons, probe_health
from bencher_runner.host.health_md import read_arrays


def make_array(
    root: Path,
    name: str = "md0",
    *,
    level: str = "raid1",
    state: str = "clean",
    degraded: int | None = 0,
    raid_disks: int = 2,
    action: str | None = "idle",
    completed: str = "none",
    speed: str = "none",
) -> Path:
    """A fake `/sys/block/<name>/md/` under ``root``; None for a file means the level has none."""
    md = root / "sys/block" / name / "md"
    md.mkdir(parents=True)
    files = {
        "level": level,
        "array_state": state,
        "degraded": None if degraded is None else str(degraded),
        "raid_disks": str(raid_disks),
        "sync_action": action,
        "sync_completed": completed if action is not None else None,
        "sync_speed": speed if action is not None else None,
    }
    for file, value in files.items():
        if value is not None:
            (md / file).write_text(value + "\n")
    return md


def probe(root: Path) -> HealthReport:
    return probe_health(root, now=0.0, cache=HealthCache(), read_clock=lambda: True)


def raid_finding(report: HealthReport, name: str = "md0") -> tuple[str, bool, str]:
    finding = next(f for f in report.findings if f.device == name)
    assert finding.kind == "raid"
    return finding.state, finding.pause, finding.text


@pytest.mark.parametrize("action", ["resync", "recover", "check", "repair", "reshape"])
def test_every_sync_action_pauses(tmp_path: Path, action: str) -> None:
    make_array(tmp_path, action=action, completed="1024 / 4096", speed="2000")
    report = probe(tmp_path)
    state, pause, text = raid_finding(report)
    assert (state, pause) == ("warning", True)
    assert f"md0 (raid1, clean) runs a {action}, 25.0% (1024 / 4096 sectors) at 2000 KiB/s" in text
    assert "claiming is paused until it ends" in text and "mdadm --detail /dev/md0" in text
    assert report.paused and report.state == "warning"
    assert pause_reasons(report) == [
        {"kind": "raid", "array": "md0", "action": action, "done": 1024, "total": 4096, "speed": 2000}
    ]


def test_check_and_repair_say_how_to_stop_them(tmp_path: Path) -> None:
    make_array(tmp_path, "md0", action="check", completed="1 / 2")
    make_array(tmp_path, "md1", action="resync", completed="1 / 2")
    report = probe(tmp_path)
    assert "echo idle > /sys/block/md0/md/sync_action" in raid_finding(report, "md0")[2]
    assert "sync_action" not in raid_finding(report, "md1")[2]  # a resync is not stopped at will


def test_delayed_and_not_yet_started_syncs_pause_without_progress(tmp_path: Path) -> None:
    make_array(tmp_path, "md0", action="resync", completed="delayed")
    make_array(tmp_path, "md1", action="check", completed="none")  # requested, thread not yet running
    report = probe(tmp_path)
    assert raid_finding(report, "md0")[:2] == ("warning", True)
    assert "resync, delayed" in raid_finding(report, "md0")[2]
    assert raid_finding(report, "md1")[:2] == ("warning", True)
    assert pause_reasons(report) == [
        {"kind": "raid", "array": "md0", "action": "resync"},
        {"kind": "raid", "array": "md1", "action": "check"},
    ]


@pytest.mark.parametrize("state", ["read-auto", "readonly"])
def test_resync_pending_on_a_read_only_array_warns_but_does_not_pause(tmp_path: Path, state: str) -> None:
    make_array(tmp_path, state=state, action="resync", completed="none")
    report = probe(tmp_path)
    status, pause, text = raid_finding(report)
    assert (status, pause) == ("warning", False) and "pending" in text and "first write" in text
    assert not report.paused and pause_reasons(report) == []


def test_a_running_sync_on_a_read_auto_array_pauses(tmp_path: Path) -> None:
    make_array(tmp_path, state="read-auto", action="recover", completed="10 / 20")
    assert raid_finding(probe(tmp_path))[:2] == ("warning", True)


def test_degraded_array_is_failing_but_not_paused(tmp_path: Path) -> None:
    make_array(tmp_path, state="clean", degraded=1)
    report = probe(tmp_path)
    status, pause, text = raid_finding(report)
    assert (status, pause) == ("failing", False)
    assert text.startswith("md0 (raid1, clean) is degraded (1 of 2 disks missing or failed)")
    assert "replace the failed disk" in text
    assert report.state == "failing" and not report.paused and pause_reasons(report) == []


def test_degraded_array_that_rebuilds_is_failing_and_paused(tmp_path: Path) -> None:
    make_array(tmp_path, level="raid5", raid_disks=4, degraded=1, action="recover", completed="5 / 10")
    report = probe(tmp_path)
    status, pause, text = raid_finding(report)
    assert (status, pause) == ("failing", True)
    assert "degraded (1 of 4" in text and "runs a recover, 50.0%" in text
    assert pause_reasons(report) == [
        {"kind": "raid", "array": "md0", "action": "recover", "done": 5, "total": 10}
    ]


def test_broken_and_inactive_arrays(tmp_path: Path) -> None:
    make_array(tmp_path, "md0", level="raid0", state="broken", degraded=None, action=None)
    make_array(tmp_path, "md1", state="inactive")
    report = probe(tmp_path)
    assert raid_finding(report, "md0")[:2] == ("failing", False)
    assert "broken" in raid_finding(report, "md0")[2]
    assert raid_finding(report, "md1")[:2] == ("warning", False)
    assert "inactive" in raid_finding(report, "md1")[2]


def test_healthy_arrays_and_levels_without_sync(tmp_path: Path) -> None:
    make_array(tmp_path, "md0")
    make_array(tmp_path, "md1", level="raid0", degraded=None, action=None)
    make_array(tmp_path, "md2", action="frozen")
    make_array(tmp_path, "md3", state="clear")  # a node with no array: not listed
    (tmp_path / "sys/block/vda").mkdir()
    report = probe(tmp_path)
    assert [a.name for a in report.arrays] == ["md0", "md1", "md2"]
    assert [f.state for f in report.findings if f.kind == "raid"] == ["ok", "ok", "ok"]
    assert raid_finding(report, "md1")[2] == "md1 (raid0, clean): in sync"
    assert raid_finding(report, "md2")[2] == "md2 (raid1, clean): in sync, sync frozen"
    assert report.state == "ok" and not report.paused


def test_garbage_in_sysfs_files_does_not_crash(tmp_path: Path) -> None:
    make_array(tmp_path, degraded=None, action="check", completed="x / y", speed="fast")
    (tmp_path / "sys/block/md0/md/degraded").write_bytes(b"\xff\xfe\n")
    (array,) = read_arrays(tmp_path / "sys")
    assert (array.degraded, array.done, array.total, array.speed) == (0, None, None, None)
    assert array.syncing and array.progress == "progress unknown"


# --- a real RAID1 on two loop files -----------------------------------------------------------


def _real_md_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mdadm)"
    if not Path("/dev/loop-control").exists() or shutil.which("losetup") is None:
        return "no loop devices (/dev/loop-control or losetup missing)"
    if not Path("/proc/mdstat").exists():
        return "the kernel has no md driver (/proc/mdstat missing; md_mod not built in or loaded)"
    if shutil.which("mdadm") is None:
        return "mdadm is not installed (apt-get install mdadm)"
    return None


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        pytest.skip(f"{' '.join(argv)} failed here ({proc.returncode}): {proc.stderr.strip()[:200]}")
    return proc.stdout.strip()


@contextlib.contextmanager
def _loop_device(file: Path) -> Iterator[str]:
    device = _run("losetup", "--find", "--show", str(file))
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60, check=False)


def _free_md_name() -> str:
    for n in range(100, 128):
        if not Path(f"/sys/block/md{n}").exists() and not Path(f"/dev/md{n}").exists():
            return f"md{n}"
    pytest.skip("no free md device number in md100-md127")


@contextlib.contextmanager
def _raid1(tmp: Path) -> Iterator[str]:
    files = []
    for i in range(2):
        file = tmp / f"disk{i}.img"
        with file.open("wb") as f:
            f.truncate(64 * 1024 * 1024)
        files.append(file)
    name = _free_md_name()
    with _loop_device(files[0]) as a, _loop_device(files[1]) as b:
        _run(
            "mdadm", "--create", f"/dev/{name}", "--run", "--level=1", "--raid-devices=2",
            "--metadata=1.2", "--assume-clean", "--homehost=bencher-test", a, b,
        )  # fmt: skip
        try:
            yield name
        finally:
            subprocess.run(["mdadm", "--stop", f"/dev/{name}"], capture_output=True, timeout=60, check=False)
            for device in (a, b):
                subprocess.run(
                    ["mdadm", "--zero-superblock", device], capture_output=True, timeout=60, check=False
                )


def test_real_md_check_is_seen_and_pauses(tmp_path: Path) -> None:
    reason = _real_md_unavailable()
    if reason:
        pytest.skip(reason)
    with _raid1(tmp_path) as name:
        md = Path("/sys/block") / name / "md"
        report = probe(Path("/"))
        assert any(a.name == name and a.action == "idle" for a in report.arrays)
        assert not any(r["array"] == name for r in pause_reasons(report))
        # Slow the check to 1 KiB/s so it is still running when the probe looks, however loaded
        # the machine is (a 64 MiB check at the default speed ends in well under a second).
        (md / "sync_speed_min").write_text("1\n")
        (md / "sync_speed_max").write_text("1\n")
        (md / "sync_action").write_text("check\n")
        try:
            deadline = time.monotonic() + 30
            while (md / "sync_action").read_text().strip() != "check":
                assert time.monotonic() < deadline, "md never reported the check it was asked for"
                time.sleep(0.05)
            report = probe(Path("/"))
            array = next(a for a in report.arrays if a.name == name)
            assert array.action == "check" and array.syncing and report.paused
            (reason_doc,) = [r for r in pause_reasons(report) if r["array"] == name]
            assert reason_doc["kind"] == "raid" and reason_doc["action"] == "check"
        finally:
            (md / "sync_action").write_text("idle\n")
