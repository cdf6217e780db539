"""Where a job says what it is doing: `runner run` renders it (run.py), the daemon logs it, tests
record it."""

import logging

from bencher_runner.oci.progress import PullProgress
from bencher_runner.spec.results import IterationOutput


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
