"""One job, from RunConfig to RunResult: an orchestrator of phases (image -> root -> iterations ->
results) over a Sandbox (sandbox/backend.py), which runs each iteration in a QEMU or Firecracker
microVM, or on the host.

Everything a job creates lives in one work directory that is removed on every exit path. Every
failure becomes a RunResult with status "failed" and the error's user-facing text; partial results
(earlier iterations, output produced before a timeout) are kept.

The timeout is one deadline for the whole job (JobRequest.deadline), as Bencher's server counts it:
checked after the pull, the unpack and the root disk build, before every iteration, and while every
VM or host command runs, so an iteration that starts late gets only the time that is left.
"""

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bencher_runner import metrics
from bencher_runner.capacity import check_host_capacity
from bencher_runner.host.cpus import online_cpus, partition, pin_process
from bencher_runner.host.tuning import TuningOptions, tuned_host
from bencher_runner.oci.blobcache import image_cache_dir
from bencher_runner.oci.layout import LocalImage
from bencher_runner.oci.progress import PullProgress
from bencher_runner.oci.source import credentials_for, open_image
from bencher_runner.oci.unpack import resolve_in_tree
from bencher_runner.paths import work_root
from bencher_runner.recovery import LOCK_NAME
from bencher_runner.reporter import LogReporter, Reporter
from bencher_runner.rootdisk import RootDisks
from bencher_runner.rootfs import copy_disk
from bencher_runner.sandbox.backend import Iteration, IterationStopped, JobContext, RootKind, Sandbox, Session
from bencher_runner.sandbox.choose import make_sandbox
from bencher_runner.sparedisk import SpareDisks
from bencher_runner.spec.bmf import metric_report
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.errors import JobTimeoutError, RunnerError, SpecError
from bencher_runner.spec.launch import Launch, resolve_command, resolve_launch
from bencher_runner.spec.results import IterationOutput, RunResult, SandboxInfo
from bencher_runner.spec.units import MIB

SandboxFactory = Callable[[JobContext], Sandbox]
__all__ = ["Job", "LogReporter", "Reporter", "run_job"]


def default_sandbox(ctx: JobContext) -> Sandbox:
    """The job's backend (sandbox.choose), with the image layer's tree resolver for ``--sandbox none``."""
    return make_sandbox(ctx, resolve_in_tree)


class Job:
    def __init__(
        self,
        config: RunConfig,
        *,
        cache: Path,
        reporter: Reporter | None = None,
        cancel: threading.Event | None = None,
        tuning: TuningOptions | None = None,
        sandbox: SandboxFactory = default_sandbox,
    ) -> None:
        self.config = config
        self.tuning = tuning or TuningOptions(enabled=False)
        self.reporter = reporter or Reporter()
        self.cancel = cancel or threading.Event()
        self.ctx = JobContext(config, cache, self.cancel, warn=self.reporter.warn, phase=self.reporter.phase)
        self.disks = RootDisks(self.ctx)
        self.spares = SpareDisks(cache)
        self.make_sandbox = sandbox
        self.results: list[IterationOutput] = []
        self.info: SandboxInfo | None = None
        self.deadline = config.job.deadline(time.monotonic())  # reset when run() starts

    def run(self) -> RunResult:
        started = time.monotonic()
        self.deadline = self.config.job.deadline(started)
        try:
            with tuned_host(self.tuning, log=self.reporter.phase) as report:
                self.ctx.metadata["tuning"] = report.to_dict()
                self.ctx.layout = partition(online_cpus())  # after tuning: SMT off changes the online CPUs
                self.ctx.metadata["cpus"] = self.ctx.layout.to_dict()
                with self._runner_on_housekeeping():
                    error: RunnerError | None = self._run()
        except RunnerError as err:
            error = err
        except (OSError, subprocess.SubprocessError) as err:
            # A host problem nothing above anticipated: still one line for the user, never a traceback.
            error = RunnerError(f"the job failed on this host: {err.__class__.__name__}: {err}")
        self.ctx.timings["total_s"] = time.monotonic() - started
        return RunResult(
            status="failed" if error else "completed",
            results=self.results,
            sandbox=self.info,
            error=str(error) if error else None,
            timings=self.ctx.timings,
            metadata=self.ctx.metadata,
            failure=error,
            interference=self.ctx.interference,
            fingerprint=self.ctx.fingerprint,
        )

    @contextlib.contextmanager
    def _runner_on_housekeeping(self) -> Iterator[None]:
        """The runner's own threads stay off the benchmark cores while the job runs."""
        layout = self.ctx.layout
        if layout is None or not layout.has_isolation or self.config.backend == "none":
            yield
            return
        original = sorted(os.sched_getaffinity(0))
        for problem in pin_process(os.getpid(), layout.housekeeping):
            self.reporter.warn(problem)
        try:
            yield
        finally:
            pin_process(os.getpid(), original)

    def _timed_out(self, what: str) -> JobTimeoutError:
        return JobTimeoutError(
            f"the job timed out after {self.config.job.timeout_s} s (the timeout covers the whole job: "
            f"the image pull, every boot and every iteration) {what}; raise the timeout "
            "(runner run --timeout, bencher run --job-timeout) or run fewer iterations"
        )

    def _check_deadline(self, during: str) -> None:
        """A phase between the job's start and its iterations may not end past the deadline."""
        self.ctx.check_cancel(during)
        if time.monotonic() >= self.deadline:
            raise self._timed_out(during)

    def _pull_progress(self, event: PullProgress) -> None:
        self._check_deadline("while its image was pulled")  # raised in the download thread: it stops
        if event.kind != "manifest" and (event.complete or event.cached):
            metrics.cache_lookup("blob", event.cached)
        self.reporter.pull(event)
        if event.kind == "layer" and (event.complete or event.cached):
            how = "cached" if event.cached else "pulled"
            self.reporter.phase(f"layer {event.digest[:19]}… {how} ({event.total / MIB:.1f} MiB)")

    def _run(self) -> RunnerError | None:
        job = self.config.job
        self._check_deadline("before it started")
        check_host_capacity(self.config, self.ctx.cache)  # before any work: memory, disk space, paths
        sandbox = self.make_sandbox(self.ctx)
        sandbox.check()  # e.g. the VMM's jail: refused before any work
        image = self._pull()
        resolve_command(image.config.config.entrypoint, image.config.config.cmd, job.entrypoint, job.cmd)
        limit = self.config.host.max_file_count
        if len(job.output_paths) > limit:
            raise SpecError(
                f"{len(job.output_paths)} output files requested, more than the limit of {limit}; "
                "request fewer files or raise --max-file-count"
            )
        self.info = sandbox.prepare()
        return self._in_work_dir(lambda work: self._run_in(work, image, sandbox))

    def _pull(self) -> LocalImage:
        job = self.config.job
        t0 = time.monotonic()
        image = open_image(
            job.image,
            cache_dir=image_cache_dir(self.ctx.cache),
            credentials=credentials_for(job),
            insecure=job.insecure_registry,
            allow_local=job.allow_local_image,
            progress=self._pull_progress,
            cancel=self.cancel,
            warn=self.reporter.warn,
        )
        self.ctx.timings["pull_s"] = time.monotonic() - t0
        self._check_deadline("while its image was pulled")
        self.reporter.phase(f"image {image.manifest_digest[:19]}… verified ({len(image.layers)} layers)")
        return image

    def _in_work_dir(self, body: Callable[[Path], RunnerError | None]) -> RunnerError | None:
        root = work_root(self.ctx.cache)
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="job-", dir=root))
        # Held while the job lives: remove_stale_work_dirs skips locked dirs, so only a crashed
        # runner's leftovers are removed, never a concurrent job's.
        lock = os.open(work / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return body(work)
        finally:
            self.disks.discard(work)
            shutil.rmtree(work, ignore_errors=True)
            os.close(lock)

    def _run_in(self, work: Path, image: LocalImage, sandbox: Sandbox) -> RunnerError | None:
        t0 = time.monotonic()
        spare_key = None
        if sandbox.root_kind == "disk":
            template = self.disks.template(work, image)
            root, passwd, group, spare_key = template.disk, template.passwd, template.group, template.key
            self.spares.keep_only(template.key)  # another image's spares: dropped before we need space
            self.spares.want(template, self.config.job.iterations)
            self.ctx.timings["rootfs_s"] = time.monotonic() - t0
            self._check_deadline("while its root disk was prepared")
        else:
            root, passwd, group = self.disks.unpack(work, image, in_memory=False)  # iterations rename it
            self._check_deadline("while its image was unpacked")
        launch = self._launch(image, passwd, group)
        with sandbox.session(work, launch) as session:
            return self._iterations(work, root, sandbox.root_kind, session, spare_key)

    def _iterations(
        self, work: Path, root: Path, kind: RootKind, session: Session, spare_key: str | None
    ) -> RunnerError | None:
        """The one iteration loop: each runs on its own copy of the root; the job stops at the first
        failure (a non-zero exit unless allowed, a timeout, a cancel, a sandbox error)."""
        job = self.config.job
        for index in range(job.iterations):
            label = f"iteration {index + 1}/{job.iterations}"
            self._check_deadline(f"before {label} started")
            it_dir = work / f"iter-{index + 1}"
            last = index == job.iterations - 1
            with self._iteration_root(root, kind, it_dir, last=last, spare_key=spare_key) as it_root:
                try:
                    run = session.run(Iteration(index, label, it_dir, it_root, self.deadline))
                except IterationStopped as stop:
                    if stop.partial is not None:
                        self.results.append(stop.partial)
                    if stop.ran is not None:
                        raise self._timed_out(f"in {label}, {stop.ran} (its output so far is kept)") from None
                    assert stop.error is not None
                    raise stop.error from None
            output = self._with_metrics(run.output, label, run.command_s, run.file_sizes)
            self.results.append(output)
            self.reporter.iteration(index, output)
            if output.exit_code != 0 and not job.allow_failure:
                return RunnerError(f"benchmark exited with non-zero exit code {output.exit_code} in {label}")
        return None

    @contextlib.contextmanager
    def _iteration_root(
        self, root: Path, kind: RootKind, it_dir: Path, *, last: bool, spare_key: str | None
    ) -> Iterator[Path]:
        """The iteration's own root: a copy of the template disk (the cached one stays read-only; the
        copy, fully allocated, is freed as soon as the iteration ends; a spare copied while the runner
        was idle, sparedisk.py, when there is one), or of the unpacked tree (the last iteration takes
        the tree itself), which is the iteration's directory."""
        if kind == "tree":
            if last:
                root.rename(it_dir)
            else:
                subprocess.run(["cp", "-a", "--reflink=auto", str(root), str(it_dir)], check=True)
            yield it_dir
            return
        it_dir.mkdir()
        disk = it_dir / "rootfs.ext4"
        t0 = time.monotonic()
        if spare_key is not None and self.spares.take(spare_key, disk):
            root_disk = self.ctx.metadata.setdefault("root_disk", {})
            assert isinstance(root_disk, dict)
            root_disk["spare_disks_taken"] = int(root_disk.get("spare_disks_taken", 0)) + 1
        else:
            copy_disk(root, disk)
        self.ctx.add_time("disk_copy_s", time.monotonic() - t0)
        try:
            yield disk
        finally:
            disk.unlink(missing_ok=True)

    def _launch(self, image: LocalImage, passwd: str | None, group: str | None) -> Launch:
        """What to run, by Docker's rules, against the image's own passwd and group."""
        job = self.config.job
        image_cfg = image.config.config
        return resolve_launch(
            image_entrypoint=image_cfg.entrypoint,
            image_cmd=image_cfg.cmd,
            image_env=image_cfg.env,
            image_working_dir=image_cfg.working_dir,
            image_user=image_cfg.user,
            entrypoint=job.entrypoint,
            cmd=job.cmd,
            env=job.env,
            passwd=passwd,
            group=group,
        )

    def _with_metrics(
        self, output: IterationOutput, label: str, command_s: float, file_sizes: dict[str, int]
    ) -> IterationOutput:
        """build_time/file_size: the iteration's BMF (spec/bmf.py) replaces its files on the wire."""
        job = self.config.job
        if not (job.build_time or job.file_size):
            return output
        sizes = {path: file_sizes[path] for path in job.output_paths if path in file_sizes}
        report = metric_report(
            build_time=(job.build_time_name(), command_s) if job.build_time else None,
            file_sizes=sizes if job.file_size else None,
        )
        for warning in report.warnings:
            self.reporter.warn(f"{label}: {warning}")
        if report.bmf is None:  # nothing to report: like Bencher, no files either
            return dataclasses.replace(output, output={})
        return dataclasses.replace(output, bmf=report.bmf)


def run_job(
    config: RunConfig,
    *,
    cache: Path,
    reporter: Reporter | None = None,
    cancel: threading.Event | None = None,
    tuning: TuningOptions | None = None,
    sandbox: SandboxFactory = default_sandbox,
) -> RunResult:
    return Job(config, cache=cache, reporter=reporter, cancel=cancel, tuning=tuning, sandbox=sandbox).run()
