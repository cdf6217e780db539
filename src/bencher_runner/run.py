"""`runner run`: execute one RunConfig locally and print its result.

Human mode: progress on stderr, the benchmark's stdout to stdout and its stderr to stderr, byte-exact.
`--json`: exactly one JSON document on stdout. Exit status: 0 completed, 1 the benchmark failed
(non-zero exit, timeout, guest failure), 2 bad usage or a bad image.
"""

import json
import signal
import sys
from pathlib import Path, PurePosixPath
from typing import IO

from rich.console import Console

from bencher_runner.host.tuning import TuningOptions
from bencher_runner.job import Reporter, recover_from_crash, run_job
from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.errors import ImageError, KernelBundleError, RootfsError, SpecError
from bencher_runner.spec.results import IterationOutput, RunResult

EXIT_COMPLETED = 0
EXIT_BENCHMARK_FAILED = 1
EXIT_USAGE = 2
USAGE_ERRORS = (SpecError, ImageError, RootfsError, KernelBundleError)


class ConsoleReporter(Reporter):
    def __init__(self, *, echo_output: bool, quiet: bool) -> None:
        self.console = Console(stderr=True, highlight=False)
        self.echo_output = echo_output
        self.quiet = quiet
        self.echoed = 0

    def say(self, text: str, style: str) -> None:
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def phase(self, text: str) -> None:
        if not self.quiet:
            self.say(f"runner: {text}", "dim")

    def warn(self, text: str) -> None:
        self.say(f"runner: warning: {text}", "yellow")

    def iteration(self, index: int, output: IterationOutput) -> None:
        if self.echo_output:
            write_streams(output, sys.stdout.buffer, sys.stderr.buffer)
            self.echoed += 1


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
    """stdout, stderr and every output file, byte-exact, under DIR/iter-N/ (files/ keeps guest paths)."""
    for index, output in enumerate(result.results, start=1):
        base = output_dir / f"iter-{index}"
        files = base / "files"
        files.mkdir(parents=True, exist_ok=True)
        (base / "stdout").write_bytes(output.stdout)
        (base / "stderr").write_bytes(output.stderr)
        for guest_path, data in output.output.items():
            parts = [p if p != ".." else "__" for p in PurePosixPath(guest_path).parts if p not in ("/", ".")]
            target = files.joinpath(*parts) if parts else files / "__"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


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
) -> int:
    reporter = ConsoleReporter(echo_output=not as_json, quiet=quiet)
    # SIGTERM unwinds like Ctrl-C, so the VM is killed and the work directory removed.
    signal.signal(signal.SIGTERM, _terminate)
    recover_from_crash(cache, warn=reporter.warn, info=reporter.phase)
    result = run_job(config, cache=cache, reporter=reporter, tuning=tuning)
    if output_dir is not None:
        save_outputs(result, output_dir)
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
    if result.status == "failed":
        reporter.say(f"runner: error: {result.error}", "red")
    elif not quiet:
        total = result.timings.get("total_s", 0.0)
        accel = result.sandbox.accel if result.sandbox else "?"
        reporter.say(
            f"runner: completed {len(result.results)} iteration(s) in {total:.1f} s ({accel})", "dim"
        )
    return exit_status(result)
