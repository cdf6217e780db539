"""Can a job run on this host right now? Checked before every `ready`, so no job is claimed to be burned.

A job the server hands us is gone for good if it fails here (Bencher does not retry failed jobs), so
the daemon asks for one only when everything a VM job needs is in place: the guest kernel bundle (a
missing one is fetched, as `runner kernel fetch` does, unless BENCHER_RUNNER_KERNEL names one), the
guest agent, the VMM binary, a writable work directory with free space, and the accelerator decided
(the KVM probe runs once and is cached). Each check is cheap after the first (file lookups, a
statvfs); the verdict is one line naming what is missing and the fix.
"""

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bencher_runner.host.health import (
    HealthCache,
    HealthReport,
    health_json,
    new_problems,
    pause_reasons,
    probe_health,
)
from bencher_runner.host.maintenance import job_lock_holder, markers
from bencher_runner.host.maintenance import run_dir as default_run_dir
from bencher_runner.paths import work_root
from bencher_runner.protocol import HostChecked, Message
from bencher_runner.spec.config import HostSettings
from bencher_runner.spec.errors import RunnerError
from bencher_runner.spec.units import MIB

log = logging.getLogger("bencher_runner.daemon")

MIN_FREE_BYTES = 1024 * MIB  # below this in the work dir's filesystem, no job's root disk fits
FETCH_RETRY_S = 600.0  # a failed kernel fetch is tried again after this


class HostPreflight:
    """`HostPreflight(cache, options)()`: whether a job can run (else why not) and whether one should
    now (else why not: drained, a local job); thread-safe."""

    def __init__(
        self,
        cache: Path,
        options: HostSettings,
        *,
        fetch_kernel: Callable[[Path], object] | None = None,
        min_free_bytes: int = MIN_FREE_BYTES,
        run_dir: Path | None = None,
        health_probe: Callable[[], HealthReport] | None = None,
    ) -> None:
        self.cache = cache
        self.run_dir = run_dir or default_run_dir()
        self._health_cache = HealthCache()
        self.health_probe = health_probe or (
            lambda: probe_health(now=time.monotonic(), cache=self._health_cache)
        )
        self._last_health: HealthReport | None = None
        self._health_broken = False
        self.options = options
        self.fetch_kernel = fetch_kernel
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self._fetch_tried_at: float | None = None
        self._accel_done = False

    def __call__(self) -> HostChecked:
        with self._lock:
            try:
                self._check()
            except RunnerError as err:
                return HostChecked(str(err))
            except OSError as err:
                return HostChecked(f"the host check failed: {err}")
            return self._pause()

    def _pause(self) -> HostChecked:
        """Fit, but should it take a job now? Not while drained, while a local job holds the host, or
        while its health says a measurement would be noise (a RAID sync, CPU throttling)."""
        directory = self.run_dir
        drained = markers(directory)
        holder = job_lock_holder(directory)
        if holder == f"pid {os.getpid()}":  # idle, this daemon holds it only to copy spare disks
            holder = None  # (sparedisk.py), which the next job stops before it starts
        pause: list[str] = []
        reasons: list[Message] = []
        if drained:
            names = ", ".join(f"maintenance.{n}" if n else "maintenance" for n in drained)
            pause.append(f"drained by {names} in {directory} (`runner undrain` resumes)")
        if holder is not None:
            pause.append(f"a local job ({holder}) holds the host's job lock")
        if pause:
            reasons.append({"kind": "maintenance", "marker": bool(drained), "lock": holder is not None})
        report = self._health()
        health: Message | None = None
        if report is not None:
            pause += [finding.text for finding in report.pauses]
            reasons += pause_reasons(report)
            health = health_json(report)
        return HostChecked(None, tuple(pause), tuple(reasons), health)

    def _health(self) -> HealthReport | None:
        """The health probe (host/health.py); its new problems are logged once, a failing disk as an
        error. A probe that breaks is logged and ignored: it must not keep a fit host from working."""
        try:
            report = self.health_probe()
        except Exception as err:
            if not self._health_broken:
                log.error("the host health probe failed: %s: %s", type(err).__name__, err)
            self._health_broken = True
            return None
        self._health_broken = False
        for finding in new_problems(self._last_health, report):
            log.log(
                logging.ERROR if finding.state == "failing" else logging.WARNING, "health: %s", finding.text
            )
        self._last_health = report
        return report

    def _check(self) -> None:
        from bencher_runner.sandbox.agent import find_agent
        from bencher_runner.sandbox.kernel import resolve_bundle
        from bencher_runner.spec.errors import KernelBundleError

        kernel, modules = self.options.kernel, self.options.kernel_modules  # runner up --kernel
        try:
            bundle = resolve_bundle(self.cache, kernel, modules)
        except KernelBundleError:
            if kernel is not None or not self._may_fetch():
                raise
            log.warning("no guest kernel bundle in %s: fetching it (runner kernel fetch)", self.cache)
            self._fetch_tried_at = time.monotonic()
            assert self.fetch_kernel is not None
            self.fetch_kernel(self.cache)
            bundle = resolve_bundle(self.cache, None, None)
            log.info("guest kernel bundle fetched: %s", bundle.kernel)
        find_agent()
        self._check_work_dir()
        if self.options.backend == "firecracker":
            from bencher_runner.sandbox.firecracker import find_firecracker, require_kvm

            find_firecracker(self.options.firecracker)
            require_kvm()
            if not self.options.danger_no_jail:
                from bencher_runner.sandbox.firecracker import find_jailer
                from bencher_runner.sandbox.firecracker_backend import NO_JAILER_ERROR

                if self.options.jailer is None:
                    raise RunnerError(NO_JAILER_ERROR)
                find_jailer(self.options.jailer)
            return
        from bencher_runner.sandbox.accel import cached_kvm_problem, choose_accel, probe_kvm_boot
        from bencher_runner.sandbox.jail import jail_problem
        from bencher_runner.sandbox.qemu import find_qemu

        qemu = find_qemu()
        if not self.options.danger_no_jail and (problem := jail_problem()):
            raise RunnerError(problem)  # every VMM runs jailed: a host that cannot jail claims nothing
        if not self._accel_done:  # the probe boots a test guest once; its answer is cached on disk
            choose_accel(
                self.options.accel,
                lambda: cached_kvm_problem(
                    self.cache, qemu, bundle.kernel, lambda: probe_kvm_boot(qemu, bundle.kernel)
                ),
            )
            self._accel_done = True

    def _may_fetch(self) -> bool:
        if self.fetch_kernel is None or os.environ.get("BENCHER_RUNNER_KERNEL"):
            return False
        return self._fetch_tried_at is None or time.monotonic() - self._fetch_tried_at >= FETCH_RETRY_S

    def _check_work_dir(self) -> None:
        root = work_root(self.cache)
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".preflight-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            st = os.statvfs(root)
        except OSError as err:
            raise RunnerError(
                f"the work directory {root} is not writable ({err.strerror or err}); "
                "fix its permissions or pass another --cache-dir"
            ) from None
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes:
            raise RunnerError(
                f"only {free // MIB} MiB are free for job disks in {root} (at least "
                f"{self.min_free_bytes // MIB} MiB needed); free space there (`runner cache prune`) "
                "or pass another --cache-dir"
            )


def fetch_default_kernel(cache: Path) -> None:
    """`runner kernel fetch` for the daemon's cache: the Debian cloud kernel and its vmlinux."""
    from bencher_runner.sandbox.kernel import fetch_debian_bundle
    from bencher_runner.sandbox.vmlinux import ensure_vmlinux

    bundle = fetch_debian_bundle(cache)
    ensure_vmlinux(bundle.kernel, bundle.kernel.parent / "vmlinux")
