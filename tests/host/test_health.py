"""The host health probe on fake `/sys` and `/dev` trees: NVMe SMART logs (recorded 512-byte pages
built per the NVMe spec layout), thermal throttling, clock sync, the hourly SMART cache, and the exact
JSON of upstream's `health` object and `paused` reasons."""

import errno
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bencher_runner.doctor.checks import DoctorEnv, can_run_jobs, check_health, run_checks
from bencher_runner.host.health import (
    HealthCache,
    HealthReport,
    health_json,
    new_problems,
    pause_reasons,
    probe_health,
)
from bencher_runner.host.health_clock import clock_synchronised
from bencher_runner.host.health_nvme import (
    NVME_IOCTL_ADMIN_CMD,
    SmartLog,
    SmartLogError,
    read_smart_log_ioctl,
)
from tests.host.test_health_md import make_array


def smart_page(
    *,
    warning: int = 0,
    kelvin: int = 308,
    spare: int = 100,
    threshold: int = 10,
    used: int = 3,
    media_errors: int = 0,
) -> bytes:
    """A SMART / Health Information log page, byte by byte as the NVMe base spec lays it out."""
    page = bytearray(range(256)) * 2  # noise everywhere the probe must not look
    page[0] = warning
    page[1:3] = kelvin.to_bytes(2, "little")
    page[3], page[4], page[5] = spare, threshold, used
    page[160:176] = media_errors.to_bytes(16, "little")
    return bytes(page)


def make_nvme(
    root: Path, name: str = "nvme0", model: str | None = "ACME NVMe 1TB", serial: str | None = "S123"
) -> None:
    ctrl = root / "sys/class/nvme" / name
    ctrl.mkdir(parents=True)
    if model is not None:
        (ctrl / "model").write_text(model.ljust(40) + "\n")  # sysfs pads the identify strings
    if serial is not None:
        (ctrl / "serial").write_text(serial.ljust(20) + "\n")


def make_throttle(root: Path, counts: dict[int, tuple[int, int]]) -> None:
    for cpu, (core, package) in counts.items():
        tt = root / f"sys/devices/system/cpu/cpu{cpu}/thermal_throttle"
        tt.mkdir(parents=True, exist_ok=True)
        (tt / "core_throttle_count").write_text(f"{core}\n")
        (tt / "package_throttle_count").write_text(f"{package}\n")


class Reader:
    """An injectable SMART reader that records which devices it was asked for."""

    def __init__(self, pages: dict[str, bytes | Exception]) -> None:
        self.pages = pages
        self.calls: list[Path] = []

    def __call__(self, device: Path) -> bytes:
        self.calls.append(device)
        page = self.pages[device.name]
        if isinstance(page, Exception):
            raise page
        return page


def probe(
    root: Path,
    reader: Callable[[Path], bytes] | None = None,
    *,
    now: float = 0.0,
    cache: HealthCache | None = None,
    synced: bool = True,
) -> HealthReport:
    return probe_health(
        root,
        now=now,
        cache=cache if cache is not None else HealthCache(),
        read_smart=reader or Reader({}),
        read_clock=lambda: synced,
    )


def finding(report: HealthReport, device: str) -> tuple[str, bool, str]:
    f = next(f for f in report.findings if f.device == device)
    return f.state, f.pause, f.text


# --- a host with nothing to report ----------------------------------------------------------------


def test_host_without_md_nvme_or_counters_is_ok_and_not_paused(tmp_path: Path) -> None:
    reader = Reader({})
    report = probe(tmp_path, reader)
    assert report.state == "ok" and not report.paused and report.problems == ()
    assert [(f.device, f.kind, f.state) for f in report.findings] == [
        ("cpu", "thermal", "ok"),
        ("clock", "clock", "ok"),
    ]
    assert health_json(report) == {"state": "ok"}
    assert pause_reasons(report) == []
    assert reader.calls == []


# --- NVMe -----------------------------------------------------------------------------------------


def test_smart_page_parse_reads_the_spec_offsets() -> None:
    log = SmartLog.parse(
        smart_page(warning=0x0C, kelvin=351, spare=7, threshold=10, used=104, media_errors=2**70 + 5)
    )
    assert (log.critical_warning, log.temperature, log.available_spare) == (0x0C, 351, 7)
    assert (log.available_spare_threshold, log.percentage_used, log.media_errors) == (10, 104, 2**70 + 5)
    assert log.celsius == 78
    with pytest.raises(SmartLogError, match="511 bytes, expected 512"):
        SmartLog.parse(bytes(511))


def test_healthy_nvme_is_ok_and_its_log_goes_into_health_json(tmp_path: Path) -> None:
    make_nvme(tmp_path)
    reader = Reader({"nvme0": smart_page()})
    report = probe(tmp_path, reader)
    assert reader.calls == [tmp_path / "dev/nvme0"]
    state, pause, text = finding(report, "nvme0")
    assert (state, pause) == ("ok", False)
    assert text == "nvme0 (ACME NVMe 1TB, serial S123): healthy (35 °C, spare 100%, 3% used, no media errors)"
    assert health_json(report) == {
        "state": "ok",
        "nvme": [
            {
                "name": "nvme0",
                "model": "ACME NVMe 1TB",
                "serial": "S123",
                "log": {
                    "critical_warning": 0,
                    "temperature": 308,
                    "available_spare": 100,
                    "available_spare_threshold": 10,
                    "percentage_used": 3,
                    "media_errors": 0,
                },
            }
        ],
    }


@pytest.mark.parametrize(
    ("bit", "words"),
    [
        (0x01, "available spare below threshold"),
        (0x04, "reliability degraded"),
        (0x08, "read-only mode"),
        (0x10, "volatile memory backup failed"),
        (0x20, "persistent memory region read-only"),
    ],
)
def test_critical_warning_bits_are_failing_not_paused(tmp_path: Path, bit: int, words: str) -> None:
    make_nvme(tmp_path)
    report = probe(tmp_path, Reader({"nvme0": smart_page(warning=bit)}))
    state, pause, text = finding(report, "nvme0")
    assert (state, pause) == ("failing", False)
    assert text.startswith("nvme0 (ACME NVMe 1TB, serial S123) is failing: ") and words in text
    assert "replace the drive" in text and "nvme smart-log /dev/nvme0" in text
    assert report.state == "failing" and not report.paused and pause_reasons(report) == []
    doc = health_json(report)
    assert doc["findings"] == [{"device": "nvme0", "kind": "nvme", "state": "failing"}]


@pytest.mark.parametrize(
    ("page", "state", "words"),
    [
        (smart_page(spare=4, threshold=10), "failing", "available spare 4% below its threshold 10%"),
        (smart_page(media_errors=3), "failing", "3 media and data integrity errors"),
        (smart_page(warning=0x02, kelvin=358), "warning", "temperature 85 °C is outside its thresholds"),
        (smart_page(used=100), "warning", "rated endurance used up (100% used)"),
        (smart_page(used=99, spare=10, threshold=10), "ok", "healthy"),
    ],
)
def test_spare_media_errors_temperature_and_wear(tmp_path: Path, page: bytes, state: str, words: str) -> None:
    make_nvme(tmp_path, model=None, serial=None)
    report = probe(tmp_path, Reader({"nvme0": page}))
    got, pause, text = finding(report, "nvme0")
    assert (got, pause) == (state, False)
    assert text.startswith("nvme0") and words in text
    if state == "warning":
        assert "; " in text  # and says what to do


def test_huge_media_error_count_is_clamped_to_u64_on_the_wire(tmp_path: Path) -> None:
    make_nvme(tmp_path)
    report = probe(tmp_path, Reader({"nvme0": smart_page(media_errors=2**100)}))
    doc = health_json(report)
    assert doc["nvme"][0]["log"]["media_errors"] == 2**64 - 1  # type: ignore[index]
    assert str(2**100) in finding(report, "nvme0")[2]


@pytest.mark.parametrize(
    "error",
    [
        SmartLogError("Get Log Page on /dev/nvme0 failed: Operation not permitted; run the runner as root"),
        PermissionError(errno.EACCES, "Permission denied"),
    ],
)
def test_unreadable_smart_log_is_a_warning_naming_why(tmp_path: Path, error: Exception) -> None:
    make_nvme(tmp_path)
    report = probe(tmp_path, Reader({"nvme0": error}))
    state, pause, text = finding(report, "nvme0")
    assert (state, pause) == ("warning", False)
    assert text.startswith("nvme0 (ACME NVMe 1TB, serial S123): SMART log unreadable: ")
    assert ("run the runner as root" in text) if isinstance(error, SmartLogError) else ("denied" in text)
    assert health_json(report)["nvme"] == [{"name": "nvme0", "model": "ACME NVMe 1TB", "serial": "S123"}]


def test_smart_log_is_read_at_most_hourly_per_controller(tmp_path: Path) -> None:
    make_nvme(tmp_path)
    reader = Reader({"nvme0": smart_page(), "nvme1": PermissionError(errno.EPERM, "Operation not permitted")})
    cache = HealthCache()
    probe(tmp_path, reader, now=1000.0, cache=cache)
    probe(tmp_path, reader, now=1000.0 + 3599, cache=cache)
    assert [p.name for p in reader.calls] == ["nvme0"]
    make_nvme(tmp_path, "nvme1")  # a new controller is read at once; the failed read is cached too
    probe(tmp_path, reader, now=2000.0, cache=cache)
    probe(tmp_path, reader, now=2500.0, cache=cache)
    assert [p.name for p in reader.calls] == ["nvme0", "nvme1"]
    reader.pages["nvme0"] = smart_page(media_errors=1)
    report = probe(tmp_path, reader, now=1000.0 + 3600, cache=cache)
    assert [p.name for p in reader.calls] == ["nvme0", "nvme1", "nvme0"]
    assert finding(report, "nvme0")[0] == "failing"
    probe(tmp_path, reader, now=10.0, cache=cache)  # the clock went back: read again
    assert [p.name for p in reader.calls][-2:] == ["nvme0", "nvme1"]


def test_without_a_cache_every_probe_reads_the_log(tmp_path: Path) -> None:
    make_nvme(tmp_path)
    reader = Reader({"nvme0": smart_page()})
    for _ in range(3):
        probe_health(tmp_path, now=0.0, cache=None, read_smart=reader, read_clock=lambda: True)
    assert len(reader.calls) == 3


def test_controllers_are_listed_by_number_and_only_controllers(tmp_path: Path) -> None:
    for name in ("nvme10", "nvme2", "nvme-subsys0"):
        make_nvme(tmp_path, name)
    pages: dict[str, bytes | Exception] = {"nvme2": smart_page(), "nvme10": smart_page()}
    report = probe(tmp_path, Reader(pages))
    assert [r.controller.name for r in report.nvme] == ["nvme2", "nvme10"]


def test_ioctl_reader_refuses_what_is_not_an_nvme_controller(tmp_path: Path) -> None:
    assert NVME_IOCTL_ADMIN_CMD == 0xC0484E41  # _IOWR('N', 0x41, struct nvme_passthru_cmd), as in nvme-cli
    plain = tmp_path / "nvme0"
    plain.write_bytes(b"")
    with pytest.raises(SmartLogError, match=r"Get Log Page on .*nvme0 failed: .*not an NVMe controller"):
        read_smart_log_ioctl(plain)
    with pytest.raises(SmartLogError, match=r"cannot open .*missing: No such file"):
        read_smart_log_ioctl(tmp_path / "missing")


def test_ioctl_reader_failure_is_a_finding_on_a_fake_dev_tree(tmp_path: Path) -> None:
    make_nvme(tmp_path)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/nvme0").write_bytes(b"")  # a plain file where the character device would be
    report = probe_health(tmp_path, now=0.0, cache=None, read_clock=lambda: True)
    state, _, text = finding(report, "nvme0")
    assert state == "warning" and "SMART log unreadable" in text and "not an NVMe controller" in text


# --- thermal throttling ---------------------------------------------------------------------------


def test_throttle_counters_rising_pause_until_they_stop(tmp_path: Path) -> None:
    make_throttle(tmp_path, {0: (5, 9), 1: (0, 9), 2: (0, 9), 3: (0, 9)})
    cache = HealthCache()
    first = probe(tmp_path, cache=cache)
    assert finding(first, "cpu") == ("ok", False, "CPU thermal throttle events since boot: 41")
    assert not first.paused  # no baseline yet: since-boot counts are history
    make_throttle(tmp_path, {0: (8, 11), 1: (0, 11), 2: (0, 11), 3: (1, 11)})
    hot = probe(tmp_path, cache=cache)
    state, pause, text = finding(hot, "cpu")
    assert (state, pause) == ("warning", True) and hot.paused
    assert text.startswith(
        "CPUs 0-3 are thermally throttled (core +4, package +8 events since the last probe)"
    )
    assert "check the host's cooling" in text
    assert pause_reasons(hot) == []  # no upstream reason kind for it: the daemon just withholds `ready`
    assert health_json(hot)["findings"] == [{"device": "cpu", "kind": "thermal", "state": "warning"}]
    cooled = probe(tmp_path, cache=cache)
    assert finding(cooled, "cpu")[:2] == ("ok", False) and not cooled.paused


def test_only_rising_cpus_are_named_and_new_counters_are_not_a_rise(tmp_path: Path) -> None:
    make_throttle(tmp_path, {0: (1, 1), 1: (1, 1)})
    cache = HealthCache()
    probe(tmp_path, cache=cache)
    make_throttle(tmp_path, {0: (1, 1), 1: (2, 1), 5: (100, 100)})
    state, _, text = finding(probe(tmp_path, cache=cache), "cpu")
    assert state == "warning" and text.startswith("CPUs 1 are thermally throttled (core +1 events")


def test_without_a_cache_throttling_cannot_pause(tmp_path: Path) -> None:
    make_throttle(tmp_path, {0: (1, 1)})
    probe_health(tmp_path, now=0.0, cache=None, read_clock=lambda: True)
    make_throttle(tmp_path, {0: (9, 9)})
    report = probe_health(tmp_path, now=1.0, cache=None, read_clock=lambda: True)
    assert not report.paused


# --- clock ----------------------------------------------------------------------------------------


def test_unsynchronised_clock_is_a_warning_not_a_pause(tmp_path: Path) -> None:
    report = probe(tmp_path, synced=False)
    state, pause, text = finding(report, "clock")
    assert (state, pause) == ("warning", False) and not report.paused
    assert "not synchronised" in text and "chrony" in text
    assert health_json(report) == {
        "state": "warning",
        "findings": [{"device": "clock", "kind": "clock", "state": "warning"}],
    }


def test_unreadable_clock_state_is_a_warning(tmp_path: Path) -> None:
    def broken() -> bool:
        raise OSError(errno.EPERM, "adjtimex: Operation not permitted")

    report = probe_health(tmp_path, now=0.0, cache=None, read_clock=broken)
    state, _, text = finding(report, "clock")
    assert state == "warning" and "cannot read the clock's sync state" in text and "not permitted" in text


def test_the_real_adjtimex_reader_answers() -> None:
    assert isinstance(clock_synchronised(), bool)  # its value depends on this host's NTP


# --- the wire shapes ------------------------------------------------------------------------------


def test_health_json_and_pause_reasons_of_a_mixed_host_exactly(tmp_path: Path) -> None:
    make_array(tmp_path, "md0", degraded=1, action="recover", completed="100 / 400", speed="512")
    make_array(tmp_path, "md1")
    make_nvme(tmp_path)
    report = probe(tmp_path, Reader({"nvme0": smart_page(warning=0x02, kelvin=350)}), synced=False)
    assert report.state == "failing" and report.paused
    assert json.dumps(health_json(report), sort_keys=True) == json.dumps(
        {
            "state": "failing",
            "findings": [
                {"device": "md0", "kind": "raid", "state": "failing"},
                {"device": "nvme0", "kind": "nvme", "state": "warning"},
                {"device": "clock", "kind": "clock", "state": "warning"},
            ],
            "arrays": [
                {"name": "md0", "array_state": "clean", "degraded": 1, "action": "recover"},
                {"name": "md1", "array_state": "clean", "degraded": 0, "action": "idle"},
            ],
            "nvme": [
                {
                    "name": "nvme0",
                    "model": "ACME NVMe 1TB",
                    "serial": "S123",
                    "log": {
                        "critical_warning": 2,
                        "temperature": 350,
                        "available_spare": 100,
                        "available_spare_threshold": 10,
                        "percentage_used": 3,
                        "media_errors": 0,
                    },
                }
            ],
        },
        sort_keys=True,
    )
    assert pause_reasons(report) == [
        {"kind": "raid", "array": "md0", "action": "recover", "done": 100, "total": 400, "speed": 512}
    ]


def test_lists_are_capped_at_64_strings_at_64_bytes_reasons_at_16(tmp_path: Path) -> None:
    for n in range(70):
        make_array(tmp_path, f"md{n:03d}", action="check", completed="1 / 2", degraded=2**40)
    make_nvme(tmp_path, model="Ü" * 40, serial="x" * 100)  # 80 bytes of UTF-8, 100 bytes
    report = probe(tmp_path, Reader({"nvme0": smart_page()}))
    doc = health_json(report)
    arrays, findings = doc["arrays"], doc["findings"]
    assert isinstance(arrays, list) and isinstance(findings, list)
    assert len(arrays) == 64 and len(findings) == 64
    assert arrays[0] == {"name": "md000", "array_state": "clean", "degraded": 2**32 - 1, "action": "check"}
    nvme_list = doc["nvme"]
    assert isinstance(nvme_list, list) and len(nvme_list) == 1
    nvme = nvme_list[0]
    assert nvme["model"] == "Ü" * 32 and nvme["serial"] == "x" * 64
    assert all(len(s.encode()) <= 64 for s in (nvme["model"], nvme["serial"]))
    reasons = pause_reasons(report)
    assert len(reasons) == 16 and reasons[0]["array"] == "md000" and reasons[15]["array"] == "md015"


def test_new_problems_are_those_not_seen_in_the_previous_report(tmp_path: Path) -> None:
    make_nvme(tmp_path)
    reader = Reader({"nvme0": smart_page()})
    ok = probe(tmp_path, reader, synced=False)
    assert [f.device for f in new_problems(None, ok)] == ["clock"]
    assert new_problems(ok, ok) == []
    reader.pages["nvme0"] = smart_page(warning=0x02)
    warm = probe(tmp_path, reader, synced=False)
    assert [(f.device, f.state) for f in new_problems(ok, warm)] == [("nvme0", "warning")]
    reader.pages["nvme0"] = smart_page(warning=0x06)
    worse = probe(tmp_path, reader, synced=False)
    assert [(f.device, f.state) for f in new_problems(warm, worse)] == [("nvme0", "failing")]


# --- runner doctor --------------------------------------------------------------------------------


def _doctor_env(tmp_path: Path, report: HealthReport) -> DoctorEnv:
    return DoctorEnv(cache=tmp_path / "cache", kvm_probe=lambda q, k: None, health=lambda: report)


def test_doctor_shows_a_row_per_device_with_status_and_fix(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_array(root, "md0", degraded=1)
    make_array(root, "md1", action="check", completed="1 / 4", speed="100")
    make_array(root, "md2")
    make_nvme(root, "nvme0")
    make_nvme(root, "nvme1")
    make_throttle(root, {0: (0, 0)})
    reader = Reader({"nvme0": smart_page(media_errors=7), "nvme1": smart_page()})
    report = probe(root, reader, synced=False)
    rows = {c.name: c for c in check_health(_doctor_env(tmp_path, report))}
    assert list(rows) == [
        "health: md0", "health: md1", "health: md2", "health: nvme0", "health: nvme1",
        "health: thermal", "health: clock",
    ]  # fmt: skip
    assert (rows["health: md0"].status, rows["health: md0"].fix) == (
        "fail",
        "replace the failed disk; see mdadm --detail /dev/md0",
    )
    assert rows["health: md1"].status == "warn" and "claiming is paused" in rows["health: md1"].detail
    assert rows["health: md1"].fix == "wait, or stop it: echo idle > /sys/block/md1/md/sync_action; " + (
        "see mdadm --detail /dev/md1"
    )
    assert (rows["health: md2"].status, rows["health: md2"].fix) == ("ok", None)
    assert rows["health: nvme0"].status == "fail" and "7 media and data integrity errors" in (
        rows["health: nvme0"].detail
    )
    assert rows["health: nvme0"].fix and "replace the drive" in rows["health: nvme0"].fix
    assert rows["health: nvme1"].status == "ok"
    assert rows["health: thermal"].status == "ok"
    assert rows["health: clock"].status == "warn" and rows["health: clock"].fix
    assert all(c.fix for c in rows.values() if c.status != "ok")


def test_doctor_runs_the_health_rows_and_a_failing_disk_fails_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_array(root, "md0")
    healthy = _doctor_env(tmp_path, probe(root))
    names = [c.name for c in run_checks(healthy)]
    assert "health: md0" in names and "health: clock" in names
    make_array(root, "md9", degraded=2)
    failing = run_checks(_doctor_env(tmp_path, probe(root)))
    assert all(c.status != "fail" for c in run_checks(healthy) if c.name.startswith("health:"))
    assert next(c for c in failing if c.name == "health: md9").status == "fail"
    assert not can_run_jobs(failing)


def test_doctor_default_probe_reads_this_host() -> None:
    rows = check_health(DoctorEnv(cache=Path("/nonexistent")))
    assert [c.name for c in rows][-2:] == ["health: thermal", "health: clock"]
    assert all(c.status in ("ok", "warn", "fail") for c in rows)


def test_a_probe_of_this_host_spawns_no_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe runs before every `ready`: file reads and syscalls only (ctypes.util.find_library
    ran ldconfig on every clock read, 2 ms a probe)."""
    clock_synchronised()  # a first call may set up the libc handle

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the probe started a process: {args!r}")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    monkeypatch.setattr(os, "posix_spawn", no_process)
    monkeypatch.setattr(os, "fork", no_process)
    cache = HealthCache()
    for now in (0.0, 1.0):
        probe_health(Path("/"), now=now, cache=cache)
