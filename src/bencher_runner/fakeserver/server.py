"""A fake Bencher API server that behaves like v0.6.12 on the runner channel (protocol notes section 6.1).

One WebSocket per connection runs the server's three states in a loop: Idle (waiting for `ready`; idle
retries of terminal messages), Polling (the `ready` long poll) and Executing (one claimed job). What
each state does with each frame, which close it sends and when it spawns the disconnect timeout follow
`plus/api_runners/src/channel.rs`; the job rules live in `jobs.py`, the parsing rules in `wire.py`.
Fault injection (`inject`) and an injectable clock are explicit options for tests; the defaults behave
like the real server in real time.
"""

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bencher_runner.fakeserver import wire
from bencher_runner.fakeserver.connection import ChannelConnection
from bencher_runner.fakeserver.jobs import (
    HAS_RUN,
    FakeJob,
    InvalidTransition,
    JobStatus,
    JobStore,
    Priority,
    Reply,
    ResultCheck,
    RunnerRecord,
    accept_all,
)

log = logging.getLogger(__name__)

DEFAULT_KEY = "bencher_runner_" + "a1" * 15
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # request_body_max_bytes, 1 << 22
FAKE_OCI_TOKEN = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
SHUTDOWN_REASON = "server shutting down"
FAULT_POINTS = ("job", "ready", "running", "heartbeat", "completed", "failed", "canceled")


class Fault(StrEnum):
    """What an injected fault does to the message that hits it."""

    DROP = "drop"  # drop the connection on receipt; the message is not applied ("job": after sending it)
    DROP_AFTER = "drop-after"  # apply the message, then drop the connection without replying
    WITHHOLD = "withhold"  # apply the message, send no reply, keep the connection
    LOSE = "lose"  # neither apply nor answer the message ("job": claim it, never send it, drop)


class _Drop(Exception):
    """End the connection without a Close frame, as the real server does on every error."""


@dataclass
class LoggedFrame:
    """One data frame the server received: when, on which connection, in which state, what it was."""

    t: float
    connection: int
    state: str
    data: str | bytes
    message: dict[str, Any] | None  # the parsed JSON object when the frame is a valid RunnerMessage


def default_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "uuid": "00000000-0000-0000-0000-000000000001",
        "name": "Fake v1",
        "slug": "fake-v1",
        "os": "linux",
        "architecture": "x86_64",
        "sandbox": "firecracker",
        "cpu": 1,
        "memory": 512 * 1024 * 1024,
        "disk": 1024 * 1024 * 1024,
        "network": False,
        "fallback": None,
        "created": "2026-01-01T00:00:00Z",
        "modified": "2026-01-01T00:00:00Z",
        "archived": None,
    }
    spec.update(overrides)
    return spec


def default_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "registry": "http://127.0.0.1:5000/",
        "project": "11111111-2222-3333-4444-555555555555",
        "digest": "sha256:" + "a" * 64,
        "timeout": 60,
    }
    config.update(overrides)
    return config


def new_key() -> str:
    return wire.KEY_PREFIX + uuidlib.uuid4().hex[:30]


@dataclass
class _Session:
    id: int
    conn: ChannelConnection
    runner: RunnerRecord
    state: str = "idle"
    job: FakeJob | None = None
    shutting_down: bool = False


class FakeBencher:
    """`await FakeBencher(...).start()`; then `add_job`, `cancel`, `job_state`, `results`, `inject`, ...

    The default runner (`runner` slug, `key`) has `default_spec()` linked, so jobs added with that spec
    are claimable. `clock` is the server's clock for job timestamps (claimed, started, last heartbeat:
    the hard limit and the disconnect check read it); read timeouts and the poll deadline run on the
    event loop's clock, as the real server's tokio timers do, so tests shorten them with
    `heartbeat_timeout` and a small `poll_timeout`.
    """

    def __init__(
        self,
        *,
        runner: str = "fake-runner",
        key: str = DEFAULT_KEY,
        runner_uuid: str | None = None,
        heartbeat_timeout: float = 90.0,
        grace_period: float = 60.0,
        default_poll_timeout: int = 30,
        poll_interval: float = 1.0,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE,
        reject_with_401: bool = False,
        server_version: str | None = None,
        update_checksum: str | None = "0" * 64,
        canary_checksum: str | None = None,
        update_base: str = "https://example.invalid/",
        result_check: ResultCheck = accept_all,
        clock: Callable[[], float] = time.monotonic,
        path_prefix: str = "",
        close_timeout: float = 2.0,
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.default_poll_timeout = default_poll_timeout
        self.poll_interval = poll_interval
        self.max_message_size = max_message_size
        self.reject_with_401 = reject_with_401
        self.server_version = server_version
        self.update_checksum = update_checksum
        self.canary_checksum = canary_checksum
        self.update_base = update_base
        self.clock = clock
        self.path_prefix = path_prefix.rstrip("/")
        self.close_timeout = close_timeout
        self.store = JobStore(grace_period=grace_period, result_check=result_check)
        default = self.add_runner(runner, key=key, uuid=runner_uuid)
        default.specs.add(default_spec()["uuid"])
        self.runner = default.slug
        self.runner_uuid = default.uuid
        self.received: list[tuple[float, dict[str, Any]]] = []  # every valid RunnerMessage, any state
        self.log: list[LoggedFrame] = []  # every data frame, parsed or not
        self.connections = 0  # authenticated connections
        self.rejected_auth = 0
        self.claim_errors = 0  # claim attempts that met a job whose stored config does not deserialize
        self._claim_errors_logged: set[str] = set()
        self.port = 0
        self._server: Server | None = None
        self._sessions: dict[int, _Session] = {}
        self._faults: list[list[Any]] = []  # [point, fault, times left or None]
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._session_ids = 0

    # -- compatibility views -----------------------------------------------------------------------------
    @property
    def jobs(self) -> dict[str, FakeJob]:
        return self.store.jobs

    @property
    def grace_period(self) -> float:
        return self.store.grace_period

    @grace_period.setter
    def grace_period(self, value: float) -> None:
        self.store.grace_period = value

    @property
    def _conns(self) -> set[ServerConnection]:
        return {s.conn for s in self._sessions.values()}

    # -- lifecycle ---------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path_prefix}"

    async def start(self, port: int | None = None) -> "FakeBencher":
        """Listen on loopback; like a server start, recover jobs a previous run left in flight."""
        ChannelConnection.max_message = self.max_message_size
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            port if port is not None else self.port,
            process_request=self._process_request,
            max_size=None,  # ChannelConnection enforces the limit without a Close frame
            compression=None,  # tungstenite negotiates no extensions
            ping_interval=None,
            close_timeout=self.close_timeout,
            create_connection=ChannelConnection.limited_to(self.max_message_size),
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        for job in self.store.recover(self.clock(), self.heartbeat_timeout):
            self._spawn_timeout(job)
        return self

    async def stop(self) -> None:
        """Graceful shutdown: Close 1001 `server shutting down` on every connection, in every state; jobs
        in flight stay as they are and no timeout is scheduled (the process is going away)."""
        if self._server is None:
            return
        sessions = list(self._sessions.values())
        for s in sessions:
            s.shutting_down = True
        await asyncio.gather(*(s.conn.close(1001, SHUTDOWN_REASON) for s in sessions), return_exceptions=True)
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        self._cancel_timers()

    async def restart(self, pause: float = 0.0) -> None:
        await self.stop()
        await asyncio.sleep(pause)
        await self.start(self.port)

    async def close(self) -> None:
        await self.stop()
        self._cancel_timers()

    def _cancel_timers(self) -> None:
        for task in self._timers.values():
            task.cancel()
        self._timers.clear()

    # -- runners and jobs ----------------------------------------------------------------------------------
    def add_runner(self, slug: str, *, key: str | None = None, uuid: str | None = None) -> RunnerRecord:
        record = RunnerRecord(uuid or str(uuidlib.uuid4()), slug, wire.key_hash(key or new_key()))
        return self.store.add_runner(record)

    def runner_record(self, runner: str | None = None) -> RunnerRecord:
        found = self.store.find_runner(runner or self.runner_uuid)
        if found is None:
            raise KeyError(f"no runner {runner!r}")
        return found

    def rotate_key(self, runner: str | None = None) -> str:
        """A new key for the runner; the old one stops working at once. Archived runners: refused."""
        record = self.runner_record(runner)
        if record.archived:
            raise PermissionError(f"runner {record.slug} is archived: its key cannot be rotated")
        key = new_key()
        record.key_hash = wire.key_hash(key)
        return key

    def archive_runner(self, runner: str | None = None) -> None:
        self.runner_record(runner).archived = True

    def link_spec(self, spec_uuid: str, runner: str | None = None) -> None:
        self.runner_record(runner).specs.add(spec_uuid)

    def unlink_spec(self, spec_uuid: str, runner: str | None = None) -> None:
        self.runner_record(runner).specs.discard(spec_uuid)

    def add_job(
        self,
        *,
        spec: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        oci_token: str | None = None,
        priority: Priority = Priority.PLUS,
        organization: str = "fake-org",
        source_ip: str = "127.0.0.1",
        created: float | None = None,
        **config_fields: Any,
    ) -> str:
        """Queue a pending job. The config is stored as given; one that would not deserialize on the
        server is never sent (claim attempts error on it, as they do upstream). `oci_token` None: a
        pull-only JWT is minted at claim time."""
        cfg = config if config is not None else default_config(**config_fields)
        timeout = cfg.get("timeout") if isinstance(cfg, dict) else None
        job = FakeJob(
            str(uuidlib.uuid4()),
            spec or default_spec(),
            cfg,
            timeout if isinstance(timeout, int) and not isinstance(timeout, bool) else 0,
            priority=priority,
            organization=organization,
            source_ip=source_ip,
            created=self.clock() if created is None else created,
            created_text=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            oci_token=oci_token,
        )
        job.history.append(JobStatus.PENDING)
        return self.store.add(job).uuid

    def cancel(self, job: str) -> None:
        """An external cancel of a live job: the runner learns it on its next `running`/`heartbeat`."""
        found = self.jobs[job]
        if found.status in (JobStatus.PENDING, JobStatus.CLAIMED, JobStatus.RUNNING):
            self.store.set_status(found, JobStatus.CANCELED)

    def set_status(self, job: str, status: JobStatus | str) -> None:
        """Write a job's status directly, as the upstream tests do to simulate races."""
        self.store.set_status(self.jobs[job], JobStatus(status))

    def job_state(self, job: str) -> str:
        return self.jobs[job].status.value

    def results(self, job: str) -> dict[str, Any] | None:
        return self.jobs[job].output

    def output_writes(self, job: str) -> int:
        return self.jobs[job].output_writes

    def events(self, name: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.received if m.get("event") == name]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.02)

    # -- fault injection ---------------------------------------------------------------------------------
    def inject(self, point: str, fault: Fault | str, *, times: int | None = 1) -> None:
        """Apply `fault` to the next `times` messages (None: all of them) that reach `point`: a runner
        event the server handles (Idle or Executing), or "job" (the server has just claimed a job)."""
        if point not in FAULT_POINTS:
            raise ValueError(f"fault point {point!r} is not one of {', '.join(FAULT_POINTS)}")
        self._faults.append([point, Fault(fault), times])

    def fail_at(self, point: str, *, process: bool = False) -> None:
        """One-shot: drop the connection at `point`; with process=True the message is applied first."""
        self.inject(point, Fault.DROP_AFTER if process else Fault.DROP)

    def clear_faults(self) -> None:
        self._faults.clear()

    def _fault(self, point: str) -> Fault | None:
        for entry in self._faults:
            if entry[0] == point:
                fault: Fault = entry[1]
                if entry[2] is not None:
                    entry[2] -= 1
                    if entry[2] <= 0:
                        self._faults.remove(entry)
                return fault
        return None

    def drop_connection(self) -> None:
        """Drop every runner connection now, without a Close frame."""
        for s in self._sessions.values():
            s.conn.drop()

    async def broadcast(self, data: str | bytes) -> None:
        """Send a raw frame on every open connection (to test how a runner takes hostile frames)."""
        for s in list(self._sessions.values()):
            with contextlib.suppress(ConnectionClosed):
                await s.conn.send(data)

    # -- HTTP and auth -----------------------------------------------------------------------------------
    def _runner_path(self, request: Request) -> str | None:
        path = request.path.split("?", 1)[0]
        prefix = f"{self.path_prefix}/v0/runners/"
        if not path.startswith(prefix) or not path.endswith("/channel"):
            return None
        resource = path[len(prefix) : -len("/channel")]
        return resource if resource and "/" not in resource else None

    def _authenticate(self, request: Request) -> RunnerRecord | None:
        """`RunnerAuth::from_header`: Bearer token, key format, then a runner with that key hash, not
        archived, whose UUID or slug is the one in the path."""
        resource = self._runner_path(request)
        token = wire.bearer_token(request.headers.get("Authorization"))
        if resource is None or token is None or not wire.valid_key(token):
            return None
        runner = self.store.find_runner(resource)
        if runner is None or runner.archived or runner.key_hash != wire.key_hash(token):
            return None
        return runner

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if self._runner_path(request) is None:
            return Response(404, "Not Found", Headers(), b"Not Found\n")
        if self.reject_with_401 and self._authenticate(request) is None:
            self.rejected_auth += 1
            return Response(401, "Unauthorized", Headers(), b"Invalid runner key\n")
        return None

    # -- the channel -------------------------------------------------------------------------------------
    async def _handle(self, conn: ServerConnection) -> None:
        assert isinstance(conn, ChannelConnection) and conn.request is not None
        runner = self._authenticate(conn.request)
        if runner is None:  # the upgrade already happened: end the connection without a word
            self.rejected_auth += 1
            conn.drop()
            return
        self.connections += 1
        self._session_ids += 1
        s = _Session(self._session_ids, conn, runner)
        self._sessions[s.id] = s
        try:
            while True:
                s.state, s.job = "idle", None
                poll_timeout = await self._idle(s)
                s.state = "polling"
                s.job = await self._poll(s, poll_timeout)
                if s.job is not None:
                    s.state = "executing"
                    await self._execute(s, s.job)
        except (_Drop, ConnectionClosed) as exc:
            if not s.shutting_down:
                log.info("connection %d ended in %s: %s", s.id, s.state, exc or type(exc).__name__)
                conn.drop()
                if s.state == "executing" and s.job is not None and s.job.status not in HAS_RUN:
                    self._spawn_timeout(s.job)
        finally:
            del self._sessions[s.id]

    async def _frame(
        self, conn: ChannelConnection, deadline: float | Callable[[], float]
    ) -> str | bytes | None:
        """The next data frame, or None once `deadline` (event-loop time; a function is re-read after
        every wake-up, so that the deadline may move) has passed. Raises ConnectionClosed."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = (deadline() if callable(deadline) else deadline) - loop.time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(conn.recv(), remaining)

    def _note(self, s: _Session, data: str | bytes) -> wire.RunnerMessage | None:
        """Log a frame; return it parsed when it is a valid RunnerMessage."""
        parsed: wire.RunnerMessage | None = None
        raw: dict[str, Any] | None = None
        if isinstance(data, str):
            with contextlib.suppress(wire.WireError):
                parsed = wire.parse_runner_message(data)
                raw = wire.loads(data)
        now = time.monotonic()
        self.log.append(LoggedFrame(now, s.id, s.state, data, raw))
        if raw is not None:
            self.received.append((now, raw))
        return parsed

    async def _send(self, s: _Session, message: dict[str, Any]) -> None:
        await s.conn.send(wire.dumps(message))

    # Idle ----------------------------------------------------------------------------------------------
    async def _idle(self, s: _Session) -> int:
        """Wait for `ready` (returns its poll timeout). Any frame, pings included, resets the read timeout;
        text that does not parse drops the connection; `running`/`heartbeat` get no reply; terminal
        messages are idle retries."""
        entered = asyncio.get_running_loop().time()
        while True:
            data = await self._frame(s.conn, lambda: max(entered, s.conn.last_frame) + self.heartbeat_timeout)
            if data is None:
                raise _Drop("idle timeout")
            msg = self._note(s, data)
            if isinstance(data, bytes):
                continue
            if msg is None:
                raise _Drop("a message that does not parse while idle")
            fault = self._fault(msg.event)
            if fault is Fault.DROP:
                raise _Drop(f"injected fault at {msg.event}")
            if fault is Fault.LOSE:
                continue
            reply: dict[str, Any] | None = None
            if isinstance(msg, wire.Ready):
                update = self._update_for(msg.runner)
                if update is not None:
                    await self._send(s, update)
                    raise _Drop("update sent")
            elif isinstance(msg, wire.Completed | wire.Failed | wire.Canceled):
                job = self.store.owned(msg.job, s.runner)
                if job is not None:
                    self._apply_terminal(job, msg)
                reply = {"event": "ack", "job": msg.job}  # the message's uuid, even for an unknown job
            # else running / heartbeat while idle: ignored, no reply
            if fault is Fault.DROP_AFTER:
                raise _Drop(f"injected fault after {msg.event}")
            if isinstance(msg, wire.Ready):
                return msg.poll_timeout if msg.poll_timeout is not None else self.default_poll_timeout
            if reply is not None and fault is not Fault.WITHHOLD:
                await self._send(s, reply)

    def _update_for(self, meta: wire.RunnerMetadata | None) -> dict[str, Any] | None:
        if meta is None or meta.os != "linux":
            return None
        if meta.channel in (None, "stable"):
            version = self.server_version
            if version is None or meta.version == version or self.update_checksum is None:
                return None  # no update (None checksum: its fetch failed, the server carries on)
            url = f"{self.update_base}v{version}/runner"
            return {"event": "update", "version": version, "url": url, "checksum": self.update_checksum}
        if meta.checksum is None or self.canary_checksum is None or meta.checksum == self.canary_checksum:
            return None
        url = f"{self.update_base}canary/runner"
        return {"event": "update", "version": "canary", "url": url, "checksum": self.canary_checksum}

    # Polling -------------------------------------------------------------------------------------------
    async def _poll(self, s: _Session, poll_timeout: int) -> FakeJob | None:
        """Try to claim now, then every poll interval and after every frame, until the deadline; then
        `no_job`. Everything the runner sends meanwhile is ignored; there is no read timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + poll_timeout
        while True:
            job = self._try_claim(s.runner)
            if job is not None:
                fault = self._fault("job")
                if fault is Fault.LOSE:  # the send failed: no timeout is scheduled (gotcha 9)
                    raise _Drop("injected fault: job not sent")
                await self._send(s, self._job_message(job))
                if fault is Fault.DROP:
                    s.state, s.job = "executing", job
                    raise _Drop("injected fault after sending the job")
                return job
            if loop.time() >= deadline:
                await self._send(s, {"event": "no_job"})
                return None
            wake = min(deadline, loop.time() + self.poll_interval)
            data = await self._frame(s.conn, wake)
            if data is not None:
                self._note(s, data)

    def _try_claim(self, runner: RunnerRecord) -> FakeJob | None:
        job = self.store.next_claimable(runner)
        if job is None:
            return None
        problem = wire.config_error(job.config)
        if problem is not None:
            self.claim_errors += 1
            if job.uuid not in self._claim_errors_logged:
                self._claim_errors_logged.add(job.uuid)
                log.warning("claim attempts fail on job %s: %s", job.uuid, problem)
            return None
        return job if self.store.claim(job, runner, self.clock()) else None

    def _job_message(self, job: FakeJob) -> dict[str, Any]:
        token = job.oci_token or wire.mint_oci_token(
            runner=job.runner or "", project=str(job.config["project"]), issued=int(time.time())
        )
        return {
            "event": "job",
            "uuid": job.uuid,
            "spec": job.spec,
            "config": wire.stored_config(job.config),
            "oci_token": token,
            "timeout": job.config["timeout"],
            "created": job.created_text,
        }

    # Executing -----------------------------------------------------------------------------------------
    async def _execute(self, s: _Session, job: FakeJob) -> None:
        """One job: every message that parses gets exactly one reply (`ack` with this job's uuid, or
        `cancel`); other frames are ignored. Only valid messages other than `ready` reset the read
        timeout; when it passes, the job is failed (canceled past the hard limit) and Close 1000 sent
        with the JSON reason. Returns after `cancel` or a terminal ack: the connection goes back to Idle."""
        loop = asyncio.get_running_loop()
        last_valid = loop.time()
        while True:
            data = await self._frame(s.conn, last_valid + self.heartbeat_timeout)
            if data is None:
                reason = self.store.on_read_timeout(job, self.clock())
                await s.conn.close(1000, json.dumps(reason.value))  # the reason is JSON: "heartbeat_timeout"
                raise _Drop(f"read timeout: {reason}")
            msg = self._note(s, data)
            if msg is None:
                continue  # binary, or text that does not parse: ignored during a job
            fault = self._fault(msg.event)
            if fault is Fault.DROP:
                raise _Drop(f"injected fault at {msg.event}")
            if fault is Fault.LOSE:
                continue
            reply, done = self._executing_reply(job, msg)
            if not isinstance(msg, wire.Ready):
                last_valid = loop.time()
            if fault is Fault.DROP_AFTER:
                raise _Drop(f"injected fault after {msg.event}")
            if fault is not Fault.WITHHOLD:
                await self._send(s, reply)
            if done:
                return

    def _executing_reply(self, job: FakeJob, msg: wire.RunnerMessage) -> tuple[dict[str, Any], bool]:
        """The reply to one message about the current job, and whether the job is over on this
        connection. Raises _Drop on an invalid transition."""
        now = self.clock()
        ack = {"event": "ack", "job": job.uuid}
        if isinstance(msg, wire.Ready):
            return ack, False  # acked; does not count as liveness
        if isinstance(msg, wire.Running | wire.Heartbeat):
            handler = self.store.on_running if isinstance(msg, wire.Running) else self.store.on_heartbeat
            if handler(job, now) is Reply.CANCEL:
                return {"event": "cancel"}, True
            return ack, False
        if msg.job != job.uuid:
            log.warning("%s for job %s during job %s: applied to this job", msg.event, msg.job, job.uuid)
        self._apply_terminal(job, msg)
        return ack, True

    def _apply_terminal(self, job: FakeJob, msg: wire.Terminal) -> None:
        now = self.clock()
        try:
            if isinstance(msg, wire.Completed):
                self.store.on_completed(job, msg.results, now)
            elif isinstance(msg, wire.Failed):
                self.store.on_failed(job, msg.results, msg.error, now)
            else:
                self.store.on_canceled(job, now)
        except InvalidTransition as exc:
            raise _Drop(str(exc)) from None

    # -- the disconnect timeout --------------------------------------------------------------------------
    def _spawn_timeout(self, job: FakeJob) -> None:
        """`spawn_heartbeat_timeout`: `heartbeat_timeout` after a disconnect (or a server start), fail
        the job unless it has run, is past the hard limit (canceled) or was heard from since."""

        async def watch() -> None:
            delay = self.heartbeat_timeout
            while True:
                await asyncio.sleep(delay)
                again = self.store.after_disconnect(job, self.clock(), self.heartbeat_timeout)
                if again is None:
                    return
                delay = max(again, min(1.0, self.heartbeat_timeout))

        old = self._timers.pop(job.uuid, None)
        if old is not None:
            old.cancel()
        task = asyncio.ensure_future(watch())
        self._timers[job.uuid] = task

        def forget(done: "asyncio.Task[None]") -> None:
            if self._timers.get(job.uuid) is done:
                del self._timers[job.uuid]

        task.add_done_callback(forget)
