"""The asyncio driver of `runner daemon`: moves frames and timers for the sans-IO RunnerProtocol.

One event queue feeds the protocol: frames from the current connection, job results from the worker
thread, connection events and the shutdown request. The job itself runs in a worker thread, so the event
loop keeps sending heartbeats whatever the job does; a cancel sets the job's threading.Event.
"""

import asyncio
import contextlib
import contextvars
import logging
import platform
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from bencher_runner import __version__, metrics
from bencher_runner.daemon.outbox import Outbox
from bencher_runner.daemon.update import record_offer
from bencher_runner.host.interference import verdict_line
from bencher_runner.host.maintenance import HostBusyError, host_job_lock, write_status
from bencher_runner.host.tuning import TuningOptions
from bencher_runner.logs import current_job
from bencher_runner.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_POLL_TIMEOUT,
    Action,
    CancelJob,
    CheckHost,
    Connected,
    Disconnected,
    DropTerminal,
    Heartbeat,
    HostChecked,
    Input,
    JobFinished,
    Log,
    ParkTerminal,
    PersistTerminal,
    ProtocolSettings,
    Received,
    Reconnect,
    RunnerMessage,
    RunnerProtocol,
    Send,
    ShutdownRequested,
    StartJob,
    State,
    Stop,
    Terminal,
    Tick,
    UpdateAvailable,
    parse_server_message,
    terminal_message,
)
from bencher_runner.spec.config import HostSettings, RunConfig
from bencher_runner.spec.errors import RunnerError, SpecError
from bencher_runner.spec.results import RunResult

log = logging.getLogger("bencher_runner.daemon")

Executor = Callable[[RunConfig, threading.Event], RunResult]
"""Runs one job to its end; must return soon after the event is set (the default kills the VM)."""
HostCheck = Callable[[], HostChecked | str | None]
"""Whether a job can and should run on this host now (a str: why it cannot; None: it can)."""

KEY_PATTERN = re.compile(r"^bencher_runner_[A-Za-z0-9]{30}$")
QUICK_CLOSE_S = 2.0  # a close this soon after the upgrade, with no message, counts as a rejection
QUICK_CLOSES_BEFORE_WARNING = 3
MAX_FRAME_BYTES = 1024 * 1024  # a `job` message is a few KiB; anything near this is hostile
JOB_STOP_WAIT_S = 3.0  # at exit, how long to wait for a canceled job's thread


class AuthError(RunnerError):
    """The server refused the runner key (HTTP 401/403 on the upgrade)."""


def validate_key(key: str) -> None:
    if not KEY_PATTERN.match(key):
        raise SpecError(
            "the runner key is malformed: expected `bencher_runner_` followed by 30 letters or digits "
            "(45 characters); copy it again from the runner's page (--key or BENCHER_RUNNER_KEY)"
        )


def channel_url(host: str, runner: str) -> str:
    """`{host}/v0/runners/{runner}/channel` with http->ws, https->wss and any path prefix kept."""
    parts = urlsplit(host.strip())
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise SpecError(f"--host={host!r}: expected an http:// or https:// URL")
    if not runner or "/" in runner:
        raise SpecError(f"--runner={runner!r}: expected the runner's UUID or slug")
    scheme = "wss" if parts.scheme in ("https", "wss") else "ws"
    path = parts.path.rstrip("/") + f"/v0/runners/{quote(runner, safe='')}/channel"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def runner_metadata() -> dict[str, Any]:
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return {"os": "linux", "arch": arch, "version": __version__}


class Backoff:
    """Exponential backoff with jitter: base * 2**n, capped, then a uniform pick in [d/2, d]."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base, self.cap, self.attempts = base, cap, 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        delay = min(self.cap, self.base * 2 ** min(self.attempts, 30))
        self.attempts += 1
        return float(delay / 2 + self.rng.random() * delay / 2)

    def reset(self) -> None:
        self.attempts = 0


@dataclass
class DaemonSettings:
    host: str
    runner: str
    key: str = field(repr=False)
    state_dir: Path
    poll_timeout: int = DEFAULT_POLL_TIMEOUT
    auto_update: bool = True
    on_shutdown: Literal["cancel", "finish"] = "cancel"
    host_settings: HostSettings = field(default_factory=HostSettings)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    heartbeat_interval: float = 1.0
    ack_timeout: float = 5.0
    poll_margin: float = 30.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    open_timeout: float = 10.0
    max_frame_bytes: int = MAX_FRAME_BYTES
    announce_pause: bool = False  # upstream's unreleased `paused` and `health` (a v0.6.12 server drops)
    run_dir: Path | None = None  # where the daemon's status is written (host/maintenance.py); None: none


def default_executor(cache: Path, tuning: TuningOptions | None = None) -> Executor:
    """The real executor: `job.run_job` with the cache dir (imported lazily: it pulls in the VM stack).

    Between jobs it copies spare root disks of the last job's template (sparedisk.py) under the host's
    job lock; the next job stops that refill before it starts."""
    from bencher_runner.sparedisk import RefillThread

    def idle_lock(stop: threading.Event) -> contextlib.AbstractContextManager[None]:
        return host_job_lock(wait=True, on_wait=log.debug, warn=log.debug, cancel=stop)

    refill = RefillThread(cache, idle_lock)

    def run(config: RunConfig, cancel: threading.Event) -> RunResult:
        from bencher_runner.job import LogReporter, run_job

        refill.stop()  # returns once no copy runs: none runs beside this job
        reporter = LogReporter()
        try:  # one job at a time on the host: a local `runner run` finishes first
            with host_job_lock(wait=True, on_wait=reporter.phase, warn=reporter.warn, cancel=cancel):
                return run_job(config, cache=cache, cancel=cancel, tuning=tuning, reporter=reporter)
        except HostBusyError as err:
            return _crash_result(err)
        finally:
            refill.start()  # the lock is released: it copies while the result goes out and after

    return run


def _crash_result(err: BaseException) -> RunResult:
    text = str(err) if isinstance(err, RunnerError) else f"internal error: {type(err).__name__}: {err}"
    return RunResult(status="failed", results=[], sandbox=None, error=text)


class Daemon:
    """`await Daemon(settings, executor).run()` serves jobs until shutdown; returns the exit status.

    ``host_check`` (run in a thread before every `ready`) returns why no job can run on this host, or
    None; without one the host is assumed fit (tests with fake executors).
    """

    def __init__(
        self, settings: DaemonSettings, executor: Executor, host_check: HostCheck | None = None
    ) -> None:
        validate_key(settings.key)
        self.settings = settings
        self.url = channel_url(settings.host, settings.runner)
        self.executor = executor
        self.host_check = host_check
        self.outbox = Outbox(settings.state_dir / "outbox")
        self.protocol = RunnerProtocol(
            ProtocolSettings(
                poll_timeout=settings.poll_timeout,
                runner_metadata=runner_metadata() if settings.auto_update else None,
                auto_update=settings.auto_update,
                heartbeat_interval=settings.heartbeat_interval,
                ack_timeout=settings.ack_timeout,
                poll_margin=settings.poll_margin,
                max_message_bytes=settings.max_message_bytes,
                shutdown_cancels=settings.on_shutdown == "cancel",
                check_host=host_check is not None,
                announce_pause=settings.announce_pause,
                host_settings=settings.host_settings,
            ),
            pending=self.outbox.load(),
        )
        self.backoff = Backoff(settings.backoff_base, settings.backoff_cap)
        self._events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ws: ClientConnection | None = None
        self._conn_id = 0
        self._connect_task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._jobs: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._quick_closes = 0
        self._connected_at = 0.0
        self._got_message = False
        self._last_heartbeat: float | None = None
        self._status: dict[str, Any] | None = None

    # -- public --------------------------------------------------------------------------------------
    def request_shutdown(self) -> None:
        """Safe to call from a signal handler running in the loop (a second call hurries it)."""
        self._events.put_nowait(("shutdown",))

    async def run(self, *, handle_signals: bool = False) -> int:
        loop = self._loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_shutdown)
        try:
            if self.protocol.pending:
                log.info(
                    "%d unacknowledged result(s) in the outbox will be resent", len(self.protocol.pending)
                )
            self._start_connect(0.0)
            return await self._serve()
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            await self._teardown()

    # -- main loop -----------------------------------------------------------------------------------
    async def _next_event(self) -> tuple[Any, ...]:
        """The next queued event, or a tick once the protocol's next timer is due.

        A due timer never hides queued events: they are taken first (a zero-timeout `wait_for` would
        time out even with events queued, and the events that clear the timer would never be read).
        """
        deadline = self.protocol.next_timer()
        if deadline is None:
            return await self._events.get()
        if not self._events.empty():
            return self._events.get_nowait()
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return ("tick",)
        try:
            return await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return ("tick",)

    async def _serve(self) -> int:
        while True:
            event = await self._next_event()
            now = time.monotonic()
            kind = event[0]
            inp: Input
            if kind == "tick":
                inp = Tick()
            elif kind == "frame":
                if event[1] != self._conn_id:
                    continue
                self._got_message = True
                inp = Received(parse_server_message(event[2]))
            elif kind == "connected":
                if event[1] != self._conn_id:
                    continue
                inp = Connected()
            elif kind == "closed":
                if event[1] != self._conn_id:
                    continue
                self._on_closed(now, event[2])
                inp = Disconnected(event[2])
            elif kind == "finished":
                inp = JobFinished(event[1], event[2])
            elif kind == "host":
                verdict: HostChecked = event[1]
                metrics.paused(verdict.pause)
                inp = verdict
            elif kind == "shutdown":
                log.info("shutdown requested")
                inp = ShutdownRequested()
            elif kind == "fatal":
                raise event[1]
            else:  # pragma: no cover
                continue
            actions = self.protocol.handle(inp, now)
            if kind == "finished":  # the protocol lets go of the job; its messages still belong to it
                current_job.set(event[1])
            else:  # after the input: a `job` message's own lines carry the job it claimed
                current_job.set(self.protocol.job.uuid if self.protocol.job is not None else None)
            code = await self._execute(actions)
            self._publish_status(force=kind == "host")
            if code is not None:
                return code
            if kind == "closed" and not self.protocol.stopped:
                metrics.reconnect()
                self._start_connect(self.backoff.next())

    def _publish_status(self, *, force: bool = False) -> None:
        """`daemon.json` in the run dir (host/maintenance.py), for `runner drain --wait`: rewritten
        when what it says changes, and after every host check (a fresh time: the pause is current)."""
        directory = self.settings.run_dir
        if directory is None:
            return
        p = self.protocol
        job = p.job.uuid if p.job is not None else None
        if p.stopped:
            state = "stopped"
        elif job is not None:
            state = "job"
        elif p.state is State.POLLING and not p.polling_paused:
            state = "polling"
        elif p.state is State.DISCONNECTED:
            state = "disconnected"
        elif p.paused or p.host_problem is not None:
            state = "paused"
        else:
            state = "idle"
        status = {"state": state, "job": job, "pause": list(p.paused), "problem": p.host_problem}
        if force or status != self._status:
            self._status = status
            write_status(directory, status)

    def _on_closed(self, now: float, why: str) -> None:
        self._ws = None
        quick = not self._got_message and now - self._connected_at < QUICK_CLOSE_S
        if quick:
            self._quick_closes += 1
            if self._quick_closes >= QUICK_CLOSES_BEFORE_WARNING:
                log.warning(
                    "the server closed the connection right after the upgrade %d times in a row: "
                    "the runner key or the runner id (--runner) is probably wrong",
                    self._quick_closes,
                )
        else:
            self._quick_closes = 0
        if self._got_message:
            self.backoff.reset()
        log.info("connection closed: %s", why)

    async def _execute(self, actions: list[Action]) -> int | None:
        for action in actions:
            if isinstance(action, Send):
                await self._send(action.message)
            elif isinstance(action, PersistTerminal):
                await asyncio.to_thread(self.outbox.put, action.message)
                metrics.job_ended(action.message.event)
            elif isinstance(action, DropTerminal):
                await asyncio.to_thread(self.outbox.remove, action.job)
            elif isinstance(action, ParkTerminal):
                parked = await asyncio.to_thread(self.outbox.park, action.job)
                log.error("the undelivered result of job %s is kept in %s", action.job, parked)
            elif isinstance(action, StartJob):
                self._start_job(action.job, action.config)
            elif isinstance(action, CancelJob):
                entry = self._jobs.get(action.job)
                if entry is not None:
                    entry[1].set()
            elif isinstance(action, CheckHost):
                self._spawn(self._check_host())
            elif isinstance(action, Log):
                log.log(action.level, "%s", action.text)
            elif isinstance(action, Reconnect):
                self._drop_connection()  # the reader reports the close; then we connect again
            elif isinstance(action, UpdateAvailable):
                log.warning(
                    "runner update available: version %s at %s (sha256 %s)",
                    action.version,
                    action.url,
                    action.checksum,
                )
                if self.settings.auto_update:  # exit 75 follows; the unit's upgrade step reads the record
                    await asyncio.to_thread(
                        record_offer, self.settings.state_dir, action.version, action.url, action.checksum
                    )
            elif isinstance(action, Stop):
                self._publish_status()
                if action.error:
                    log.warning("stopping: %s", action.error)
                return action.exit_code
        return None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check_host(self) -> None:
        check = self.host_check
        try:
            verdict = None if check is None else await asyncio.to_thread(check)
        except Exception as err:  # a broken check must not stop the daemon: report it as the problem
            verdict = f"the host check failed: {type(err).__name__}: {err}"
        self._events.put_nowait(
            ("host", verdict if isinstance(verdict, HostChecked) else HostChecked(verdict))
        )

    # -- connection ----------------------------------------------------------------------------------
    def _start_connect(self, delay: float) -> None:
        if self._connect_task is not None and not self._connect_task.done():
            return
        self._connect_task = asyncio.create_task(self._connect(delay))

    async def _connect(self, delay: float) -> None:
        while True:
            if delay > 0:
                log.info("reconnecting in %.1f s", delay)
                await asyncio.sleep(delay)
            try:
                ws = await connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self.settings.key}"},
                    open_timeout=self.settings.open_timeout,
                    max_size=self.settings.max_frame_bytes,
                    max_queue=16,
                    ping_interval=20,
                    ping_timeout=20,
                    logger=log.getChild("ws"),
                    user_agent_header=f"bencher-runner/{__version__}",
                )
            except InvalidStatus as err:
                status = err.response.status_code
                if status in (401, 403):
                    self._events.put_nowait(
                        (
                            "fatal",
                            AuthError(
                                f"the server refused the runner key for runner {self.settings.runner!r} "
                                f"(HTTP {status}): check --key/BENCHER_RUNNER_KEY and --runner"
                            ),
                        )
                    )
                    return
                log.warning("connecting to %s failed: HTTP %d", self.url, status)
            except (OSError, InvalidHandshake, TimeoutError) as err:
                log.warning("connecting to %s failed: %s", self.url, err or type(err).__name__)
            else:
                self._conn_id += 1
                self._ws = ws
                self._connected_at = time.monotonic()
                self._got_message = False
                log.info("connected to %s", self.url)
                self._events.put_nowait(("connected", self._conn_id))
                self._reader = asyncio.create_task(self._read(ws, self._conn_id))
                return
            delay = self.backoff.next()

    async def _read(self, ws: ClientConnection, conn_id: int) -> None:
        why = "closed"
        try:
            async for frame in ws:
                self._events.put_nowait(("frame", conn_id, frame))
        except ConnectionClosed as err:
            why = str(err)
        except Exception as err:  # any socket failure means the connection is gone
            why = f"{type(err).__name__}: {err}"
        else:
            why = f"closed by the server ({ws.close_code} {ws.close_reason or ''})".rstrip()
        self._events.put_nowait(("closed", conn_id, why))

    async def _send(self, message: RunnerMessage) -> None:
        ws = self._ws
        if ws is None:
            return
        now = time.monotonic()
        text = message.wire()
        if isinstance(message, Heartbeat):
            if self._last_heartbeat is not None:
                interval = now - self._last_heartbeat
                metrics.heartbeat(interval, self.settings.heartbeat_interval)
            self._last_heartbeat = now
        with contextlib.suppress(ConnectionClosed):  # the reader reports the close
            await ws.send(text)
        log.debug("sent %s", text[:40])

    def _drop_connection(self) -> None:
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    # -- jobs ----------------------------------------------------------------------------------------
    def _start_job(self, job: str, config: RunConfig) -> None:
        cancel = threading.Event()
        context = contextvars.copy_context()
        context.run(current_job.set, job)  # every log line of the job, in the loop and the worker thread
        # A daemon thread, not asyncio.to_thread: a job that does not stop must not hold the exit.
        thread = threading.Thread(
            target=context.run,
            args=(self._run_job, job, config, cancel),
            name=f"job-{job[:8]}",
            daemon=True,
        )
        self._jobs[job] = (thread, cancel)
        self._last_heartbeat = None
        thread.start()

    def _run_job(self, job: str, config: RunConfig, cancel: threading.Event) -> None:
        """The worker thread: run the job, build its (capped, encoded) terminal message, hand it over."""
        log.info("job started: %s (%d vCPU, %d MiB, disk %d MiB)", config.job.image, config.job.vcpus,
                 config.job.memory_mib, config.job.disk_mib)  # fmt: skip
        metrics.job_running(True)
        try:
            result = self.executor(config, cancel)
        except Exception as err:  # a crashing executor fails the job, not the daemon
            log.exception("job %s: the executor raised", job)
            result = _crash_result(err)
        finally:
            metrics.job_running(False)
        metrics.job_phases(result.timings)
        phases = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in result.timings.items())
        log.info("job %s%s%s", result.status, f": {result.error}" if result.error else "",
                 f" ({phases})" if phases else "")  # fmt: skip
        if line := verdict_line(result.interference):  # the host's noise: logs and metrics, not the wire
            log.info("job %s", line)
        metrics.interference(result.interference)
        message = terminal_message(job, result, self.settings.max_message_bytes)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the daemon is gone
                loop.call_soon_threadsafe(self._job_done, job, message)

    def _job_done(self, job: str, message: Terminal) -> None:
        self._jobs.pop(job, None)
        self._events.put_nowait(("finished", job, message))

    async def _teardown(self) -> None:
        for _, cancel in self._jobs.values():
            cancel.set()
        for thread, _ in list(self._jobs.values()):  # a canceled job stops within a second or so
            await asyncio.to_thread(thread.join, JOB_STOP_WAIT_S)
            if thread.is_alive():
                log.error("a job did not stop within %g s of its cancel; exiting anyway", JOB_STOP_WAIT_S)
        for task in [self._connect_task, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(1000, "runner shutting down"), 1.0)
            ws.transport.abort()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader


def run_daemon(settings: DaemonSettings, executor: Executor, host_check: HostCheck | None = None) -> int:
    """Blocking entry point: serve until SIGTERM/SIGINT or an update; the process exit status."""
    return asyncio.run(Daemon(settings, executor, host_check).run(handle_signals=True))
