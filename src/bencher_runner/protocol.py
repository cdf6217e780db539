"""Sans-IO state machine of the runner side of the Bencher runner channel (design/PROTOCOL.md).

It owns every protocol decision so that they can be tested by feeding it frames and times: the asyncio
driver only moves frames, runs jobs and executes the actions returned here. No sockets, no clocks, no
threads: every input carries ``now`` (monotonic seconds).

One message is in flight at a time (send, wait for its reply, then the next), which is how the `ack` of a
terminal message is told apart from a heartbeat's. Terminal messages go through the durable outbox:
`PersistTerminal` comes before the `Send`, `DropTerminal` after the matching `ack`.

Decisions for what the server may send out of turn (the server never gets an answer to these):

=============================================  ================================================
input                                          handling
=============================================  ================================================
malformed JSON / not an object / no `event`    log (warning), ignore; a missing reply times out
unknown `event`                                log (warning), ignore
`ack` with nothing in flight (stale)           ignore (debug)
`ack` for another job while a terminal waits   log (warning), ignore; the ack timeout resends
`ack` for another job while a job runs         log (error), reconnect (the server lost track)
`job` while a job is in flight / not asked     log (error), reconnect (the server fails the stray
                                               claim after its heartbeat timeout)
`job` that does not parse / cannot run here    `running`, then `failed` with empty results
`no_job` / `update` while not polling          log (warning), ignore
`cancel` while idle / while a terminal waits   log (warning), ignore
no reply within ``ack_timeout``                reconnect (terminal messages are resent)
no `job`/`no_job` within poll_timeout + 30 s   reconnect
connection lost before `running` was acked     cancel the job locally, report `failed`
connection lost later                          the job keeps running; its result is sent after a
                                               reconnect (nothing else is sent until then)
=============================================  ================================================
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bencher_runner.spec.config import RunConfig
from bencher_runner.spec.errors import SpecError
from bencher_runner.spec.jobspec import JobOptions, build_config_from_job, parse_job
from bencher_runner.spec.results import RunResult

DEFAULT_POLL_TIMEOUT = 55
POLL_MARGIN_S = 30.0
HEARTBEAT_INTERVAL_S = 1.0
ACK_TIMEOUT_S = 5.0
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024 - 64 * 1024  # the server's 4 MiB frame cap, minus margin
MAX_TERMINAL_ATTEMPTS = 20  # sends of one terminal message before it is given up (logged as an error)
EXIT_UPDATE = 75
TRUNCATION_NOTE = "\n[truncated by bencher-runner: the result exceeded the message size limit]"

Message = dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# Actions


@dataclass(frozen=True)
class Send:
    """Send this message as one JSON text frame."""

    message: Message


@dataclass(frozen=True)
class StartJob:
    """Run this job (in a worker thread) and call `job_finished` with its result."""

    job: str
    config: RunConfig


@dataclass(frozen=True)
class CancelJob:
    """Set the job's cancel event: the VM is killed, then `job_finished` still follows."""

    job: str


@dataclass(frozen=True)
class PersistTerminal:
    """Write this terminal message to the durable outbox (before the `Send` that follows)."""

    job: str
    message: Message


@dataclass(frozen=True)
class DropTerminal:
    """The server acked the job's terminal message: remove it from the outbox."""

    job: str


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
    Send | StartJob | CancelJob | PersistTerminal | DropTerminal | Reconnect | UpdateAvailable | Stop | Log
)


# ---------------------------------------------------------------------------------------------------
# Terminal messages


def _wire_len(value: str) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode())


def _truncate_largest(results: list[Message], excess: int) -> bool:
    """Cut the largest (on the wire) stdout/stderr/output string by about `excess` bytes; False if
    there is nothing left to cut."""
    best: tuple[int, dict[str, Any], str] | None = None
    for entry in results:
        holders: list[tuple[dict[str, Any], str]] = [(entry, k) for k in ("stdout", "stderr")]
        output = entry.get("output")
        if isinstance(output, dict):
            holders += [(output, k) for k in output]
        for holder, key in holders:
            value = holder.get(key)
            if isinstance(value, str) and value:
                size = _wire_len(value)
                if best is None or size > best[0]:
                    best = (size, holder, key)
    if best is None:
        return False
    size, holder, key = best
    value = holder[key]
    if value.endswith(TRUNCATION_NOTE):
        value = value[: -len(TRUNCATION_NOTE)]
    target = size - excess - len(TRUNCATION_NOTE) - 16
    keep = int(len(value) * target / size) if target > 0 else 0
    keep = min(keep, len(value) - 1)
    holder[key] = value[:keep] + TRUNCATION_NOTE if keep > 0 else ""
    if not holder[key] and key in ("stdout", "stderr"):
        del holder[key]
    return True


def encode(message: Message) -> str:
    """The wire form of a message (compact JSON, UTF-8 kept as is)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def cap_message(message: Message, max_bytes: int) -> Message:
    """Shrink the outputs of a terminal message until its wire form fits in `max_bytes`; say so."""
    if len(encode(message).encode()) <= max_bytes:
        return message
    msg = json.loads(encode(message))
    results: list[Message] = msg.get("results", [])
    original_error = msg.get("error")
    dropped = 0
    for _ in range(10_000):
        note = "outputs truncated to fit the message size limit"
        if dropped:
            note += f"; {dropped} iteration result(s) dropped"
        if msg["event"] == "failed":
            msg["error"] = f"{original_error or ''} ({note})"
        size = len(encode(msg).encode())
        if size <= max_bytes:
            break
        if not _truncate_largest(results, size - max_bytes):
            if not results:
                break
            results.pop()
            dropped += 1
    return dict(msg)


def terminal_message(job: str, result: RunResult, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """`completed` or `failed` for a RunResult, capped under `max_bytes`."""
    results = [r.to_protocol() for r in result.results]
    if result.status == "completed":
        message: Message = {"event": "completed", "job": job, "results": results}
    else:
        message = {"event": "failed", "job": job, "results": results, "error": result.error or "job failed"}
    return cap_message(message, max_bytes)


def failed_message(job: str, error: str) -> Message:
    return {"event": "failed", "job": job, "results": [], "error": error}


# ---------------------------------------------------------------------------------------------------
# State


@dataclass
class _Job:
    uuid: str
    attached: bool = True  # started on the current connection
    running_sent: bool = False
    running_acked: bool = False
    canceled: bool = False  # a cancel was requested (server or shutdown); the thread may still run
    server_canceled: bool = False
    rejected: str | None = None  # cannot run here: `running`, then `failed` with this error
    next_heartbeat: float = 0.0


@dataclass
class _Pending:
    job: str
    message: Message
    attempts: int = 0


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
    job_options: JobOptions = field(default_factory=JobOptions)


class RunnerProtocol:
    """Inputs: `connected`, `received`, `tick`, `job_finished`, `disconnected`, `shutdown`.
    Each returns the actions to execute, in order."""

    def __init__(self, settings: ProtocolSettings, pending: Sequence[tuple[str, Message]] = ()) -> None:
        if not 1 <= settings.poll_timeout <= 900:
            raise SpecError(f"poll_timeout={settings.poll_timeout}: must be 1..900 seconds")
        self.settings = settings
        self.connected = False
        self.job: _Job | None = None
        self.pending: list[_Pending] = [_Pending(job, msg) for job, msg in pending]
        self.in_flight: _InFlight | None = None
        self.poll_deadline: float | None = None  # `ready` sent, waiting for job/no_job/update
        self.shutting_down = False
        self.stopped = False

    # -- derived state, for logs and tests -----------------------------------------------------------
    @property
    def state(self) -> str:
        if self.stopped:
            return "stopped"
        if not self.connected:
            return "disconnected"
        if self.in_flight is not None and self.in_flight.kind == "terminal":
            return "reporting"
        if self.job is not None:
            return "running"
        if self.poll_deadline is not None:
            return "awaiting_job"
        return "idle"

    def next_timer(self) -> float | None:
        """The `now` at which `tick` must be called next (None: only other inputs matter)."""
        times: list[float] = []
        if self.in_flight is not None:
            times.append(self.in_flight.deadline)
        elif self.connected and self.job is not None and self._may_heartbeat():
            times.append(self.job.next_heartbeat)
        if self.poll_deadline is not None:
            times.append(self.poll_deadline)
        return min(times) if times else None

    # -- inputs --------------------------------------------------------------------------------------
    def connect(self, now: float) -> list[Action]:
        """A WebSocket is open: resend the outbox, then `ready` (or wait for a detached job)."""
        self.connected = True
        self.in_flight = None
        self.poll_deadline = None
        if self.job is not None:
            self.job.attached = False
        return self._pump(now)

    def disconnected(self, now: float) -> list[Action]:
        """The connection is gone (closed by either side, or after a `Reconnect`)."""
        actions: list[Action] = []
        self.connected = False
        self.in_flight = None
        self.poll_deadline = None
        job = self.job
        if job is not None and job.rejected is not None:
            self.job = None
            actions += self._queue_terminal(failed_message(job.uuid, job.rejected))
        elif job is not None and job.attached and not job.running_acked and not job.canceled:
            # The server may not know the job started: do not run it; say so when back.
            job.canceled = True
            actions.append(CancelJob(job.uuid))
            actions += self._queue_terminal(
                failed_message(job.uuid, "the connection to the API was lost before the job started")
            )
            actions.append(Log(logging.WARNING, f"job {job.uuid}: connection lost before it started"))
        if self.shutting_down and self.job is None:
            actions += self._stop(0)
        return actions

    def shutdown(self, now: float) -> list[Action]:
        """SIGTERM/SIGINT: take no more jobs; cancel or finish the current one; flush; stop."""
        actions: list[Action] = []
        if self.shutting_down:
            return actions
        self.shutting_down = True
        job = self.job
        if job is not None and self.settings.shutdown_cancels and not job.canceled:
            job.canceled = True
            actions.append(CancelJob(job.uuid))
            actions.append(Log(logging.INFO, f"shutting down: canceling job {job.uuid}"))
        elif job is not None:
            actions.append(Log(logging.INFO, f"shutting down after job {job.uuid} finishes"))
        if self.job is None and (not self.connected or self.in_flight is None):
            return actions + self._stop(0)
        return actions + self._pump(now)

    def tick(self, now: float) -> list[Action]:
        inflight = self.in_flight
        if inflight is not None and now >= inflight.deadline:
            return self._reconnect(f"no reply to `{inflight.kind}` within {self.settings.ack_timeout:g} s")
        if self.poll_deadline is not None and now >= self.poll_deadline:
            return self._reconnect("no `job` or `no_job` before the poll deadline")
        return self._pump(now)

    def job_finished(self, job_id: str, result: RunResult, now: float) -> list[Action]:
        """The executor returned (after a cancel too)."""
        job = self.job
        if job is None or job.uuid != job_id:
            return [Log(logging.ERROR, f"result for unknown job {job_id} ignored")]
        self.job = None
        actions: list[Action] = []
        if job.canceled and (job.server_canceled or not job.running_acked):
            actions.append(Log(logging.INFO, f"job {job_id} ended after it was canceled; result discarded"))
        else:
            msg = terminal_message(job_id, result, self.settings.max_message_bytes)
            actions += self._queue_terminal(msg)
            actions.append(Log(logging.INFO, f"job {job_id} {msg['event']}"))
        if self.shutting_down and not self.connected:
            return actions + self._stop(0)
        return actions + self._pump(now)

    def received(self, text: str | bytes, now: float) -> list[Action]:
        if isinstance(text, bytes):
            return [Log(logging.WARNING, "binary frame from the server ignored")]
        try:
            msg = json.loads(text)
        except ValueError:
            return [Log(logging.WARNING, f"malformed JSON from the server ignored: {text[:200]!r}")]
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            return [Log(logging.WARNING, f"message without an event ignored: {text[:200]!r}")]
        handler = getattr(self, f"_on_{msg['event']}", None)
        if handler is None:
            return [Log(logging.WARNING, f"unknown event {msg['event']!r} from the server ignored")]
        actions: list[Action] = handler(msg, now)
        return actions

    # -- handlers ------------------------------------------------------------------------------------
    def _on_ack(self, msg: Message, now: float) -> list[Action]:
        inflight = self.in_flight
        acked = msg.get("job")
        if inflight is None:
            return [Log(logging.DEBUG, f"stale ack ignored (job {acked})")]
        if inflight.kind == "terminal":
            if acked != inflight.job:
                return [
                    Log(logging.WARNING, f"ack for job {acked} while waiting for {inflight.job}; ignored")
                ]
            self.in_flight = None
            self.pending = [p for p in self.pending if p.job != inflight.job]
            return [DropTerminal(inflight.job), *self._pump(now)]
        if acked is not None and acked != inflight.job:
            return self._reconnect(f"ack for job {acked} while running job {inflight.job}")
        self.in_flight = None
        if inflight.kind == "running" and self.job is not None and self.job.uuid == inflight.job:
            self.job.running_acked = True
        return self._pump(now)

    def _on_cancel(self, msg: Message, now: float) -> list[Action]:
        inflight, job = self.in_flight, self.job
        if inflight is None or inflight.kind == "terminal" or job is None or job.uuid != inflight.job:
            return [Log(logging.WARNING, "`cancel` with no job running ignored")]
        self.in_flight = None
        actions: list[Action] = [Log(logging.INFO, f"job {job.uuid} canceled by the server")]
        job.server_canceled = True
        if not job.canceled:
            job.canceled = True
            actions.append(CancelJob(job.uuid))
        if job.rejected is not None:
            self.job = None  # nothing runs, so no result will follow
        actions += self._queue_terminal({"event": "canceled", "job": job.uuid})
        return actions + self._pump(now)

    def _on_job(self, msg: Message, now: float) -> list[Action]:
        if self.poll_deadline is None or self.job is not None:
            return self._reconnect("`job` received while not polling for one")
        self.poll_deadline = None
        uuid = msg.get("uuid")
        try:
            claimed = parse_job(msg)
            config = build_config_from_job(claimed, self.settings.job_options)
        except SpecError as err:
            if not isinstance(uuid, str) or not uuid:
                return self._reconnect(f"`job` without a usable uuid: {err}")
            self.job = _Job(uuid, rejected=str(err))  # nothing runs
            return [Log(logging.WARNING, f"job {uuid} rejected: {err}"), *self._pump(now)]
        self.job = _Job(claimed.uuid)
        started: list[Action] = [
            Log(logging.INFO, f"job {claimed.uuid} claimed"),
            StartJob(claimed.uuid, config),
        ]
        return self._pump(now) + started

    def _on_no_job(self, msg: Message, now: float) -> list[Action]:
        if self.poll_deadline is None:
            return [Log(logging.WARNING, "`no_job` while not polling ignored")]
        self.poll_deadline = None
        if self.shutting_down:
            return self._stop(0)
        return self._pump(now)

    def _on_update(self, msg: Message, now: float) -> list[Action]:
        if self.poll_deadline is None:
            return [Log(logging.WARNING, "`update` while not polling ignored")]
        self.poll_deadline = None
        update = UpdateAvailable(str(msg.get("version")), str(msg.get("url")), str(msg.get("checksum")))
        if self.settings.auto_update:
            return [update, *self._stop(EXIT_UPDATE, f"runner update {update.version} available")]
        return [update, *self._reconnect("the server sent `update` (auto-update is off)")]

    # -- internals -----------------------------------------------------------------------------------
    def _may_heartbeat(self) -> bool:
        job = self.job
        return job is not None and job.attached and job.running_acked and not job.server_canceled

    def _send(
        self, kind: Literal["running", "heartbeat", "terminal"], job: str, msg: Message, now: float
    ) -> Send:
        self.in_flight = _InFlight(kind, job, now + self.settings.ack_timeout)
        return Send(msg)

    def _queue_terminal(self, msg: Message) -> list[Action]:
        job = str(msg["job"])
        self.pending = [p for p in self.pending if p.job != job]
        self.pending.append(_Pending(job, msg))
        return [PersistTerminal(job, msg)]

    def _pump(self, now: float) -> list[Action]:
        """Send the next message if nothing is in flight."""
        if not self.connected or self.in_flight is not None or self.stopped:
            return []
        job = self.job
        if job is not None and job.attached and not job.running_sent:
            job.running_sent = True
            job.next_heartbeat = now + self.settings.heartbeat_interval
            return [self._send("running", job.uuid, {"event": "running"}, now)]
        actions: list[Action] = []
        if job is not None and job.rejected is not None and job.running_acked:
            self.job = None
            actions += self._queue_terminal(failed_message(job.uuid, job.rejected))
            job = None
        if self.pending:
            first = self.pending[0]
            if first.attempts >= MAX_TERMINAL_ATTEMPTS:
                self.pending.pop(0)
                text = f"giving up on the result of job {first.job} after {first.attempts} sends"
                return [*actions, Log(logging.ERROR, text), DropTerminal(first.job), *self._pump(now)]
            first.attempts += 1
            return [*actions, self._send("terminal", first.job, first.message, now)]
        if job is not None:
            if self._may_heartbeat() and now >= job.next_heartbeat:
                job.next_heartbeat = max(job.next_heartbeat + self.settings.heartbeat_interval, now + 0.5)
                return [self._send("heartbeat", job.uuid, {"event": "heartbeat"}, now)]
            return []
        if self.shutting_down:
            return self._stop(0)
        if self.poll_deadline is None:
            self.poll_deadline = now + self.settings.poll_timeout + self.settings.poll_margin
            ready: Message = {"event": "ready", "poll_timeout": self.settings.poll_timeout}
            if self.settings.runner_metadata is not None:
                ready["runner"] = self.settings.runner_metadata
            return [Send(ready)]
        return []

    def _reconnect(self, reason: str) -> list[Action]:
        return [Log(logging.WARNING, f"reconnecting: {reason}"), Reconnect(reason)]

    def _stop(self, code: int, error: str | None = None) -> list[Action]:
        self.stopped = True
        return [Stop(code, error)]
