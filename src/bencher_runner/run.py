"""`runner run`: execute one RunConfig locally and print its result.

Human mode: progress on stderr, the benchmark's stdout to stdout and its stderr to stderr, byte-exact.
`--json`: exactly one JSON document on stdout. Exit status: 0 completed, 1 the benchmark failed
(non-zero exit, timeout, guest failure), 2 bad usage or a bad image.
"""

import json
import re
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.status import Status

from bencher_runner.host.fingerprint import save_host_json
from bencher_runner.host.interference import verdict_line
from bencher_runner.host.maintenance import HostBusyError, host_job_lock
from bencher_runner.host.tuning import TuningOptions
from bencher_runner.job import Reporter, run_job
from bencher_runner.oci.progress import PullProgress
from bencher_runner.recovery import recover_from_crash
from bencher_runner.sandbox.outputdisk import wire_name
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.errors import ImageError, KernelBundleError, RootfsError, RunnerError, SpecError
from bencher_runner.spec.results import IterationOutput, RunResult

EXIT_COMPLETED = 0
EXIT_BENCHMARK_FAILED = 1
EXIT_USAGE = 2
USAGE_ERRORS = (SpecError, ImageError, RootfsError, KernelBundleError)


LONG_PHASES = ("unpacking", "building", "iteration")  # a spinner runs until the next phase line


class ConsoleReporter(Reporter):
    """Phase lines on stderr; on a terminal also live bars for layer downloads and a spinner for long
    phases (unpack, mkfs, the VM). Off a terminal the lines alone, one per event, for logs."""

    def __init__(self, *, echo_output: bool, quiet: bool, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self.echo_output = echo_output
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.echoed = 0
        self._lock = threading.Lock()
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._status: Status | None = None

    def say(self, text: str, style: str) -> None:
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def phase(self, text: str) -> None:
        if self.quiet:
            return
        with self._lock:
            if text.startswith("image ") and self._bars is not None:
                self._bars.stop()  # the pull is over: the finished bars stay on screen
                self._bars = None
            self._stop_status()
            if not (self.live and text.startswith("layer ")):  # on a terminal the bars say it
                self.say(f"runner: {text}", "dim")
            if self.live and text.startswith(LONG_PHASES):
                self._status = self.console.status(text.split(":")[-1].strip(), spinner="dots")
                self._status.start()

    def pull(self, event: PullProgress) -> None:
        if not self.live or event.kind == "manifest":
            return
        with self._lock:
            if self._bars is None:
                self._bars = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    DownloadColumn(binary_units=True),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    console=self.console,
                )
                self._bars.start()
            task = self._tasks.get(event.digest)
            if task is None:
                what = f"{event.kind} {event.digest.removeprefix('sha256:')[:12]}"
                task = self._bars.add_task(what + (" (cached)" if event.cached else ""), total=event.total)
                self._tasks[event.digest] = task
            self._bars.update(task, completed=event.done)

    def warn(self, text: str) -> None:
        with self._lock:
            self.say(f"runner: warning: {text}", "yellow")

    def iteration(self, index: int, output: IterationOutput) -> None:
        with self._lock:
            self._stop_status()
        if self.echo_output:
            write_streams(output, sys.stdout.buffer, sys.stderr.buffer)
            self.echoed += 1

    def close(self) -> None:
        with self._lock:
            self._stop_status()
            if self._bars is not None:
                self._bars.stop()
                self._bars = None

    def _stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def write_streams(output: IterationOutput, stdout: IO[bytes], stderr: IO[bytes]) -> None:
    stdout.write(output.stdout)
    stdout.flush()
    stderr.write(output.stderr)
    stderr.flush()


def exit_status(result: RunResult) -> int:
    if result.status == "completed":
        return EXIT_COMPLETED
    if isinstance(result.failure, USAGE_ERRORS):
        return EXIT_USAGE
    return EXIT_BENCHMARK_FAILED


def save_outputs(result: RunResult, output_dir: Path) -> None:
    """stdout, stderr and every output file, byte-exact, under DIR/iter-N/; RunnerError if it cannot.

    A file goes to ``files/<its guest path>`` (leading ``/`` and ``.`` dropped) when that path is
    plain: valid UTF-8 components of at most 255 bytes, none ``..`` or holding NUL, and no other
    file's path is the same or needs it as a directory (``a`` next to ``a/b``). Any other file, which
    only a guest could make of it, goes to ``renamed/<n>-<its name, sanitised>``. ``files.json``
    maps every saved file (relative to iter-N/) to its guest path, so nothing the guest names is lost
    or overwritten and nothing lands outside DIR.
    """
    try:
        for index, output in enumerate(result.results, start=1):
            base = output_dir / f"iter-{index}"
            (base / "files").mkdir(parents=True, exist_ok=True)
            (base / "stdout").write_bytes(output.stdout)
            (base / "stderr").write_bytes(output.stderr)
            if output.output:
                _save_files(base, output.output)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise RunnerError(
            f"cannot save the outputs under {output_dir}: {err.strerror or err}{where}; "
            "pass an --output-dir you can write to"
        ) from None


INDEX_NAME = "files.json"
NAME_MAX = 255  # bytes in one path component (Linux)
PLAIN_PATH_MAX = 1024  # bytes in a whole guest path saved as it is
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _plain_parts(guest_path: str) -> tuple[str, ...] | None:
    """The components of a guest path that can be saved as they are under files/, else None."""
    try:
        if len(guest_path.encode()) > PLAIN_PATH_MAX:
            return None
    except UnicodeEncodeError:
        return None
    parts = tuple(part for part in guest_path.split("/") if part not in ("", "."))
    if not parts or any(part == ".." or "\0" in part or len(part.encode()) > NAME_MAX for part in parts):
        return None
    return parts


def _clashes(parts: tuple[str, ...], files: Counter[tuple[str, ...]], dirs: set[tuple[str, ...]]) -> bool:
    """Another file has the same path, needs this one as a directory, or is one of its directories."""
    return files[parts] > 1 or parts in dirs or any(parts[:i] in files for i in range(1, len(parts)))


def _save_files(base: Path, files: dict[str, bytes]) -> None:
    plain = {path: _plain_parts(path) for path in files}
    count = Counter(parts for parts in plain.values() if parts)
    dirs = {parts[:i] for parts in count for i in range(1, len(parts))}
    index: dict[str, str] = {}
    for number, (guest_path, data) in enumerate(files.items(), start=1):
        parts = plain[guest_path]
        target = None if parts is None or _clashes(parts, count, dirs) else Path("files", *parts)
        if target is not None:
            try:
                (base / target).parent.mkdir(parents=True, exist_ok=True)
                (base / target).write_bytes(data)
            except OSError:  # e.g. a previous run's directory in the way: save it renamed instead
                target = None
        if target is None:
            name = _UNSAFE.sub("_", guest_path.rstrip("/").rsplit("/", 1)[-1])[:64].lstrip(".") or "file"
            target = Path("renamed", f"{number}-{name}")
            (base / "renamed").mkdir(exist_ok=True)
            (base / target).write_bytes(data)
        index[target.as_posix()] = wire_name(guest_path)
    (base / INDEX_NAME).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_command(
    config: RunConfig,
    *,
    cache: Path,
    as_json: bool,
    quiet: bool,
    output_dir: Path | None = None,
    tuning: TuningOptions | None = None,
    wait: bool = True,
) -> int:
    reporter = ConsoleReporter(echo_output=not as_json, quiet=quiet)
    # SIGTERM unwinds like Ctrl-C, so the VM is killed and the work directory removed.
    signal.signal(signal.SIGTERM, _terminate)
    recover_from_crash(cache, warn=reporter.warn, info=reporter.phase)
    try:
        # One job at a time on a host: wait for a daemon's (or another run's) job instead of racing it.
        with host_job_lock(wait=wait, on_wait=reporter.phase, warn=reporter.warn):
            result = run_job(config, cache=cache, reporter=reporter, tuning=tuning)
    except HostBusyError as err:
        reporter.say(f"runner: error: {err}", "red")
        return EXIT_USAGE
    finally:
        reporter.close()
    save_error: RunnerError | None = None
    if output_dir is not None:
        try:
            save_outputs(result, output_dir)
            save_host_json(output_dir, result.fingerprint, result.interference)
        except RunnerError as err:
            save_error = err  # the result is still printed
    for index, output in enumerate(result.results, start=1):
        for path, why in output.missing.items():
            reporter.warn(f"iteration {index}: output file {path} was not collected: {why}")
        if output.truncated:
            reporter.warn(f"iteration {index}: cut at --max-output-size: {', '.join(output.truncated)}")
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
        sys.stdout.flush()
    if not as_json:
        # Output the reporter has not shown yet (a timed-out iteration's partial output).
        for output in result.results[reporter.echoed :]:
            write_streams(output, sys.stdout.buffer, sys.stderr.buffer)
    if save_error is not None:
        reporter.say(f"runner: error: {save_error}", "red")
    if result.status == "failed":
        reporter.say(f"runner: error: {result.error}", "red")
    elif not quiet:
        total = result.timings.get("total_s", 0.0)
        accel = result.sandbox.accel if result.sandbox else "?"
        reporter.say(
            f"runner: completed {len(result.results)} iteration(s) in {total:.1f} s ({accel})", "dim"
        )
    if not quiet and not as_json and (line := verdict_line(result.interference)):
        reporter.say(f"runner: {line}", "dim")
    return EXIT_USAGE if save_error is not None else exit_status(result)
