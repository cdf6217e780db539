"""VmProcess.wait: the exit status when the VMM exits, None at the deadline, no fd left behind."""

import os
import time
from pathlib import Path

from bencher_runner.sandbox.vmprocess import VmProcess


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_wait_returns_the_status_or_none_at_the_deadline_and_leaks_no_fd(tmp_path: Path) -> None:
    with (tmp_path / "log").open("wb") as log:
        before = open_fds()
        for _ in range(20):
            proc = VmProcess(["/bin/sh", "-c", "exit 3"], stdout=log, stderr=log)
            assert proc.wait(time.monotonic() + 60) == 3
        sleeper = VmProcess(["/bin/sleep", "30"], stdout=log, stderr=log)
        assert sleeper.wait(time.monotonic() + 0.05) is None  # still running at the deadline
        sleeper.kill()
        assert sleeper.poll() == -9
        assert open_fds() == before
