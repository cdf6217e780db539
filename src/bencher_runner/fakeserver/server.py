"""A faithful fake of the Bencher API's runner channel (PROTOCOL.md, protocol notes section 6.1).

In-memory job store, key auth (upgrade then silent drop, or a 401 mode), long poll with `no_job` at the
deadline, acks carrying the job uuid, heartbeat (read) timeout, hard timeout on heartbeats, conditional
job-state transitions, results stored once per transition, and fault injection for tests.
"""

import asyncio
import contextlib
import hashlib
import json
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

TERMINAL = ("completed", "processed", "failed", "canceled")
FAKE_OCI_TOKEN = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
RUNNER_EVENTS = ("ready", "running", "heartbeat", "completed", "failed", "canceled")


class _Drop(Exception):
    """End the connection abruptly (no Close frame), as the real server does on errors."""


@dataclass
class FakeJob:
    uuid: str
    spec: dict[str, Any]
    config: dict[str, Any]
    timeout: int
    status: str = "pending"
    runner: str | None = None
    started: float | None = None
    last_heartbeat: float = 0.0
    output: dict[str, Any] | None = None
    output_writes: int = 0
    history: list[str] = field(default_factory=list)
    oci_token: str = FAKE_OCI_TOKEN


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


class FakeBencher:
    """`await FakeBencher(...).start()`; then `add_job`, `cancel`, `job_state`, `results`, ..."""

    def __init__(
        self,
        *,
        runner: str = "fake-runner",
        key: str = "bencher_runner_" + "a1" * 15,
        heartbeat_timeout: float = 90.0,
        grace_period: float = 60.0,
        default_poll_timeout: int = 30,
        max_message_size: int = 4 * 1024 * 1024,
        reject_with_401: bool = False,
        server_version: str | None = None,
    ) -> None:
        self.runner = runner
        self.key_hash = hashlib.sha256(key.encode()).hexdigest()
        self.heartbeat_timeout = heartbeat_timeout
        self.grace_period = grace_period
        self.default_poll_timeout = default_poll_timeout
        self.max_message_size = max_message_size
        self.reject_with_401 = reject_with_401
        self.server_version = server_version
        self.jobs: dict[str, FakeJob] = {}
        self.received: list[tuple[float, dict[str, Any]]] = []  # every parsed runner message
        self.connections = 0
        self.rejected_auth = 0
        self.port = 0
        self._server: Server | None = None
        self._conns: set[ServerConnection] = set()
        self._job_added = asyncio.Event()
        self._faults: list[tuple[str, bool]] = []  # (point, process first)
        self._timers: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int | None = None) -> "FakeBencher":
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            port if port is not None else self.port,
            process_request=self._process_request,
            max_size=self.max_message_size,
            ping_interval=None,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self

    async def stop(self) -> None:
        """Graceful shutdown: Close 1001 `server shutting down`; running jobs stay running."""
        if self._server is None:
            return
        for ws in list(self._conns):
            with contextlib.suppress(Exception):
                await ws.close(1001, "server shutting down")
        self._server.close()
        await self._server.wait_closed()
        self._server = None

    async def restart(self, pause: float = 0.0) -> None:
        await self.stop()
        await asyncio.sleep(pause)
        await self.start(self.port)

    async def close(self) -> None:
        await self.stop()
        for task in list(self._timers):
            task.cancel()

    # -- test API ------------------------------------------------------------------------------------
    def add_job(
        self,
        *,
        spec: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        oci_token: str = FAKE_OCI_TOKEN,
        **config_fields: Any,
    ) -> str:
        cfg = config if config is not None else default_config(**config_fields)
        job = FakeJob(str(uuidlib.uuid4()), spec or default_spec(), cfg, int(cfg.get("timeout", 60)))
        job.oci_token = oci_token
        self.jobs[job.uuid] = job
        self._job_added.set()
        return job.uuid

    def cancel(self, job: str) -> None:
        """An external cancel: the runner learns it on its next `running`/`heartbeat`."""
        self._transition(self.jobs[job], ("pending", "claimed", "running"), "canceled")

    def job_state(self, job: str) -> str:
        return self.jobs[job].status

    def results(self, job: str) -> dict[str, Any] | None:
        return self.jobs[job].output

    def output_writes(self, job: str) -> int:
        return self.jobs[job].output_writes

    def drop_connection(self) -> None:
        """Drop every runner connection now, without a Close frame."""
        for ws in list(self._conns):
            ws.transport.abort()

    def fail_at(self, point: str, *, process: bool = False) -> None:
        """One-shot fault: drop the connection at `point` ("job" = right after sending a job, or a
        runner event name); with process=True the message is applied first but never answered."""
        self._faults.append((point, process))

    def events(self, name: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.received if m.get("event") == name]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.02)

    # -- auth ----------------------------------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        parts = request.path.split("?")[0].rstrip("/").split("/")
        if len(parts) < 4 or parts[-1] != "channel" or parts[-3] != "runners" or parts[-4] != "v0":
            return False
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token.startswith("bencher_runner_") or len(token) != 45:
            return False
        return hashlib.sha256(token.encode()).hexdigest() == self.key_hash and parts[-2] == self.runner

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if self.reject_with_401 and not self._authorized(request):
            self.rejected_auth += 1
            return Response(401, "Unauthorized", Headers(), b"Invalid runner key\n")
        return None

    # -- channel -------------------------------------------------------------------------------------
    def _fault(self, point: str) -> tuple[bool, bool]:
        for i, (p, process) in enumerate(self._faults):
            if p == point:
                del self._faults[i]
                return True, process
        return False, False

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        if not self._authorized(ws.request):
            self.rejected_auth += 1
            ws.transport.abort()
            return
        self.connections += 1
        self._conns.add(ws)
        current: FakeJob | None = None
        try:
            while True:
                current = None
                poll = await self._idle(ws)
                current = await self._poll(ws, poll)
                if current is not None:
                    await self._execute(ws, current)
                    current = None
        except (_Drop, ConnectionClosed):
            ws.transport.abort()
        finally:
            self._conns.discard(ws)
            if current is not None and current.status in ("claimed", "running"):
                self._spawn_timeout(current)

    async def _recv(self, ws: ServerConnection, timeout: float) -> dict[str, Any] | str | None:
        """A parsed message, None on a timeout, or the raw text when it does not parse."""
        try:
            frame = await asyncio.wait_for(ws.recv(), timeout)
        except TimeoutError:
            return None
        if isinstance(frame, bytes):
            return ""
        try:
            msg = json.loads(frame)
        except ValueError:
            return frame
        if not isinstance(msg, dict) or msg.get("event") not in RUNNER_EVENTS or not self._valid(msg):
            return frame
        self.received.append((time.monotonic(), msg))
        hit, process = self._fault(msg["event"])
        if hit and not process:
            raise _Drop
        if hit:
            msg["_drop_after"] = True
        return msg

    @staticmethod
    def _valid(msg: dict[str, Any]) -> bool:
        event = msg["event"]
        if event == "ready":
            pt = msg.get("poll_timeout")
            return pt is None or (isinstance(pt, int) and 1 <= pt <= 900)
        if event in ("completed", "failed"):
            ok = isinstance(msg.get("job"), str) and isinstance(msg.get("results"), list)
            return ok and (event == "completed" or isinstance(msg.get("error"), str))
        if event == "canceled":
            return isinstance(msg.get("job"), str)
        return True

    async def _reply(self, ws: ServerConnection, msg: dict[str, Any], reply: dict[str, Any]) -> None:
        if msg.get("_drop_after"):
            raise _Drop
        await ws.send(json.dumps(reply))

    async def _idle(self, ws: ServerConnection) -> int:
        while True:
            msg = await self._recv(ws, self.heartbeat_timeout)
            if msg is None or isinstance(msg, str):
                raise _Drop  # idle silence or a parse failure: drop
            event = msg["event"]
            if event == "ready":
                if self.server_version and isinstance(msg.get("runner"), dict):
                    meta = msg["runner"]
                    if meta.get("os") == "linux" and meta.get("version") != self.server_version:
                        v = self.server_version
                        await ws.send(
                            json.dumps(
                                {
                                    "event": "update",
                                    "version": v,
                                    "url": f"https://example.invalid/v{v}/runner",
                                    "checksum": "0" * 64,
                                }
                            )
                        )
                        raise _Drop
                pt = msg.get("poll_timeout")
                return pt if isinstance(pt, int) else self.default_poll_timeout
            if event in ("completed", "failed", "canceled"):
                job = self.jobs.get(msg["job"])
                if job is not None and job.runner == self.runner:
                    self._terminal(job, msg)
                await self._reply(ws, msg, {"event": "ack", "job": msg["job"]})
            # running / heartbeat in idle: ignored without a reply

    async def _poll(self, ws: ServerConnection, poll_timeout: int) -> FakeJob | None:
        deadline = time.monotonic() + poll_timeout
        while True:
            job = self._claim()
            if job is not None:
                payload = {
                    "event": "job",
                    "uuid": job.uuid,
                    "spec": job.spec,
                    "config": job.config,
                    "oci_token": job.oci_token,
                    "timeout": job.timeout,
                    "created": "2026-01-01T00:00:00Z",
                }
                await ws.send(json.dumps(payload))
                hit, _ = self._fault("job")
                if hit:
                    self._spawn_timeout(job)
                    raise _Drop
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await ws.send(json.dumps({"event": "no_job"}))
                return None
            self._job_added.clear()
            recv = asyncio.ensure_future(ws.recv())
            added = asyncio.ensure_future(self._job_added.wait())
            done, _ = await asyncio.wait(
                {recv, added}, timeout=min(1.0, remaining), return_when="FIRST_COMPLETED"
            )
            added.cancel()
            if recv in done:
                recv.result()  # raises ConnectionClosed; text while polling is ignored
            else:
                recv.cancel()
                with contextlib.suppress(BaseException):
                    await recv

    def _claim(self) -> FakeJob | None:
        for job in self.jobs.values():
            if job.status == "pending":
                job.runner = self.runner
                job.last_heartbeat = time.monotonic()
                self._transition(job, ("pending",), "claimed")
                return job
        return None

    def _hard_timeout(self, job: FakeJob) -> bool:
        return job.started is not None and time.monotonic() - job.started > job.timeout + self.grace_period

    async def _execute(self, ws: ServerConnection, job: FakeJob) -> None:
        job.last_heartbeat = time.monotonic()
        while True:
            remaining = job.last_heartbeat + self.heartbeat_timeout - time.monotonic()
            msg = await self._recv(ws, max(0.0, remaining))
            if msg is None:  # read timeout
                reason = "job_timeout_exceeded" if self._hard_timeout(job) else "heartbeat_timeout"
                self._transition(
                    job, ("claimed", "running"), "canceled" if self._hard_timeout(job) else "failed"
                )
                await ws.close(1000, json.dumps(reason))
                raise _Drop
            if isinstance(msg, str):
                continue  # unparseable text while executing: ignored
            event = msg["event"]
            ack = {"event": "ack", "job": job.uuid}
            if event == "ready":
                await self._reply(ws, msg, ack)
                continue
            job.last_heartbeat = time.monotonic()
            if event == "running":
                if job.status == "claimed":
                    job.started = time.monotonic()
                    self._transition(job, ("claimed",), "running")
                if job.status == "canceled":
                    await self._reply(ws, msg, {"event": "cancel"})
                    return
                await self._reply(ws, msg, ack)
            elif event == "heartbeat":
                if job.status == "canceled":
                    await self._reply(ws, msg, {"event": "cancel"})
                    return
                if self._hard_timeout(job):
                    self._transition(job, ("claimed", "running"), "canceled")
                    await self._reply(ws, msg, {"event": "cancel"})
                    return
                await self._reply(ws, msg, ack)
            else:
                self._terminal(job, msg)
                await self._reply(ws, msg, ack)
                return

    def _terminal(self, job: FakeJob, msg: dict[str, Any]) -> None:
        """Apply a terminal message (rules of notes 3.5); raises _Drop on an illegal transition."""
        event = msg["event"]
        if event == "completed":
            if self._transition(job, ("running", "failed"), "completed"):
                self._store(job, {"results": msg["results"]})
                self._transition(job, ("completed",), "processed")
            elif job.status not in ("completed", "processed", "canceled"):
                raise _Drop
        elif event == "failed":
            if self._transition(job, ("claimed", "running"), "failed"):
                self._store(job, {"results": msg["results"], "error": msg["error"]})
            elif job.status not in TERMINAL:
                raise _Drop
        elif (
            event == "canceled"
            and not self._transition(job, ("claimed", "running"), "canceled")
            and job.status != "canceled"
        ):
            raise _Drop

    def _store(self, job: FakeJob, output: dict[str, Any]) -> None:
        job.output = output
        job.output_writes += 1

    def _transition(self, job: FakeJob, allowed: tuple[str, ...], to: str) -> bool:
        if job.status not in allowed:
            return False
        job.status = to
        job.history.append(to)
        return True

    def _spawn_timeout(self, job: FakeJob) -> None:
        async def watch() -> None:
            delay = self.heartbeat_timeout
            while True:
                await asyncio.sleep(delay)
                if job.status in TERMINAL:
                    return
                if self._hard_timeout(job):
                    self._transition(job, ("claimed", "running"), "canceled")
                    return
                since = time.monotonic() - job.last_heartbeat
                if since < self.heartbeat_timeout:
                    delay = max(0.2, self.heartbeat_timeout - since)
                    continue
                self._transition(job, ("claimed", "running"), "failed")
                return

        task = asyncio.ensure_future(watch())
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)
