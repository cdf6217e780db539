"""Wait for a running guest's command to print something: tests sync on that, never on boot speed.

The agent appends each stdout chunk to the output disk as it comes (sandbox/outputdisk.py), so the
host can read a live VM's disk file: a test that needs "the benchmark is running" waits for its
marker line there instead of sleeping for as long as a TCG boot is hoped to take.
"""

import time
from pathlib import Path

from bencher_runner.sandbox.outputdisk import read_output_disk
from bencher_runner.spec.errors import RunnerError


def wait_for_guest_stdout(work_root: Path, marker: bytes, timeout: float) -> Path:
    """The output disk of the first running iteration whose stdout holds ``marker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for disk in work_root.glob("*/iter-*/output.img"):
            try:
                report = read_output_disk(disk, max_output=1 << 20, requested=())
            except (OSError, RunnerError):  # removed, or still being created
                continue
            if marker in report.stdout:
                return disk
        time.sleep(0.2)
    raise AssertionError(f"no guest printed {marker!r} within {timeout} s under {work_root}")
