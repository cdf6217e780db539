"""The fake server's job table: the v0.6.12 job states and every transition, as pure functions of `now`.

The real server writes each transition as a conditional UPDATE filtered on the expected status and
re-reads the job when no row matched; what it then does (ack, `cancel`, or an error that drops the
connection) depends only on the job's state. Keeping that here, away from the socket code, lets the
channel tests and the socket loops share one table of rules and lets time be simulated. Times are
seconds from the server's clock; like the server, elapsed-time checks compare whole seconds.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any


class JobStatus(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    RUNNING = "running"
    COMPLETED = "completed"
    PROCESSED = "processed"
    FAILED = "failed"
    CANCELED = "canceled"


HAS_RUN = frozenset({JobStatus.COMPLETED, JobStatus.PROCESSED, JobStatus.FAILED, JobStatus.CANCELED})
IN_FLIGHT = (JobStatus.CLAIMED, JobStatus.RUNNING)


class Priority(IntEnum):
    """Scheduling tiers: Plus is unlimited, Free one claimed/running job per organization, Unclaimed one
    per source IP."""

    UNCLAIMED = 0
    FREE = 100
    PLUS = 200


class Reply(StrEnum):
    ACK = "ack"
    CANCEL = "cancel"


class CloseReason(StrEnum):
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    JOB_TIMEOUT_EXCEEDED = "job_timeout_exceeded"


class InvalidTransition(Exception):
    """The server's `InvalidStateTransition`: the handler errors and the connection is dropped."""

    def __init__(self, job: "FakeJob", target: JobStatus) -> None:
        super().__init__(f"invalid state transition to {target} for job {job.uuid}, found {job.status}")
        self.job, self.target, self.current = job, target, job.status


@dataclass
class RunnerRecord:
    uuid: str
    slug: str
    key_hash: str
    specs: set[str] = field(default_factory=set)
    archived: bool = False


@dataclass
class FakeJob:
    uuid: str
    spec: dict[str, Any]
    config: dict[str, Any]
    timeout: int
    status: JobStatus = JobStatus.PENDING
    runner: str | None = None  # uuid of the runner that claimed it
    id: int = 0
    priority: Priority = Priority.PLUS
    organization: str = "fake-org"
    source_ip: str = "127.0.0.1"
    created: float = 0.0
    created_text: str = "2026-01-01T00:00:00Z"  # RFC 3339, as the `job` message carries it
    claimed: float | None = None
    started: float | None = None
    completed: float | None = None
    last_heartbeat: float | None = None
    output: dict[str, Any] | None = None
    output_writes: int = 0
    history: list[str] = field(default_factory=list)
    oci_token: str | None = None  # None: minted at claim time

    @property
    def spec_uuid(self) -> str:
        return str(self.spec.get("uuid", ""))


def _elapsed(now: float, since: float) -> int:
    """Whole seconds between two clock readings, as the server's `timestamp()` arithmetic counts them."""
    return max(0, math.floor(now) - math.floor(since))


ResultCheck = Callable[[list[dict[str, Any]]], bool]


def accept_all(results: list[dict[str, Any]]) -> bool:
    return True


class JobStore:
    """Jobs, runners and the server's rules for them. Every method takes `now` from the server clock."""

    def __init__(self, *, grace_period: float, result_check: ResultCheck = accept_all) -> None:
        self.grace_period = grace_period
        self.result_check = result_check  # the adapter: False turns a completed job into failed
        self.jobs: dict[str, FakeJob] = {}
        self.runners: dict[str, RunnerRecord] = {}
        self._next_id = 1

    # -- records ------------------------------------------------------------------------------------------
    def add_runner(self, runner: RunnerRecord) -> RunnerRecord:
        self.runners[runner.uuid] = runner
        return runner

    def find_runner(self, resource: str) -> RunnerRecord | None:
        """By UUID when `resource` parses as one, else by slug (the `RunnerResourceId` rule)."""
        for runner in self.runners.values():
            if resource in (runner.uuid, runner.slug):
                return runner
        return None

    def add(self, job: FakeJob) -> FakeJob:
        job.id = self._next_id
        self._next_id += 1
        self.jobs[job.uuid] = job
        return job

    def set_status(self, job: FakeJob, status: JobStatus) -> None:
        """An unconditional write, as the upstream tests do with `set_job_status` (and an external cancel)."""
        job.status = status
        job.history.append(status)

    def _transition(self, job: FakeJob, allowed: tuple[JobStatus, ...], to: JobStatus) -> bool:
        if job.status not in allowed:
            return False
        self.set_status(job, to)
        return True

    def _terminate(self, job: FakeJob, allowed: tuple[JobStatus, ...], to: JobStatus, now: float) -> bool:
        if not self._transition(job, allowed, to):
            return False
        job.completed = now
        return True

    # -- claim --------------------------------------------------------------------------------------------
    def _eligible(self, job: FakeJob) -> bool:
        if job.priority >= Priority.PLUS:
            return True
        busy = [j for j in self.jobs.values() if j.status in IN_FLIGHT]
        if job.priority >= Priority.FREE:
            return not any(j.organization == job.organization for j in busy)
        return not any(j.source_ip == job.source_ip for j in busy)

    def next_claimable(self, runner: RunnerRecord) -> FakeJob | None:
        """The first pending job whose spec is linked to this runner and whose tier is eligible, ordered
        by priority (highest first), then created, then id."""
        pending = [
            j
            for j in self.jobs.values()
            if j.status == JobStatus.PENDING and j.spec_uuid in runner.specs and self._eligible(j)
        ]
        pending.sort(key=lambda j: (-int(j.priority), j.created, j.id))
        return pending[0] if pending else None

    def claim(self, job: FakeJob, runner: RunnerRecord, now: float) -> bool:
        if not self._transition(job, (JobStatus.PENDING,), JobStatus.CLAIMED):
            return False
        job.runner, job.claimed, job.last_heartbeat = runner.uuid, now, now
        return True

    # -- during a job -------------------------------------------------------------------------------------
    def past_hard_limit(self, job: FakeJob, now: float) -> bool:
        """Strictly more than `timeout` + grace since `running` (exactly at the limit is not past it)."""
        return job.started is not None and _elapsed(now, job.started) > job.timeout + self.grace_period

    def on_running(self, job: FakeJob, now: float) -> Reply:
        if job.status == JobStatus.RUNNING:
            job.last_heartbeat = now  # a repeat (or reconnect) only refreshes liveness
            return Reply.ACK
        if self._transition(job, (JobStatus.CLAIMED,), JobStatus.RUNNING):
            job.started = job.last_heartbeat = now
            return Reply.ACK
        return Reply.CANCEL if job.status == JobStatus.CANCELED else Reply.ACK

    def on_heartbeat(self, job: FakeJob, now: float) -> Reply:
        if job.status == JobStatus.CANCELED:
            return Reply.CANCEL
        if self.past_hard_limit(job, now):
            self._terminate(job, IN_FLIGHT, JobStatus.CANCELED, now)
            return Reply.CANCEL
        if job.status in IN_FLIGHT:
            job.last_heartbeat = now
        return Reply.ACK

    def on_completed(self, job: FakeJob, results: list[dict[str, Any]], now: float) -> None:
        """Allowed from running or failed (a late result overrides a timeout failure); idempotent for
        completed/processed; a canceled job keeps its state and the result is discarded; anything else
        (claimed) is an invalid transition."""
        if not self._terminate(job, (JobStatus.RUNNING, JobStatus.FAILED), JobStatus.COMPLETED, now):
            if job.status in (JobStatus.COMPLETED, JobStatus.PROCESSED, JobStatus.CANCELED):
                return
            raise InvalidTransition(job, JobStatus.COMPLETED)
        self._store(job, {"results": results})
        processed = self.result_check(results)
        self._transition(job, (JobStatus.COMPLETED,), JobStatus.PROCESSED if processed else JobStatus.FAILED)

    def on_failed(self, job: FakeJob, results: list[dict[str, Any]], error: str, now: float) -> None:
        """Allowed from claimed or running; once the job has run the report is discarded."""
        if not self._terminate(job, IN_FLIGHT, JobStatus.FAILED, now):
            if job.status in HAS_RUN:
                return
            raise InvalidTransition(job, JobStatus.FAILED)
        self._store(job, {"results": results, "error": error})

    def on_canceled(self, job: FakeJob, now: float) -> None:
        """Allowed from claimed or running, idempotent when canceled, an invalid transition otherwise
        (failed, completed, processed: the connection is dropped)."""
        if not self._terminate(job, IN_FLIGHT, JobStatus.CANCELED, now) and job.status != JobStatus.CANCELED:
            raise InvalidTransition(job, JobStatus.CANCELED)

    def _store(self, job: FakeJob, output: dict[str, Any]) -> None:
        job.output = output
        job.output_writes += 1

    def owned(self, uuid: str, runner: RunnerRecord) -> FakeJob | None:
        """An idle retry's job: known and claimed by this runner, else None (the server only logs)."""
        job = self.jobs.get(uuid)
        return job if job is not None and job.runner == runner.uuid else None

    # -- timeouts -----------------------------------------------------------------------------------------
    def on_read_timeout(self, job: FakeJob, now: float) -> CloseReason:
        """No valid message for `heartbeat_timeout` during a job: canceled past the hard limit, else
        failed; a job that has already run keeps its state."""
        if job.status in HAS_RUN:
            return CloseReason.HEARTBEAT_TIMEOUT
        if self.past_hard_limit(job, now):
            self._terminate(job, IN_FLIGHT, JobStatus.CANCELED, now)
            return CloseReason.JOB_TIMEOUT_EXCEEDED
        self._terminate(job, IN_FLIGHT, JobStatus.FAILED, now)
        return CloseReason.HEARTBEAT_TIMEOUT

    def after_disconnect(self, job: FakeJob, now: float, heartbeat_timeout: float) -> float | None:
        """The check a disconnect schedules `heartbeat_timeout` later. Returns None when done, or the
        seconds until the next check when the job's last heartbeat is still fresh."""
        if job.status in HAS_RUN:
            return None
        if self.past_hard_limit(job, now):
            self._terminate(job, IN_FLIGHT, JobStatus.CANCELED, now)
            return None
        if job.last_heartbeat is not None and now - job.last_heartbeat < heartbeat_timeout:
            return heartbeat_timeout - (now - job.last_heartbeat)
        self._terminate(job, IN_FLIGHT, JobStatus.FAILED, now)
        return None

    def recover(self, now: float, heartbeat_timeout: float) -> list[FakeJob]:
        """Server start: fail claimed jobs older than `heartbeat_timeout`, re-process completed ones (no
        output: failed), and return the claimed/running jobs that get a timeout check."""
        for job in self.jobs.values():
            claimed = job.claimed if job.claimed is not None else job.created
            if job.status == JobStatus.CLAIMED and claimed <= now - heartbeat_timeout:
                self._terminate(job, (JobStatus.CLAIMED,), JobStatus.FAILED, now)
            elif job.status == JobStatus.COMPLETED:
                results = (job.output or {}).get("results")
                ok = isinstance(results, list) and self.result_check(results)
                self._transition(job, (JobStatus.COMPLETED,), JobStatus.PROCESSED if ok else JobStatus.FAILED)
        return [j for j in self.jobs.values() if j.status in IN_FLIGHT]
