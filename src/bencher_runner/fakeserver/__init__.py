"""A fake Bencher API server (runner channel only) that behaves like v0.6.12, for tests and local trials."""

from bencher_runner.fakeserver.jobs import FakeJob, JobStatus, Priority, RunnerRecord
from bencher_runner.fakeserver.server import (
    FAKE_OCI_TOKEN,
    FakeBencher,
    Fault,
    LoggedFrame,
    default_config,
    default_spec,
)

__all__ = [
    "FAKE_OCI_TOKEN",
    "FakeBencher",
    "FakeJob",
    "Fault",
    "JobStatus",
    "LoggedFrame",
    "Priority",
    "RunnerRecord",
    "default_config",
    "default_spec",
]
