"""Sans-IO state machine of the runner side of the Bencher runner channel (design/PROTOCOL.md).

It owns every protocol decision so that they can be tested by feeding it inputs and times: the asyncio
driver only moves frames, runs jobs and checks, and executes the actions returned here. No sockets, no
clocks, no threads: every input carries ``now`` (monotonic seconds). The model is h11's `_state.py`:
named states, typed inputs and one table (`TRANSITIONS`) that says what each input does in each state.

The connection is in one `State` at a time. A claimed job lives beside it (`_Job`, with its own
`JobPhase`) because it outlives connections: a job keeps running across a reconnect and its result is
sent on the next connection. One message is in flight at a time (send, wait for its reply, then the
next), which is how the `ack` of a terminal message is told apart from a heartbeat's. Terminal messages
go through the durable outbox: `PersistTerminal` comes before the `Send`, `DropTerminal` after the
matching `ack`.

Every timer that fires changes the state or moves the timer (a `tick` at the same ``now`` twice does
nothing the second time), so a driver that calls `tick` whenever `next_timer()` is due cannot spin.
"""

import datetime
import enum
import logging
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bencher_runner.protocol.messages import (
    Ack,
    Cancel,
    Garbage,
    Heartbeat,
    JobOffer,
    Message,
    NoJob,
    Paused,
    Ready,
    RunnerMessage,
    Running,
    ServerMessage,
    Terminal,
    Update,
    canceled_message,
    failed_message,
    parse_server_message,
)
from bencher_runner.protocol.terminal import DEFAULT_MAX_MESSAGE_BYTES, terminal_message
from bencher_runner.spec.config import HostSettings, RunConfig
from bencher_runner.spec.errors import SpecError
from bencher_runner.spec.jobspec import build_config_from_job, parse_job
from bencher_runner.spec.results import RunResult

DEFAULT_POLL_TIMEOUT = 55
POLL_MARGIN_S = 30.0
HEARTBEAT_INTERVAL_S = 1.0
ACK_TIMEOUT_S = 5.0
MAX_TERMINAL_ATTEMPTS = 20  # sends of one `completed`/`failed` before it is given up (logged as an error)
MAX_CANCELED_ATTEMPTS = 3  # `canceled` drops the connection on a job already ended: never resend it long
SHUTDOWN_CANCEL_WAIT_S = 5.0  # at shutdown, how long a canceled job may take to stop before we exit anyway
PAUSE_RECHECK_S = 1.0  # a paused host is checked again this often (a drain ends within a second)
HOST_RECHECK_MIN_S = 5.0  # a host that cannot run jobs is checked again after this, doubling ...
HOST_RECHECK_MAX_S = 60.0  # ... up to this
EXIT_UPDATE = 75


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Connected:
    pass


@dataclass(frozen=True)
class Disconnected:
    reason: str = "connection closed"


@dataclass(frozen=True)
class Received:
    message: ServerMessage


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class JobFinished:
    job: str
    message: Terminal  # its result as `completed`/`failed`, built in the worker thread


@dataclass(frozen=True)
class HostChecked:
    """The verdict of the check before `ready` (daemon/preflight.py)."""

    problem: str | None  # a job cannot run here (what is missing, and the fix); None: it can
    pause: tuple[str, ...] = ()  # it could, but should not now (drained, a RAID check, a local job)
    reasons: tuple[Message, ...] = ()  # the pause in upstream's `paused` wire form
    health: Message | None = None  # upstream's `health` object


@dataclass(frozen=True)
class ShutdownRequested:
    pass


Input = Connected | Disconnected | Received | Tick | JobFinished | HostChecked | ShutdownRequested


# ---------------------------------------------------------------------------------------------------
# Actions


@dataclass(frozen=True)
class Send:
    """Send this message as one JSON text frame."""

    message: RunnerMessage


@dataclass(frozen=True)
class StartJob:
    """Run this job (in a worker thread) and feed `JobFinished` with its result."""

    job: str
    config: RunConfig


@dataclass(frozen=True)
class CancelJob:
    """Set the job's cancel event: the VM is killed, then `JobFinished` still follows."""

    job: str


@dataclass(frozen=True)
class PersistTerminal:
    """Write this terminal message to the durable outbox (before the `Send` that follows)."""

    message: Terminal


@dataclass(frozen=True)
class DropTerminal:
    """The server acked the job's terminal message: remove it from the outbox."""

    job: str


@dataclass(frozen=True)
class ParkTerminal:
    """Give up resending the job's terminal message: move it out of the outbox, kept for a human."""

    job: str


@dataclass(frozen=True)
class CheckHost:
    """Check (off the loop) that a job can run on this host; feed `HostChecked` with the answer."""


@dataclass(frozen=True)
class Reconnect:
    """Close the connection (without waiting) and connect again after a backoff."""

    reason: str


@dataclass(frozen=True)
class UpdateAvailable:
    version: str
    url: str
    checksum: str


@dataclass(frozen=True)
class Stop:
    """Close the connection and end the daemon with this exit status (error: why, for the user)."""

    exit_code: int
    error: str | None = None


@dataclass(frozen=True)
class Log:
    level: int
    text: str


Action = (
    Send
    | StartJob
    | CancelJob
    | PersistTerminal
    | DropTerminal
    | ParkTerminal
    | CheckHost
    | Reconnect
    | UpdateAvailable
    | Stop
    | Log
)


# ---------------------------------------------------------------------------------------------------
# State


class State(enum.Enum):
    DISCONNECTED = "disconnected"  # no connection: connecting, or backing off before the next try
    IDLE = "idle"  # connected, nothing in flight (a detached job may run; the host may be unfit)
    CHECKING = "checking"  # connected, the host check before `ready` is running
    POLLING = "polling"  # `ready` sent: waiting for `job`, `no_job` or `update`
    AWAITING_ACK = "awaiting_ack"  # `running`, `heartbeat` or a terminal message waits for its reply
    STOPPED = "stopped"


class JobPhase(enum.Enum):
    STARTING = "starting"  # claimed; `running` not yet acked
    RUNNING = "running"  # `running` acked on this connection: heartbeats every interval
    DETACHED = "detached"  # its connection is gone: it runs on, its result goes out on a later one
    REJECTED = "rejected"  # it cannot run here: nothing runs; `running`, then `failed`
    CANCELED = "canceled"  # the server canceled it: `canceled` is queued, the worker is stopping


@dataclass
class _Job:
    uuid: str
    phase: JobPhase = JobPhase.STARTING
    running_sent: bool = False
    cancel_requested: bool = False  # CancelJob was issued (server cancel or shutdown)
    rejected: str | None = None
    next_heartbeat: float = 0.0


@dataclass
class _Pending:
    message: Terminal
    attempts: int = 0

    @property
    def job(self) -> str:
        return self.message.job


@dataclass
class _InFlight:
    kind: Literal["running", "heartbeat", "terminal"]
    job: str
    deadline: float


@dataclass
class ProtocolSettings:
    poll_timeout: int = DEFAULT_POLL_TIMEOUT
    runner_metadata: Message | None = None  # sent in `ready` (None: --no-auto-update)
    auto_update: bool = True
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S
    ack_timeout: float = ACK_TIMEOUT_S
    poll_margin: float = POLL_MARGIN_S
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    shutdown_cancels: bool = True
    check_host: bool = True  # CheckHost before every `ready` (False: the host is assumed fit)
    announce_pause: bool = False  # send upstream's `paused` (and `health`): a v0.6.12 server drops on it
    host_settings: HostSettings = field(default_factory=HostSettings)


Handler = Callable[["RunnerProtocol", Any, float], list[Action]]


class RunnerProtocol:
    """Feed inputs with `handle(input, now)` (or the shorthands below); execute the actions in order."""

    def __init__(self, settings: ProtocolSettings, pending: Sequence[Terminal] = ()) -> None:
        if not 1 <= settings.poll_timeout <= 900:
            raise SpecError(f"poll_timeout={settings.poll_timeout}: must be 1..900 seconds")
        self.settings = settings
        self.state = State.DISCONNECTED
        self.job: _Job | None = None
        self.pending: list[_Pending] = [_Pending(m) for m in pending]
        self.in_flight: _InFlight | None = None
        self.poll_deadline: float | None = None
        self.host_problem: str | None = None  # the last check's verdict
        self.host_recheck_at: float | None = None  # when an unfit host is checked again
        self._recheck_delay = HOST_RECHECK_MIN_S
        self.shutting_down = False
        self.stop_deadline: float | None = None  # during shutdown: stop at this time whatever happens
        self._hurry = False  # a second shutdown request: stop as soon as the job's result is saved
        self.paused: tuple[str, ...] = ()  # why claiming is paused (the last check's pause texts)
        self.pause_reasons: tuple[Message, ...] = ()
        self.paused_since: str | None = None
        self.health: Message | None = None
        self.polling_paused = False  # the open poll is a `paused`, not a `ready`
        self.wall_clock: Callable[[], str] = _rfc3339_now

    # -- inputs --------------------------------------------------------------------------------------
    def handle(self, event: Input, now: float) -> list[Action]:
        if self.state is State.STOPPED:
            return []
        if self.state is State.DISCONNECTED and isinstance(event, Received):
            return []  # a frame of a connection already given up
        key: type = type(event.message) if isinstance(event, Received) else type(event)
        handler = TRANSITIONS.get((self.state, key)) or TRANSITIONS.get((None, key))
        if handler is None:
            return self._out_of_turn(event)
        payload = event.message if isinstance(event, Received) else event
        return handler(self, payload, now)

    def connect(self, now: float) -> list[Action]:
        return self.handle(Connected(), now)

    def disconnected(self, now: float, reason: str = "connection closed") -> list[Action]:
        return self.handle(Disconnected(reason), now)

    def received(self, frame: str | bytes, now: float) -> list[Action]:
        return self.handle(Received(parse_server_message(frame)), now)

    def tick(self, now: float) -> list[Action]:
        return self.handle(Tick(), now)

    def job_finished(self, job: str, result: RunResult | Terminal, now: float) -> list[Action]:
        message = (
            result
            if isinstance(result, Terminal)
            else terminal_message(job, result, self.settings.max_message_bytes)
        )
        return self.handle(JobFinished(job, message), now)

    def host_checked(self, problem: str | None, now: float) -> list[Action]:
        return self.handle(HostChecked(problem), now)

    def host_checked_verdict(self, verdict: HostChecked, now: float) -> list[Action]:
        return self.handle(verdict, now)

    def shutdown(self, now: float) -> list[Action]:
        return self.handle(ShutdownRequested(), now)

    @property
    def stopped(self) -> bool:
        return self.state is State.STOPPED

    @property
    def connected(self) -> bool:
        return self.state not in (State.DISCONNECTED, State.STOPPED)

    def next_timer(self) -> float | None:
        """The `now` at which `tick` must be called next (None: only other inputs matter)."""
        times: list[float] = []
        if self.stop_deadline is not None:
            times.append(self.stop_deadline)
        if self.state is State.AWAITING_ACK and self.in_flight is not None:
            times.append(self.in_flight.deadline)
        elif self.state is State.POLLING and self.poll_deadline is not None:
            times.append(self.poll_deadline)
        elif self.state is State.IDLE:
            if self._heartbeat_due_at() is not None:
                times.append(self._heartbeat_due_at() or 0.0)
            if self.host_recheck_at is not None and self.job is None and not self.pending:
                times.append(self.host_recheck_at)
        return min(times) if times else None

    # -- handlers: connection ------------------------------------------------------------------------
    def _on_connected(self, _: Connected, now: float) -> list[Action]:
        self.state = State.IDLE
        self.in_flight = None
        self.poll_deadline = None
        self.host_recheck_at = None
        if self.job is not None and self.job.phase is JobPhase.RUNNING:
            self.job.phase = JobPhase.DETACHED  # the new connection is idle on the server
        return self._pump(now)

    def _on_disconnected(self, event: Disconnected, now: float) -> list[Action]:
        return self._go_down()

    def _on_connected_twice(self, _: Connected, now: float) -> list[Action]:
        return self._reconnect("a second connection opened while one was up")

    def _ignore_disconnect(self, _: Disconnected, now: float) -> list[Action]:
        return []  # already down (we dropped it ourselves)

    def _go_down(self) -> list[Action]:
        """The connection is gone (lost, or dropped by us): what survives it."""
        actions: list[Action] = []
        self.state = State.DISCONNECTED
        self.in_flight = None
        self.poll_deadline = None
        self.polling_paused = False
        job = self.job
        if job is not None and job.phase is JobPhase.REJECTED:
            self.job = None
            actions += self._queue_terminal(failed_message(job.uuid, job.rejected or "job rejected"))
        elif job is not None and job.phase is JobPhase.STARTING:
            # The server may not know the job started (and a `completed` for a job it has only
            # claimed drops the connection): do not run it; say so when back.
            if not job.cancel_requested:
                job.cancel_requested = True
                actions.append(CancelJob(job.uuid))
            job.phase = JobPhase.CANCELED
            actions += self._queue_terminal(
                failed_message(job.uuid, "the connection to the API was lost before the job started")
            )
            actions.append(Log(logging.WARNING, f"job {job.uuid}: connection lost before it started"))
        elif job is not None and job.phase is JobPhase.RUNNING:
            job.phase = JobPhase.DETACHED
        if self.shutting_down and self.job is None:
            return actions + self._stop(0, None)  # what is not acked stays in the outbox
        return actions

    # -- handlers: the server's messages -------------------------------------------------------------
    def _on_ack(self, msg: Ack, now: float) -> list[Action]:
        inflight = self.in_flight
        assert inflight is not None
        if inflight.kind == "terminal":
            if msg.job is not None and msg.job != inflight.job:
                return [
                    Log(logging.WARNING, f"ack for job {msg.job} while waiting for {inflight.job}; ignored")
                ]
            self.in_flight = None
            self.state = State.IDLE
            self.pending = [p for p in self.pending if p.job != inflight.job]
            return [DropTerminal(inflight.job), *self._pump(now)]
        if msg.job is not None and msg.job != inflight.job:
            return self._reconnect(f"ack for job {msg.job} while running job {inflight.job}")
        self.in_flight = None
        self.state = State.IDLE
        job = self.job
        if inflight.kind == "running" and job is not None and job.phase is JobPhase.STARTING:
            job.phase = JobPhase.RUNNING
        return self._pump(now)

    def _on_cancel(self, _: Cancel, now: float) -> list[Action]:
        inflight, job = self.in_flight, self.job
        assert inflight is not None
        if inflight.kind == "terminal" or job is None or job.uuid != inflight.job:
            return [Log(logging.WARNING, "`cancel` with no job running ignored")]
        self.in_flight = None
        self.state = State.IDLE  # the server is idle again after a `cancel`
        actions: list[Action] = [Log(logging.INFO, f"job {job.uuid} canceled by the server")]
        rejected = job.phase is JobPhase.REJECTED
        job.phase = JobPhase.CANCELED
        if not job.cancel_requested:
            job.cancel_requested = True
            actions.append(CancelJob(job.uuid))
        if rejected:
            self.job = None  # nothing runs, so no result will follow
        actions += self._queue_terminal(canceled_message(job.uuid))
        return actions + self._pump(now)

    def _on_job(self, offer: JobOffer, now: float) -> list[Action]:
        self.poll_deadline = None
        self.state = State.IDLE
        uuid = offer.uuid
        try:
            if not isinstance(uuid, str) or not _is_uuid(uuid):
                raise SpecError(f"uuid={uuid!r}: a job's uuid must be a UUID")
            claimed = parse_job(offer.raw)
            config = build_config_from_job(claimed, self.settings.host_settings)
        except SpecError as err:
            if not isinstance(uuid, str) or not uuid:
                return self._reconnect(f"`job` without a usable uuid: {err}")
            self.job = _Job(uuid, phase=JobPhase.REJECTED, rejected=str(err))  # nothing runs
            return [Log(logging.WARNING, f"job {uuid!r} rejected: {err}"), *self._pump(now)]
        polling_paused, self.polling_paused = self.polling_paused, False
        if polling_paused:  # handed a job although we said we are paused: as upstream, no `running`
            reason = "; ".join(self.paused) or "paused"
            self.job = _Job(claimed.uuid, phase=JobPhase.REJECTED, running_sent=True,
                            rejected=f"the runner is paused and takes no job: {reason}")  # fmt: skip
            return self._pump(now)
        self.job = _Job(claimed.uuid)
        config = _started_at(config, now)
        return [
            *self._pump(now),  # `running` first: the server's silence timer runs from the claim
            Log(logging.INFO, f"job {claimed.uuid} claimed"),
            StartJob(claimed.uuid, config),
        ]

    def _on_no_job(self, _: NoJob, now: float) -> list[Action]:
        self.poll_deadline = None
        self.polling_paused = False
        self.state = State.IDLE
        return self._pump(now)

    def _on_update(self, msg: Update, now: float) -> list[Action]:
        self.poll_deadline = None
        self.polling_paused = False
        self.state = State.IDLE
        update = UpdateAvailable(msg.version, msg.url, msg.checksum)
        if self.settings.auto_update:
            return [update, *self._stop(EXIT_UPDATE, f"runner update {update.version} available")]
        return [update, *self._reconnect("the server sent `update` (auto-update is off)")]

    def _stale_ack(self, msg: Ack, now: float) -> list[Action]:
        return [Log(logging.DEBUG, f"stale ack ignored (job {msg.job})")]

    def _unexpected_job(self, offer: JobOffer, now: float) -> list[Action]:
        # The server thinks we asked for a job: it will fail this claim after its heartbeat timeout.
        return self._reconnect(f"`job` {offer.uuid!r} received while not polling for one")

    def _cancel_while_polling(self, _: Cancel, now: float) -> list[Action]:
        return self._reconnect("`cancel` received while polling for a job")

    def _garbage(self, msg: Garbage, now: float) -> list[Action]:
        return [Log(logging.WARNING, f"{msg.why} from the server ignored")]

    def _out_of_turn(self, event: Input) -> list[Action]:
        what = type(event.message).__name__ if isinstance(event, Received) else type(event).__name__
        return [Log(logging.WARNING, f"`{what}` from the server ignored in state {self.state.value}")]

    # -- handlers: local inputs ----------------------------------------------------------------------
    def _on_tick(self, _: Tick, now: float) -> list[Action]:
        if self.stop_deadline is not None and now >= self.stop_deadline:
            return self._stop(0, None, "shutting down: stopped waiting for the server")
        if self.state is State.AWAITING_ACK and self.in_flight is not None and now >= self.in_flight.deadline:
            kind = self.in_flight.kind
            if self.shutting_down and self.job is None:
                return self._stop(0, None, f"shutting down: no reply to `{kind}`; it stays in the outbox")
            return self._reconnect(f"no reply to `{kind}` within {self.settings.ack_timeout:g} s")
        if self.state is State.POLLING and self.poll_deadline is not None and now >= self.poll_deadline:
            return self._reconnect("no `job` or `no_job` before the poll deadline")
        if self.state is State.IDLE:
            if self.host_recheck_at is not None and now >= self.host_recheck_at:
                self.host_recheck_at = None
            return self._pump(now)
        return []

    def _on_job_finished(self, event: JobFinished, now: float) -> list[Action]:
        job = self.job
        if job is None or job.uuid != event.job:
            return [Log(logging.ERROR, f"result for unknown job {event.job} ignored")]
        self.job = None
        actions: list[Action] = []
        if job.phase is JobPhase.CANCELED:
            actions.append(Log(logging.INFO, f"job {job.uuid} ended after it was canceled; result discarded"))
        else:
            actions += self._queue_terminal(event.message)
            actions.append(Log(logging.INFO, f"job {job.uuid} {event.message.event}"))
        if self.shutting_down:
            if self._hurry or not self.connected:
                return actions + self._stop(0, None)
            self.stop_deadline = now + self.settings.ack_timeout  # one ack timeout to deliver it
        return actions + self._pump(now)

    def _on_host_checked(self, event: HostChecked, now: float) -> list[Action]:
        if self.state is State.CHECKING:
            self.state = State.IDLE
        actions: list[Action] = []
        self.health = event.health
        if event.problem is not None:  # cannot run jobs: an error, re-checked with backoff
            if event.problem != self.host_problem:
                actions.append(Log(logging.ERROR, f"not asking for jobs: {event.problem}"))
            self.host_problem = event.problem
            self.host_recheck_at = now + self._recheck_delay
            self._recheck_delay = min(self._recheck_delay * 2, HOST_RECHECK_MAX_S)
            return actions
        if self.host_problem is not None:
            actions.append(Log(logging.WARNING, "this host can run jobs again: asking for jobs"))
        self.host_problem = None
        self._recheck_delay = HOST_RECHECK_MIN_S
        if event.pause:  # should not run jobs now: paused, re-checked every second
            if event.pause != self.paused:
                actions.append(Log(logging.WARNING, f"paused, asking for no job: {'; '.join(event.pause)}"))
                self.paused_since = self.paused_since or self.wall_clock()
            self.paused = event.pause
            self.pause_reasons = event.reasons
            if (
                self.settings.announce_pause
                and event.reasons  # `paused` needs reasons upstream knows (throttling has none)
                and self.state is State.IDLE
                and self.job is None
                and not self.pending
            ):
                return actions + self._poll(now, paused=True)
            self.host_recheck_at = now + PAUSE_RECHECK_S
            return actions
        if self.paused:
            actions.append(Log(logging.WARNING, "pause over: asking for jobs again"))
        self.paused, self.pause_reasons, self.paused_since = (), (), None
        self.host_recheck_at = None
        return actions + self._pump(now, host_ok=True)

    def _on_shutdown(self, _: ShutdownRequested, now: float) -> list[Action]:
        """First request: no new job; cancel (or finish) the running one; deliver what is queued within
        one ack timeout. A second request: kill the job, stop as soon as its result is saved."""
        actions: list[Action] = []
        job = self.job
        if job is not None and job.phase is JobPhase.REJECTED:  # nothing runs: save its `failed` now
            self.job = None
            actions += self._queue_terminal(failed_message(job.uuid, job.rejected or "job rejected"))
            job = None
        if self.shutting_down:
            self._hurry = True
            if job is None:
                return actions + self._stop(0, None)
            if not job.cancel_requested:
                job.cancel_requested = True
                actions.append(CancelJob(job.uuid))
            self.stop_deadline = min(
                self.stop_deadline or now + SHUTDOWN_CANCEL_WAIT_S, now + SHUTDOWN_CANCEL_WAIT_S
            )
            return [*actions, Log(logging.WARNING, f"shutting down now: job {job.uuid} is killed")]
        self.shutting_down = True
        if job is None:
            if self.state is State.AWAITING_ACK or (self.state is State.IDLE and self.pending):
                self.stop_deadline = now + self.settings.ack_timeout  # deliver what is queued, briefly
                return actions + self._pump(now)
            return actions + self._stop(0, None)
        if self.settings.shutdown_cancels and not job.cancel_requested:
            job.cancel_requested = True
            actions.append(CancelJob(job.uuid))
            actions.append(Log(logging.INFO, f"shutting down: canceling job {job.uuid}"))
            self.stop_deadline = now + SHUTDOWN_CANCEL_WAIT_S  # a job that does not stop is left behind
        else:
            actions.append(Log(logging.INFO, f"shutting down after job {job.uuid} finishes"))
        return actions + self._pump(now)

    # -- internals -----------------------------------------------------------------------------------
    def _heartbeat_due_at(self) -> float | None:
        job = self.job
        if job is None or job.phase is not JobPhase.RUNNING or self.pending:
            return None
        return job.next_heartbeat

    def _send(
        self, kind: Literal["running", "heartbeat", "terminal"], job: str, msg: RunnerMessage, now: float
    ) -> Send:
        self.state = State.AWAITING_ACK
        self.in_flight = _InFlight(kind, job, now + self.settings.ack_timeout)
        return Send(msg)

    def _queue_terminal(self, msg: Terminal) -> list[Action]:
        self.pending = [p for p in self.pending if p.job != msg.job]
        self.pending.append(_Pending(msg))
        return [PersistTerminal(msg)]

    def _pump(self, now: float, host_ok: bool = False) -> list[Action]:
        """In IDLE: send the next message that is due, if any."""
        if self.state is not State.IDLE:
            return []
        job = self.job
        if job is not None and job.phase in (JobPhase.STARTING, JobPhase.REJECTED) and not job.running_sent:
            job.running_sent = True
            job.next_heartbeat = now + self.settings.heartbeat_interval
            return [self._send("running", job.uuid, Running(), now)]
        actions: list[Action] = []
        if job is not None and job.phase is JobPhase.REJECTED and job.running_sent:
            self.job = None
            actions += self._queue_terminal(failed_message(job.uuid, job.rejected or "job rejected"))
            job = None
        if self.pending:
            first = self.pending[0]
            limit = MAX_CANCELED_ATTEMPTS if first.message.event == "canceled" else MAX_TERMINAL_ATTEMPTS
            if first.attempts >= limit:
                self.pending.pop(0)
                event, attempts = first.message.event, first.attempts
                text = f"giving up on the `{event}` of job {first.job} after {attempts} sends"
                return [*actions, Log(logging.ERROR, text), ParkTerminal(first.job), *self._pump(now)]
            first.attempts += 1
            return [*actions, self._send("terminal", first.job, first.message, now)]
        if job is not None:
            if job.phase is JobPhase.RUNNING and now >= job.next_heartbeat:
                job.next_heartbeat = max(job.next_heartbeat + self.settings.heartbeat_interval, now + 0.5)
                return [*actions, self._send("heartbeat", job.uuid, Heartbeat(), now)]
            return actions
        if self.shutting_down:
            return [*actions, *self._stop(0, None)]
        if self.settings.check_host and not host_ok:
            if self.host_recheck_at is not None:  # unfit: wait for the re-check time
                return actions
            self.state = State.CHECKING
            return [*actions, CheckHost()]
        return [*actions, *self._poll(now)]

    def _poll(self, now: float, *, paused: bool = False) -> list[Action]:
        """`ready` (or, paused with --announce-pause, `paused`): the server's answer ends the poll."""
        self.state = State.POLLING
        self.poll_deadline = now + self.settings.poll_timeout + self.settings.poll_margin
        self.polling_paused = paused
        health = self.health if self.settings.announce_pause else None
        ready = Ready(self.settings.poll_timeout, self.settings.runner_metadata, health)
        if paused:
            return [Send(Paused(ready, self.pause_reasons, self.paused_since or self.wall_clock()))]
        return [Send(ready)]

    def _reconnect(self, reason: str) -> list[Action]:
        """Drop the connection now (the state is DISCONNECTED at once, so no timer fires again); the
        driver connects again after a backoff."""
        actions: list[Action] = [Log(logging.WARNING, f"reconnecting: {reason}"), Reconnect(reason)]
        return actions + self._go_down()

    def _stop(self, code: int, error: str | None, why: str | None = None) -> list[Action]:
        self.state = State.STOPPED
        self.stop_deadline = None
        self.in_flight = None
        self.poll_deadline = None
        actions: list[Action] = [Log(logging.WARNING, why)] if why else []
        return [*actions, Stop(code, error)]


def _rfc3339_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_uuid(text: str) -> bool:
    try:
        return str(uuidlib.UUID(text)) == text.lower()
    except ValueError:
        return False


def _started_at(config: RunConfig, now: float) -> RunConfig:
    """The job's clock starts when it is claimed (`running` goes out now, and the server counts its hard
    limit from there): its one deadline, across pull, boots and iterations, counts from this instant."""
    return config.with_clock(now)


S = State
# What each input does in each state: (state, input or server-message type) -> handler. A `None`
# state is the default for every state without an entry of its own; a pair in neither place is
# logged and ignored (`_out_of_turn`). STOPPED takes no input at all.
TRANSITIONS: dict[tuple[State | None, type], Handler] = {
    # connection
    (S.DISCONNECTED, Connected): RunnerProtocol._on_connected,
    (None, Connected): RunnerProtocol._on_connected_twice,
    (S.DISCONNECTED, Disconnected): RunnerProtocol._ignore_disconnect,
    (None, Disconnected): RunnerProtocol._on_disconnected,
    # the server's messages
    (S.POLLING, JobOffer): RunnerProtocol._on_job,
    (S.POLLING, NoJob): RunnerProtocol._on_no_job,
    (S.POLLING, Update): RunnerProtocol._on_update,
    (S.POLLING, Cancel): RunnerProtocol._cancel_while_polling,
    (S.AWAITING_ACK, Ack): RunnerProtocol._on_ack,
    (S.AWAITING_ACK, Cancel): RunnerProtocol._on_cancel,
    (None, JobOffer): RunnerProtocol._unexpected_job,
    (None, Ack): RunnerProtocol._stale_ack,
    (None, Garbage): RunnerProtocol._garbage,
    # NoJob, Update and Cancel anywhere else: logged and ignored (`_out_of_turn`)
    # local inputs
    (None, Tick): RunnerProtocol._on_tick,
    (None, JobFinished): RunnerProtocol._on_job_finished,
    (None, HostChecked): RunnerProtocol._on_host_checked,
    (None, ShutdownRequested): RunnerProtocol._on_shutdown,
}
