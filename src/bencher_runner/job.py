"""One job, from RunConfig to RunResult: image -> rootfs -> VM per iteration -> results.

Everything a job creates lives in one work directory that is removed on every exit path. Every
failure becomes a RunResult with status "failed" and the error's user-facing text; partial results
(earlier iterations, output produced before a timeout) are kept.

The timeout is one deadline for the whole job (RunConfig.deadline), as Bencher's server counts it:
checked after the pull, the unpack and the root disk build, before every iteration, and while every
VM or host command runs, so an iteration that starts late gets only the time that is left.
"""

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bencher_runner import metrics
from bencher_runner.host.capacity import check_host_capacity
from bencher_runner.host.cgroup import JobCgroup, job_cgroup
from bencher_runner.host.cpus import CpuLayout, online_cpus, partition, pin_process, pin_qemu_threads
from bencher_runner.host.tuning import TuningOptions, tuned_host
from bencher_runner.layercache import (
    ChainBase,
    ChainCache,
    IncrementalUnavailable,
    apply_layers,
    base_depth,
    has_dir,
    incremental_supported,
)
from bencher_runner.oci.blobcache import image_cache_dir
from bencher_runner.oci.layout import LayerRef, LocalImage
from bencher_runner.oci.progress import PullProgress
from bencher_runner.oci.source import credentials_for, open_image
from bencher_runner.oci.unpack import (
    ByteBudget,
    StagingAllowance,
    StagingFull,
    UnpackStats,
    ensure_directory,
    read_image_file,
    unpack_layers,
)
from bencher_runner.paths import work_root
from bencher_runner.recovery import LOCK_NAME
from bencher_runner.rootfs import (
    EXT4_RESERVED_INODES,
    Template,
    TemplateCache,
    build_rootfs,
    copy_disk,
    ext4_inode_count,
    min_disk_mib,
    template_key,
)
from bencher_runner.sandbox.accel import AccelChoice, cached_kvm_problem, choose_accel, probe_kvm_boot
from bencher_runner.sandbox.agent import find_agent
from bencher_runner.sandbox.agentconfig import AgentConfig, encode_agent_config

if TYPE_CHECKING:
    from bencher_runner.sandbox.firecracker import FirecrackerVm
from bencher_runner.sandbox.host import run_on_host
from bencher_runner.sandbox.initramfs import base_initramfs, write_job_initramfs
from bencher_runner.sandbox.jail import jail_vm, write_resolv_conf
from bencher_runner.sandbox.kernel import KernelBundle, check_memory_floor, resolve_bundle
from bencher_runner.sandbox.netns import JobNetwork, empty_netns, host_nameserver, job_network
from bencher_runner.sandbox.network import NetworkPlan, user_nat
from bencher_runner.sandbox.outputdisk import (
    ExitWatcher,
    GuestReport,
    create_output_disk,
    iteration_output,
    output_disk_size,
    read_output_disk,
)
from bencher_runner.sandbox.qemu import QemuVm, find_qemu
from bencher_runner.sandbox.serial import (
    OOM_MARKER,
    PANIC_MARKER,
    bounded_serial_log,
    serial_line,
    serial_tail,
)
from bencher_runner.sandbox.vm import VmSpec, guest_cmdline, read_host_tsc_khz
from bencher_runner.sandbox.vmlinux import ensure_vmlinux
from bencher_runner.spec.bmf import metric_report
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.errors import (
    AgentError,
    CanceledError,
    GuestOutOfMemoryError,
    GuestPanicError,
    ImageError,
    JobTimeoutError,
    KernelBundleError,
    RunnerError,
    SandboxError,
    SpecError,
)
from bencher_runner.spec.launch import Launch, resolve_command, resolve_launch
from bencher_runner.spec.results import IterationOutput, RunResult, SandboxInfo
from bencher_runner.spec.units import MIB
from bencher_runner.staging import memory_allowance, memory_tree, out_of_space, remove_memory_tree

TIMEOUT_EXIT_CODE = 124  # what `timeout(1)` reports; the partial output is kept
# Results written after the command exited are still collected this long past the deadline: half
# the server's 60 s grace, so the terminal message still beats its hard limit.
RESULT_OVERRUN_S = 30.0


class Reporter:
    """Where a job says what it is doing; the CLI renders it, tests may record it."""

    def phase(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        pass

    def pull(self, event: PullProgress) -> None:
        """Bytes of one blob arrived (called from the download threads)."""

    def iteration(self, index: int, output: IterationOutput) -> None:
        """An iteration finished (its output is also in the final result)."""


class LogReporter(Reporter):
    """The daemon's reporter: phases and warnings as log lines (tagged with the job by the daemon)."""

    def __init__(self) -> None:
        self.log = logging.getLogger("bencher_runner.job")

    def phase(self, text: str) -> None:
        self.log.info("%s", text)

    def warn(self, text: str) -> None:
        self.log.warning("%s", text)


@dataclass
class JobState:
    results: list[IterationOutput] = field(default_factory=list)
    sandbox: SandboxInfo | None = None
    timings: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, object] = field(default_factory=dict)


class Job:
    def __init__(
        self,
        config: RunConfig,
        *,
        cache: Path,
        reporter: Reporter | None = None,
        cancel: threading.Event | None = None,
        tuning: TuningOptions | None = None,
    ) -> None:
        self.config = config
        self.tuning = tuning or TuningOptions(enabled=False)
        self.layout: CpuLayout | None = None
        self.cache = cache
        self.reporter = reporter or Reporter()
        self.cancel = cancel or threading.Event()
        self.state = JobState()
        self.network: JobNetwork | None = None
        self.firecracker: str | None = None
        self.vmlinux = Path()
        self.boot_kernel = Path()  # what QEMU boots: the bundle's vmlinux when it has one
        self.deadline = config.deadline(time.monotonic())  # reset when run() starts

    def run(self) -> RunResult:
        started = time.monotonic()
        self.deadline = self.config.deadline(started)
        try:
            with tuned_host(self.tuning, log=self.reporter.phase) as report:
                self.state.metadata["tuning"] = report.to_dict()
                self.layout = partition(online_cpus())  # after tuning: SMT off changes the online CPUs
                self.state.metadata["cpus"] = self.layout.to_dict()
                with self._runner_on_housekeeping():
                    error: RunnerError | None = self._run()
        except RunnerError as err:
            error = err
        except (OSError, subprocess.SubprocessError) as err:
            # A host problem nothing above anticipated: still one line for the user, never a traceback.
            error = RunnerError(f"the job failed on this host: {err.__class__.__name__}: {err}")
        self.state.timings["total_s"] = time.monotonic() - started
        return RunResult(
            status="failed" if error else "completed",
            results=self.state.results,
            sandbox=self.state.sandbox,
            error=str(error) if error else None,
            timings=self.state.timings,
            metadata=self.state.metadata,
            failure=error,
        )

    @contextlib.contextmanager
    def _runner_on_housekeeping(self) -> Iterator[None]:
        """The runner's own threads stay off the benchmark cores while the job runs."""
        layout = self.layout
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

    def _check_cancel(self, during: str) -> None:
        if self.cancel.is_set():
            raise CanceledError(f"the job was canceled {during}")

    def _timed_out(self, what: str) -> JobTimeoutError:
        return JobTimeoutError(
            f"the job timed out after {self.config.timeout_s} s (the timeout covers the whole job: "
            f"the image pull, every boot and every iteration) {what}; raise the timeout "
            "(runner run --timeout, bencher run --job-timeout) or run fewer iterations"
        )

    def _check_deadline(self, during: str) -> None:
        """A phase between the job's start and its iterations may not end past the deadline."""
        self._check_cancel(during)
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

    def _add_time(self, name: str, seconds: float) -> None:
        """Sum a phase over iterations."""
        self.state.timings[name] = self.state.timings.get(name, 0.0) + seconds

    def _timed(self, name: str, fn: Callable[[], object]) -> None:
        t0 = time.monotonic()
        fn()
        self.state.timings[f"{name}_s"] = time.monotonic() - t0

    def _run(self) -> RunnerError | None:
        cfg = self.config
        self._check_deadline("before it started")
        check_host_capacity(cfg, self.cache)  # before any work: memory, disk space, paths QEMU takes
        if cfg.backend == "qemu" and not cfg.danger_no_jail:  # the VMM's jail: refuse before any work
            from bencher_runner.sandbox.jail import jail_problem

            if problem := jail_problem():
                raise SandboxError(problem)
        if cfg.backend != "none":  # the guest kernel's memory floor, before any pull
            check_memory_floor(resolve_bundle(self.cache, cfg.kernel, cfg.kernel_modules), cfg.memory_mib)
        t0 = time.monotonic()
        image = open_image(
            cfg.image,
            cache_dir=image_cache_dir(self.cache),
            credentials=credentials_for(cfg),
            insecure=cfg.insecure_registry,
            allow_local=cfg.allow_local_image,
            progress=self._pull_progress,
            cancel=self.cancel,
            warn=self.reporter.warn,
        )
        self.state.timings["pull_s"] = time.monotonic() - t0
        self._check_deadline("while its image was pulled")
        self.reporter.phase(f"image {image.manifest_digest[:19]}… verified ({len(image.layers)} layers)")
        resolve_command(image.config.config.entrypoint, image.config.config.cmd, cfg.entrypoint, cfg.cmd)
        if len(cfg.output_paths) > cfg.max_file_count:
            raise SpecError(
                f"{len(cfg.output_paths)} output files requested, more than the limit of "
                f"{cfg.max_file_count}; request fewer files or raise --max-file-count"
            )
        if cfg.backend == "none":
            self.state.sandbox = SandboxInfo("none", "none", cfg.vcpus, cfg.memory_mib, cfg.disk_mib, True)
            self.reporter.warn("--sandbox none: the benchmark runs directly on this host, unisolated")
            return self._in_work_dir(lambda work: self._run_on_host(work, image))
        bundle = resolve_bundle(self.cache, cfg.kernel, cfg.kernel_modules)
        agent = find_agent()
        if cfg.backend == "firecracker":
            from bencher_runner.sandbox.firecracker import find_firecracker, require_kvm  # its HTTP stack

            self.firecracker = find_firecracker(cfg.firecracker)
            if cfg.accel == "tcg":
                raise SpecError("--sandbox firecracker runs on KVM only; use --sandbox qemu for --accel tcg")
            require_kvm()
            if cfg.network and cfg.network_mode != "tap":
                raise SpecError("--sandbox firecracker has no user-mode NAT: use --network-mode tap")
            self.vmlinux = ensure_vmlinux(bundle.kernel, bundle.kernel.parent / "vmlinux")
            accel = AccelChoice("kvm", "Firecracker runs on KVM")
        else:
            qemu = find_qemu()
            self.boot_kernel = self._qemu_kernel(bundle)
            accel = choose_accel(
                cfg.accel,
                lambda: cached_kvm_problem(
                    self.cache, qemu, bundle.kernel, lambda: probe_kvm_boot(qemu, bundle.kernel)
                ),
            )
        if accel.warning:
            self.reporter.warn(accel.warning)
        self.state.sandbox = SandboxInfo(
            cfg.backend, accel.accel, cfg.vcpus, cfg.memory_mib, cfg.disk_mib, cfg.network
        )

        return self._in_work_dir(lambda work: self._run_in(work, image, bundle, agent, accel))

    def _in_work_dir(self, body: Callable[[Path], RunnerError | None]) -> RunnerError | None:
        root = work_root(self.cache)
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="job-", dir=root))
        # Held while the job lives: remove_stale_work_dirs skips locked dirs, so only a crashed
        # runner's leftovers are removed, never a concurrent job's.
        lock = os.open(work / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return body(work)
        finally:
            remove_memory_tree(work)
            shutil.rmtree(work, ignore_errors=True)
            os.close(lock)

    def _budget(self, staged: Path | None = None, *, used: int = 0, inodes: int = 0) -> ByteBudget:
        """The job's disk bounds the tree (bytes and inodes) while it extracts; on tmpfs (``staged``)
        so does the tmpfs allowance. ``used``/``inodes``: already charged (by a cached chain base)."""
        disk_mib = self.config.disk_mib

        def disk_for(total_bytes: int, total_inodes: int) -> int:
            """A disk (MiB, at most ~1.5% above the least) that holds this many bytes and inodes."""
            mib = max(min_disk_mib(total_bytes), disk_mib)
            while ext4_inode_count(mib) - EXT4_RESERVED_INODES < total_inodes:
                mib += max(1, mib // 64)
            return mib

        allowance = StagingAllowance(*memory_allowance(staged)) if staged is not None else None
        return ByteBudget(
            disk_mib * MIB,
            used=used,
            inode_limit=ext4_inode_count(disk_mib) - EXT4_RESERVED_INODES,
            inodes=inodes,
            disk_mib=disk_mib,
            staging=allowance,
            disk_for=disk_for,
        )

    def _unpack(
        self, work: Path, image: LocalImage, *, in_memory: bool = True
    ) -> tuple[Path, str | None, str | None]:
        """Unpack the whole image (WorkingDir created): the tree, the image's /etc/passwd and /etc/group."""
        tree, _, stats = self._unpack_layers(work, image.layers, in_memory=in_memory)
        return tree, *self._finish_tree(tree, image, stats.skipped_devices)

    def _unpack_layers(
        self, work: Path, layers: Sequence[LayerRef], *, in_memory: bool = True
    ) -> tuple[Path, ByteBudget, UnpackStats]:
        """Unpack ``layers`` into a tmpfs tree when it surely fits (staging.py), else into work/tree;
        returns the tree, the budget charged for it and the unpack's stats.

        Passing the tmpfs allowance (or filling the tmpfs) moves the unpack to disk."""
        compressed = sum(layer.size for layer in layers)
        staged = memory_tree(work, compressed, warn=self.reporter.warn) if in_memory else None
        tree = staged or work / "tree"
        tree.mkdir(exist_ok=True)
        self.reporter.phase(f"unpacking layers{' in memory' if staged else ''}")
        t0 = time.monotonic()
        budget = self._budget(staged)
        try:
            stats = unpack_layers(layers, tree, budget=budget, total=len(layers))
        except ImageError as err:
            if staged is None or not (isinstance(err, StagingFull) or out_of_space(err)):
                raise
            self.reporter.warn(
                f"the image did not fit in {staged.parent} ({err}): unpacking it on disk instead"
            )
            remove_memory_tree(work)
            tree = work / "tree"
            tree.mkdir()
            budget = self._budget(None)
            stats = unpack_layers(layers, tree, budget=budget, total=len(layers))
        self.state.timings["unpack_s"] = time.monotonic() - t0
        self._check_cancel("while its image was unpacked")
        return tree, budget, stats

    def _warn_devices(self, devices: Sequence[str]) -> None:
        if devices:
            shown = ", ".join(devices[:4]) + (f" and {len(devices) - 4} more" if len(devices) > 4 else "")
            self.reporter.warn(
                f"skipped {len(devices)} device node(s) in the image: {shown} (the guest's /dev is devtmpfs)"
            )

    def _finish_tree(
        self, tree: Path, image: LocalImage, devices: Sequence[str]
    ) -> tuple[str | None, str | None]:
        """WorkingDir created (as Docker does); returns the image's /etc/passwd and /etc/group."""
        self._warn_devices(devices)
        ensure_directory(tree, image.config.config.working_dir or "/")
        return read_image_file(tree, "etc/passwd"), read_image_file(tree, "etc/group")

    def _build_template(self, work: Path, image: LocalImage, templates: TemplateCache, key: str) -> Template:
        """The image's root disk template: from the cached base of its longest known chain of lower
        layers plus its new layers (layercache.py), else in full (unpack + mkfs), leaving a base of
        its lower layers for the next image that shares them."""
        cfg = self.config
        layers = image.layers
        chains = ChainCache(self.cache)
        unsupported = incremental_supported()
        base = chains.longest(layers, cfg.disk_mib) if unsupported is None else None
        metrics.cache_lookup("chain", base is not None)
        if base is not None:
            try:
                template = self._incremental(work, image, templates, key, chains, base)
                self.state.metadata["root_disk"] = {
                    "built": "incremental",
                    "cached_layers": base.depth,
                    "applied_layers": len(layers) - base.depth,
                }
                return template
            except IncrementalUnavailable as err:
                self.reporter.phase(
                    f"cannot reuse the cached lower layers ({err}): building the disk in full"
                )
                unsupported = str(err)
        depth = base_depth(layers) if unsupported is None else len(layers)
        tree, budget, stats = self._unpack_layers(work, layers[:depth])
        working_dir = image.config.config.working_dir or "/"
        built = work / "rootfs.ext4"
        if depth < len(layers):  # a base of the lower layers first, then the top layer onto a copy of it
            self.reporter.phase(f"building {cfg.disk_mib} MiB ext4 disk of the lower {depth} layers")
            lower = work / "lower.ext4"
            self._timed(
                "mkfs", lambda: build_rootfs(tree, lower, cfg.disk_mib, allocate=False, cancel=self.cancel)
            )
            shutil.rmtree(tree)
            used = (budget.used, budget.inodes, stats.skipped_devices)
            stored = chains.put(
                layers[:depth],
                cfg.disk_mib,
                lower,
                link=False,
                used_bytes=used[0],
                used_inodes=used[1],
                skipped_devices=used[2],
            )
            base = stored or ChainBase("", depth, cfg.disk_mib, lower, *used[:2], tuple(used[2]))
            try:
                template = self._incremental(work, image, templates, key, chains, base)
                self.state.metadata["root_disk"] = {
                    "built": "full",
                    "layers": len(layers),
                    "base_layers": depth,
                }
                return template
            except IncrementalUnavailable as err:
                self.reporter.phase(f"applying the top layer failed ({err}): building the disk in full")
                tree, budget, stats = self._unpack_layers(work, layers)
                depth = len(layers)
        pristine = depth == len(layers) and unsupported is None and has_dir(tree, working_dir)
        passwd, group = self._finish_tree(tree, image, stats.skipped_devices)
        self.reporter.phase(f"building {cfg.disk_mib} MiB ext4 root disk")
        self._timed(
            "mkfs", lambda: build_rootfs(tree, built, cfg.disk_mib, allocate=False, cancel=self.cancel)
        )
        shutil.rmtree(tree)
        template = templates.put(key, built, passwd, group)
        self.state.metadata["root_disk"] = {"built": "full", "layers": len(layers)}
        if pristine:  # the template is exactly the layers' tree: the base of their chain, for free
            chains.put(
                layers,
                cfg.disk_mib,
                template.disk,
                link=True,
                used_bytes=budget.used,
                used_inodes=budget.inodes,
                skipped_devices=stats.skipped_devices,
            )
        return template

    def _incremental(
        self,
        work: Path,
        image: LocalImage,
        templates: TemplateCache,
        key: str,
        chains: ChainCache,
        base: ChainBase,
    ) -> Template:
        """The template as ``base`` (the disk of the first ``base.depth`` layers) plus the rest."""
        cfg = self.config
        layers = image.layers
        new = layers[base.depth :]
        self.reporter.phase(
            f"building {cfg.disk_mib} MiB ext4 root disk from the cached disk of its lower {base.depth} "
            f"layer(s) and {len(new)} new layer(s)"
        )
        budget = self._budget(used=base.used_bytes, inodes=base.used_inodes)  # as a full unpack by then
        mount_point = work / "disk-mount"
        mount_point.mkdir(exist_ok=True)
        built = work / "rootfs.ext4"
        t0 = time.monotonic()
        applied = apply_layers(
            base.disk,
            built,
            mount_point,
            new,
            budget=budget,
            first=base.depth + 1,
            total=len(layers),
            working_dir=image.config.config.working_dir or "/",
        )
        self.state.timings["incremental_s"] = time.monotonic() - t0
        self._check_cancel("while its image was unpacked")
        self._warn_devices([*base.skipped_devices, *applied.stats.skipped_devices])
        template = templates.put(key, built, applied.passwd, applied.group)
        if applied.pristine:
            devices = [*base.skipped_devices, *applied.stats.skipped_devices]
            chains.put(
                layers,
                cfg.disk_mib,
                template.disk,
                link=True,
                used_bytes=budget.used,
                used_inodes=budget.inodes,
                skipped_devices=devices,
            )
        return template

    def _launch(self, image: LocalImage, passwd: str | None, group: str | None) -> Launch:
        """What to run, by Docker's rules, against the image's own passwd and group."""
        cfg = self.config
        image_cfg = image.config.config
        return resolve_launch(
            image_entrypoint=image_cfg.entrypoint,
            image_cmd=image_cfg.cmd,
            image_env=image_cfg.env,
            image_working_dir=image_cfg.working_dir,
            image_user=image_cfg.user,
            entrypoint=cfg.entrypoint,
            cmd=cfg.cmd,
            env=cfg.env,
            passwd=passwd,
            group=group,
        )

    def _run_on_host(self, work: Path, image: LocalImage) -> RunnerError | None:
        cfg = self.config
        template, passwd, group = self._unpack(work, image, in_memory=False)  # iterations rename it
        self._check_deadline("while its image was unpacked")
        launch = self._launch(image, passwd, group)
        for index in range(cfg.iterations):
            label = f"iteration {index + 1}/{cfg.iterations}"
            self._check_deadline(f"before {label} started")
            tree = work / f"iter-{index + 1}"
            if index == cfg.iterations - 1:
                template.rename(tree)
            else:
                subprocess.run(["cp", "-a", "--reflink=auto", str(template), str(tree)], check=True)
            self.reporter.phase(f"{label}: running on the host (no sandbox)")
            run = run_on_host(
                tree,
                launch,
                deadline=self.deadline,
                max_output=cfg.max_output_bytes,
                outputs=cfg.output_paths,
                max_symlinks=cfg.max_symlinks,
                cancel=self.cancel,
            )
            self.state.timings["command_s"] = run.elapsed_s
            output = IterationOutput(
                exit_code=TIMEOUT_EXIT_CODE if run.timed_out else run.exit_code,
                stdout=bytes(run.stdout.data),
                stderr=bytes(run.stderr.data),
                output=run.files,
                missing=run.missing,
                truncated=tuple(
                    [n for n, s in (("stdout", run.stdout), ("stderr", run.stderr)) if s.total > len(s.data)]
                    + [p for p, data in run.files.items() if run.file_sizes[p] > len(data)]
                ),
            )
            if not run.timed_out:
                output = self._with_metrics(output, label, run.elapsed_s, run.file_sizes)
            self.state.results.append(output)
            self._check_cancel("while the benchmark ran")
            if run.timed_out:
                raise self._timed_out(
                    f"in {label}, which ran {run.elapsed_s:.1f} s and was killed (its output so far is kept)"
                )
            self.reporter.iteration(index, output)
            if output.exit_code != 0 and not cfg.allow_failure:
                return RunnerError(f"benchmark exited with non-zero exit code {output.exit_code} in {label}")
        return None

    def _run_in(
        self, work: Path, image: LocalImage, bundle: KernelBundle, agent: Path, accel: AccelChoice
    ) -> RunnerError | None:
        cfg = self.config
        templates = TemplateCache(self.cache)
        key = template_key(image.manifest_digest, cfg.disk_mib)
        t0 = time.monotonic()
        template = templates.get(key)
        metrics.cache_lookup("template", template is not None)
        if template is not None:
            self.reporter.phase(f"root disk template cached ({cfg.disk_mib} MiB)")
            self.state.metadata["root_disk"] = {"built": "template"}
        else:
            template = self._build_template(work, image, templates, key)
        self.state.timings["rootfs_s"] = time.monotonic() - t0
        self._check_deadline("while its root disk was prepared")
        launch = self._launch(image, template.passwd, template.group)
        base = base_initramfs(self.cache, agent, bundle.modules)
        with contextlib.ExitStack() as stack:
            if cfg.network and cfg.network_mode == "tap":
                self.reporter.phase("creating the job's network namespace and TAP device")
                self.network = stack.enter_context(job_network(work, tap_owner=self._jail_ids()))
            job_config = encode_agent_config(self._agent_config(launch))  # holds the guest's addresses
            return self._iterations(work, template.disk, base, bundle, job_config, accel)

    def _iterations(
        self,
        work: Path,
        template: Path,
        base: Path,
        bundle: KernelBundle,
        job_config: bytes,
        accel: AccelChoice,
    ) -> RunnerError | None:
        cfg = self.config
        for index in range(cfg.iterations):
            label = f"iteration {index + 1}/{cfg.iterations}"
            self._check_deadline(f"before {label} started")
            it_dir = work / f"iter-{index + 1}"
            it_dir.mkdir()
            rootfs = it_dir / "rootfs.ext4"
            t0 = time.monotonic()
            copy_disk(template, rootfs)  # the cached template stays read-only
            self._add_time("disk_copy_s", time.monotonic() - t0)
            try:
                output = self._boot(it_dir, rootfs, base, bundle, job_config, accel, label)
            finally:
                # a fully allocated copy of --disk MiB: free it now, not when all iterations are done
                rootfs.unlink(missing_ok=True)
            self.state.results.append(output)
            self.reporter.iteration(index, output)
            if output.exit_code != 0 and not cfg.allow_failure:
                return RunnerError(f"benchmark exited with non-zero exit code {output.exit_code} in {label}")
        return None

    def _agent_config(self, launch: Launch) -> AgentConfig:
        return AgentConfig(
            argv=launch.argv,
            env=launch.env,
            cwd=launch.cwd,
            uid=launch.user.uid,
            gid=launch.user.gid,
            groups=launch.user.groups,
            max_output=self.config.max_output_bytes,
            outputs=self.config.output_paths,
            network=self._network_plan().guest if self.config.network else None,
        )

    def _network_plan(self) -> NetworkPlan:
        return self.network.plan if self.network is not None else user_nat()

    def _boot(
        self,
        it_dir: Path,
        rootfs: Path,
        base: Path,
        bundle: KernelBundle,
        job_config: bytes,
        accel: AccelChoice,
        label: str,
    ) -> IterationOutput:
        cfg = self.config
        initrd = it_dir / "initrd.cpio"
        write_job_initramfs(base, job_config, initrd)
        out_disk = it_dir / "output.img"
        create_output_disk(out_disk, output_disk_size(len(cfg.output_paths), cfg.max_output_bytes))
        spec = VmSpec(
            kernel=self.boot_kernel if cfg.backend == "qemu" else bundle.kernel,
            initrd=initrd,
            rootfs=rootfs,
            output_disk=out_disk,
            serial_log=it_dir / "serial.log",
            vcpus=cfg.vcpus,
            memory_mib=cfg.memory_mib,
            accel=accel.accel,
            cmdline=guest_cmdline(accel.accel, read_host_tsc_khz()),  # Firecracker swaps reboot=t for =k
            network=self._network_plan() if cfg.network else None,
            acpi=bundle.acpi,
        )
        self.reporter.phase(f"{label}: booting VM ({cfg.vcpus} vCPU, {cfg.memory_mib} MiB, {accel.accel})")
        t0 = time.monotonic()
        deadline = self.deadline  # the job's: a late iteration gets only the time that is left
        timed_out = canceled = grace_expired = False
        watcher = ExitWatcher(out_disk, requested=cfg.output_paths, max_output=cfg.max_output_bytes)
        grace_deadline: float | None = None
        with (
            self._cgroup(it_dir) as group,
            self._vmm_netns(it_dir, spec) as netns,
            bounded_serial_log(spec.serial_log),  # a guest spamming its console cannot fill the disk
            self._make_vm(spec, it_dir, netns) as vm,
        ):
            if group is not None and vm.pid is not None:
                group.add(vm.pid)  # cpuset = benchmark cores, memory.max a little above the VM, no swap
            self._pin(vm.pid)
            status = None
            while status is None:
                status = vm.wait(min(deadline, grace_deadline or deadline, time.monotonic() + 0.1))
                if status is not None:
                    break
                now = time.monotonic()
                if self.cancel.is_set():
                    canceled = True
                elif grace_deadline is None and watcher.poll():
                    # The command has exited in time: the guest gets the grace period to write its
                    # results, even past the deadline, up to RESULT_OVERRUN_S.
                    grace_deadline = min(
                        now + cfg.grace_period_s + self._collect_allowance(),
                        max(now + 1.0, deadline + RESULT_OVERRUN_S),
                    )
                elif grace_deadline is not None:
                    grace_expired = now >= grace_deadline
                elif now >= deadline:
                    timed_out = True
                if canceled or grace_expired or timed_out:
                    break
            vm.kill()
            vm_log = vm.log()
        t1 = time.monotonic()
        self._add_time("vm_s", t1 - t0)
        report = read_output_disk(out_disk, max_output=cfg.max_output_bytes, requested=cfg.output_paths)
        self._add_time("collect_s", time.monotonic() - t1)
        self._record_guest_timings(report)
        for warning in report.warnings:
            self.reporter.warn(f"{label}: {warning}")
        if canceled:
            raise CanceledError("the job was canceled while the benchmark ran")
        if timed_out:
            self.state.results.append(IterationOutput(TIMEOUT_EXIT_CODE, report.stdout, report.stderr))
            raise self._timed_out(
                f"in {label}, which ran {t1 - t0:.1f} s (boot included) and was stopped (its output so far "
                "is kept)"
            )
        if report.exit is None:
            raise self._no_result_error(report, spec.serial_log, status, vm_log)
        if grace_expired and not report.done:
            self.reporter.warn(
                f"{label}: the guest did not finish writing results within the {cfg.grace_period_s} s grace "
                "period; output files may be missing (raise --grace-period)"
            )
        oom = serial_line(spec.serial_log, OOM_MARKER) if report.exit.exit_code == 128 + 9 else None
        if oom:
            self.reporter.warn(f"{label}: the guest ran out of memory: {oom}")
        output = iteration_output(
            report, cfg.output_paths, mark_uncollected=not report.done and not grace_expired
        )
        if oom:
            self.state.results.append(output)
            raise GuestOutOfMemoryError(
                f"the benchmark was killed because the guest ran out of memory ({cfg.memory_mib} MiB): "
                f"{oom}; raise --memory or reduce what the benchmark allocates"
            )
        command_s = (report.exit.end_ns - report.exit.start_ns) / 1e9
        return self._with_metrics(output, label, command_s, report.file_sizes)

    def _with_metrics(
        self, output: IterationOutput, label: str, command_s: float, file_sizes: dict[str, int]
    ) -> IterationOutput:
        """build_time/file_size: the iteration's BMF (spec/bmf.py) replaces its files on the wire."""
        cfg = self.config
        if not (cfg.build_time or cfg.file_size):
            return output
        sizes = {path: file_sizes[path] for path in cfg.output_paths if path in file_sizes}
        report = metric_report(
            build_time=(cfg.build_time_name(), command_s) if cfg.build_time else None,
            file_sizes=sizes if cfg.file_size else None,
        )
        for warning in report.warnings:
            self.reporter.warn(f"{label}: {warning}")
        if report.bmf is None:  # nothing to report: like Bencher, no files either
            return dataclasses.replace(output, output={})
        return dataclasses.replace(output, bmf=report.bmf)

    def _collect_allowance(self) -> float:
        """Time to read and write the requested output files at the slowest disk speed we plan for."""
        return len(self.config.output_paths) * self.config.max_output_bytes / (50 * MIB)

    def _record_guest_timings(self, report: GuestReport) -> None:
        if report.exit is not None:
            self.state.timings["boot_to_command_s"] = report.exit.start_ns / 1e9
            self.state.timings["command_s"] = (report.exit.end_ns - report.exit.start_ns) / 1e9

    def _cgroup(self, it_dir: Path) -> contextlib.AbstractContextManager[JobCgroup | None]:
        layout = self.layout
        if layout is None or not layout.has_isolation:
            return contextlib.nullcontext()
        job_id = f"{it_dir.parent.name}-{it_dir.name}"
        return job_cgroup(job_id, layout.benchmark, self.config.memory_mib, log=self.reporter.phase)

    def _pin(self, pid: int | None) -> None:
        """Under KVM, vCPU threads go to the benchmark cores (TCG timings are emulated anyway)."""
        layout = self.layout
        if pid is None or layout is None or not layout.has_isolation or self.state.sandbox is None:
            return
        if self.state.sandbox.accel == "kvm":
            for problem in pin_qemu_threads(pid, layout.benchmark):
                self.reporter.warn(problem)

    def _qemu_kernel(self, bundle: KernelBundle) -> Path:
        """The fetched bundle's kernel as an uncompressed ELF (QEMU boots it through PVH): no
        decompression at every boot, which costs about 0.25 s under TCG. A kernel given with --kernel
        is booted as it is (no file is written next to it)."""
        if self.config.kernel is not None:
            return bundle.kernel
        try:
            return ensure_vmlinux(bundle.kernel, bundle.kernel.parent / "vmlinux")
        except KernelBundleError as err:
            self.reporter.warn(f"booting the compressed kernel: {err}")
            return bundle.kernel

    def _jail_ids(self) -> tuple[int, int] | None:
        """The jail's uid and gid (the owner of a TAP device), None without a jail."""
        cfg = self.config
        return None if cfg.danger_no_jail else (cfg.jail_uid, cfg.jail_gid)

    @contextlib.contextmanager
    def _vmm_netns(self, it_dir: Path, spec: VmSpec) -> Iterator[str | None]:
        """The network namespace a jailed VMM joins, when the job's TAP network is not it: a NATed one
        without a TAP for QEMU's user-mode NAT, an empty one for Firecracker's jailer without network.
        None: a jailed QEMU without network gets a fresh empty one from bwrap."""
        cfg = self.config
        if cfg.danger_no_jail or self.network is not None:
            yield self.network.name if self.network is not None else None
        elif spec.network is not None and cfg.backend == "qemu":
            with job_network(it_dir, tap=False) as network:
                yield network.name
        elif cfg.backend == "firecracker" and cfg.jailer is not None:
            with empty_netns(it_dir) as name:
                yield name
        else:
            yield None

    def _make_vm(self, spec: VmSpec, it_dir: Path, netns: str | None = None) -> "QemuVm | FirecrackerVm":
        cfg = self.config
        if cfg.danger_no_jail and it_dir.name == "iter-1":
            self.reporter.warn(
                "--danger-no-jail: the VMM runs unconfined (as the runner's user, in the host's "
                "namespaces, seeing its files); a VMM escape owns this host"
            )
        prefix = self.network.command_prefix() if self.network is not None else None
        if cfg.backend != "firecracker":
            layout = self.layout
            cpus = tuple(layout.benchmark) if layout is not None and layout.has_isolation else None
            if cfg.danger_no_jail:
                return QemuVm(spec, it_dir / "qemu.log", prefix, cpus)
            resolv = None
            if spec.network is not None and self.network is None:  # user-mode NAT: slirp's resolver
                try:
                    resolv_conf = Path("/etc/resolv.conf").read_text()
                except OSError:
                    resolv_conf = ""
                resolv = write_resolv_conf(it_dir / "resolv.conf", host_nameserver(resolv_conf))
            plan, inside = jail_vm(
                spec,
                find_qemu(),
                uid=cfg.jail_uid,
                gid=cfg.jail_gid,
                netns=netns,
                resolv_conf=resolv,
            )
            return QemuVm(inside, it_dir / "qemu.log", cpus=cpus, jail=plan)
        from bencher_runner.sandbox.firecracker import FirecrackerVm, find_jailer, jailer_config

        jailer = None
        if not cfg.danger_no_jail:
            if cfg.jailer is None:
                raise SandboxError(
                    "--sandbox firecracker runs Firecracker under its jailer: pass --jailer PATH (it ships "
                    "in the release archive with firecracker), or --danger-no-jail on a development host"
                )
            plan, _ = jail_vm(
                spec, self.firecracker or "firecracker", uid=cfg.jail_uid, gid=cfg.jail_gid, netns=netns
            )
            jailer = jailer_config(plan, find_jailer(cfg.jailer), cfg.jailer_chroot_base)
            prefix = None  # the jailer joins the namespace itself
        return FirecrackerVm(
            spec,
            self.vmlinux,
            it_dir,
            firecracker=self.firecracker,
            jailer=jailer,
            log_level=cfg.sandbox_log_level,
            prefix=prefix,
        )

    def _no_result_error(
        self, report: GuestReport, serial: Path, status: int | None, vm_log: str
    ) -> SandboxError:
        if report.errors:
            return AgentError(f"the guest agent failed: {'; '.join(report.errors)}")
        panic = serial_line(serial, PANIC_MARKER)
        if panic:
            return GuestPanicError(
                f"the guest kernel panicked: {panic}\nserial console:\n{serial_tail(serial)}"
            )
        backend = "Firecracker" if self.config.backend == "firecracker" else "QEMU"
        detail = f"{backend} exited with status {status}" + (f": {vm_log}" if vm_log else "")
        return SandboxError(
            f"the VM stopped without reporting a result ({detail})\nserial console:\n{serial_tail(serial)}"
        )


def run_job(
    config: RunConfig,
    *,
    cache: Path,
    reporter: Reporter | None = None,
    cancel: threading.Event | None = None,
    tuning: TuningOptions | None = None,
) -> RunResult:
    return Job(config, cache=cache, reporter=reporter, cancel=cancel, tuning=tuning).run()
