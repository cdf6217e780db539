"""HostPreflight: the check before every `ready` that keeps a host from claiming jobs it cannot run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bencher_runner.daemon.preflight import HostPreflight
from bencher_runner.host.maintenance import drain, job_lock
from bencher_runner.spec.config import HostSettings
from tests.support.kernel import fake_bundle

TCG = HostSettings(accel="tcg")  # no KVM probe in unit tests


@pytest.fixture(autouse=True)
def no_kernel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCHER_RUNNER_KERNEL", raising=False)
    monkeypatch.delenv("BENCHER_RUNNER_KERNEL_MODULES", raising=False)


def test_an_empty_cache_is_not_fit_and_says_how_to_fix_it(tmp_path: Path) -> None:
    problem = HostPreflight(tmp_path, TCG)().problem
    assert problem is not None
    assert "no guest kernel bundle" in problem and "runner kernel fetch" in problem


def test_a_missing_kernel_is_fetched_once_then_the_host_is_fit(tmp_path: Path) -> None:
    fetched: list[Path] = []

    def fetch(cache: Path) -> None:
        fetched.append(cache)
        fake_bundle(cache)

    check = HostPreflight(tmp_path, TCG, fetch_kernel=fetch)
    assert check().problem is None
    assert check().problem is None
    assert fetched == [tmp_path]


def test_a_failing_fetch_is_reported_and_not_retried_at_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def fetch(cache: Path) -> None:
        from bencher_runner.spec.errors import KernelBundleError

        calls.append(1)
        raise KernelBundleError("`apt-get download linux-image-cloud-amd64` failed: no network")

    check = HostPreflight(tmp_path, TCG, fetch_kernel=fetch)
    problem = check().problem
    assert problem is not None and "apt-get download" in problem
    assert "no guest kernel bundle" in (check().problem or "")
    assert calls == [1]


def test_no_kernel_fetch_when_the_user_names_a_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENCHER_RUNNER_KERNEL", str(tmp_path / "missing-vmlinux"))
    check = HostPreflight(tmp_path, TCG, fetch_kernel=lambda cache: pytest.fail("fetched"))
    problem = check().problem
    assert problem is not None and "missing-vmlinux" in problem


def test_too_little_free_space_is_not_fit(tmp_path: Path) -> None:
    fake_bundle(tmp_path)
    problem = HostPreflight(tmp_path, TCG, min_free_bytes=1 << 62)().problem
    assert problem is not None and "MiB are free" in problem and "--cache-dir" in problem


def test_an_unwritable_work_dir_is_not_fit(tmp_path: Path) -> None:
    fake_bundle(tmp_path)
    (tmp_path / "work").write_text("a file where the work dir should be")
    problem = HostPreflight(tmp_path, TCG)().problem
    assert problem is not None and "not writable" in problem


def test_a_missing_vmm_is_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_bundle(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("BENCHER_RUNNER_QEMU", raising=False)
    problem = HostPreflight(tmp_path, TCG)().problem
    assert problem is not None and "qemu-system-x86_64" in problem
    assert os.environ["PATH"] == str(tmp_path)


def test_a_fit_host(tmp_path: Path) -> None:
    fake_bundle(tmp_path)
    verdict = HostPreflight(tmp_path, TCG, run_dir=tmp_path / "run")()
    assert verdict.problem is None and verdict.pause == () and verdict.health is not None


def test_a_drained_host_is_paused_not_failing(tmp_path: Path) -> None:
    fake_bundle(tmp_path)
    run = tmp_path / "run"
    drain(run, "kernel-update")
    verdict = HostPreflight(tmp_path, TCG, run_dir=run)()
    assert verdict.problem is None
    assert verdict.pause and "maintenance.kernel-update" in verdict.pause[0]
    assert verdict.reasons == ({"kind": "maintenance", "marker": True, "lock": False},)


def test_a_local_job_holding_the_job_lock_pauses(tmp_path: Path) -> None:
    fake_bundle(tmp_path)
    run = tmp_path / "run"
    hold = (
        "import pathlib, time\nfrom bencher_runner.host.maintenance import job_lock\n"
        f"with job_lock(pathlib.Path({str(run)!r})):\n    print('held', flush=True)\n    time.sleep(60)"
    )
    local = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert local.stdout is not None and local.stdout.readline() == "held\n"
        verdict = HostPreflight(tmp_path, TCG, run_dir=run)()
    finally:
        local.kill()
        local.wait()
    assert verdict.problem is None and verdict.reasons == (
        {"kind": "maintenance", "marker": False, "lock": True},
    )
    assert f"pid {local.pid}" in verdict.pause[0]
    assert HostPreflight(tmp_path, TCG, run_dir=run)().pause == ()


def test_the_daemons_own_spare_disk_refill_does_not_pause_it(tmp_path: Path) -> None:
    fake_bundle(tmp_path)
    run = tmp_path / "run"
    with job_lock(run):  # held by this process while idle: its refill, which the next job stops
        verdict = HostPreflight(tmp_path, TCG, run_dir=run)()
    assert verdict.problem is None and verdict.pause == ()


def test_a_health_pause_pauses_and_a_failing_disk_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bencher_runner.host.health import Finding, HealthReport

    fake_bundle(tmp_path)
    throttling = Finding("cpu", "thermal", "warning", "CPU 3 is throttling", "check the cooling", pause=True)
    failing = Finding("nvme0", "nvme", "failing", "media errors: 12", "replace the drive")
    check = HostPreflight(
        tmp_path,
        TCG,
        run_dir=tmp_path / "run",
        health_probe=lambda: HealthReport((throttling, failing), (), ()),
    )
    verdict = check()
    assert verdict.problem is None and len(verdict.pause) == 1 and "throttling" in verdict.pause[0]
    assert verdict.reasons == ()  # no upstream reason kind for throttling
    assert verdict.health is not None and verdict.health["state"] == "failing"
    check()
    assert caplog.text.count("media errors: 12") == 1


def test_a_broken_health_probe_does_not_stop_a_fit_host(tmp_path: Path) -> None:
    fake_bundle(tmp_path)

    def broken() -> "object":
        raise RuntimeError("boom")

    check = HostPreflight(tmp_path, TCG, run_dir=tmp_path / "run", health_probe=broken)  # type: ignore[arg-type]
    verdict = check()
    assert verdict.problem is None and verdict.pause == ()


def test_a_host_that_cannot_jail_the_vmm_claims_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bencher_runner.sandbox import jail

    fake_bundle(tmp_path)
    monkeypatch.setattr(jail, "jail_problem", lambda euid=None: "the VM jail needs bwrap: install it")
    assert "needs bwrap" in (HostPreflight(tmp_path, TCG, run_dir=tmp_path / "run")().problem or "")
    unjailed = HostSettings(accel="tcg", danger_no_jail=True)
    assert HostPreflight(tmp_path, unjailed, run_dir=tmp_path / "run")().problem is None


def test_runner_up_kernel_is_the_one_checked_and_never_replaced_by_a_fetch(tmp_path: Path) -> None:
    """`runner up --kernel PATH`: the preflight checks that kernel; a missing one is an unfit host
    (naming it), not a reason to fetch the cloud kernel."""
    fetched: list[Path] = []
    missing = tmp_path / "no-such-vmlinux"
    check = HostPreflight(tmp_path, HostSettings(accel="tcg", kernel=missing), fetch_kernel=fetched.append)
    problem = check().problem
    assert problem is not None and str(missing) in problem
    assert fetched == []
