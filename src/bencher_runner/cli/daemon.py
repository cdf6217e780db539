"""The `runner daemon` click command (registered as `runner daemon` and `runner up` by main.py): the
daemon's own flags, the host flags shared with `runner run` (host_options.py) and the tuning flags."""

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from bencher_runner.cli.common import CONTEXT, fail
from bencher_runner.cli.host_options import host_options, host_settings_from, vm_sandbox_option
from bencher_runner.cli.tuning_options import tuning_options, tuning_options_from
from bencher_runner.cli.types import HttpUrl, SafePath, Text
from bencher_runner.daemon.driver import DaemonSettings, default_executor, run_daemon
from bencher_runner.daemon.update import auto_update_allowed
from bencher_runner.host.maintenance import HeldLock, HostBusyError, run_dir, take_daemon_lock
from bencher_runner.logs import setup_logging
from bencher_runner.metrics import serve_metrics
from bencher_runner.paths import cache_dir as default_cache_dir
from bencher_runner.paths import state_dir as default_state_dir
from bencher_runner.protocol import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_POLL_TIMEOUT
from bencher_runner.spec.errors import RunnerError


@click.command(context_settings=CONTEXT)
@click.option(
    "--host",
    type=HttpUrl(),
    envvar="BENCHER_HOST",
    default="https://api.bencher.dev",
    show_default=True,
    help="Bencher API URL (env BENCHER_HOST).",
)
@click.option(
    "--runner",
    type=Text(empty=False, spaces=False, controls=False),
    envvar="BENCHER_RUNNER",
    required=True,
    help="Runner UUID or slug (env BENCHER_RUNNER).",
)
@click.option(
    "--key",
    type=Text(empty=False, spaces=False, controls=False, secret=True),
    envvar="BENCHER_RUNNER_KEY",
    required=True,
    show_envvar=False,
    help="Runner key bencher_runner_... (env BENCHER_RUNNER_KEY; never logged).",
)
@click.option(
    "--poll-timeout",
    type=click.IntRange(1, 900),
    default=DEFAULT_POLL_TIMEOUT,
    show_default=True,
    help="Seconds the server may hold a `ready` before answering `no_job`.",
)
@click.option("--danger-allow-no-sandbox", is_flag=True, help="Accept jobs whose spec has no sandbox.")
@click.option("--no-auto-update", is_flag=True, help="Do not send version metadata or exit for updates.")
@click.option("--cache-dir", type=SafePath(path_type=Path, file_okay=False), help="Cache directory.")
@click.option(
    "--state-dir",
    type=SafePath(path_type=Path, file_okay=False),
    help="State directory: the outbox of unacknowledged results, the update record (default: env "
    "BENCHER_RUNNER_STATE_DIR, else the user state dir).",
)
@click.option(
    "--max-message-size",
    type=click.IntRange(64 * 1024, 2**30),
    default=DEFAULT_MAX_MESSAGE_BYTES,
    show_default=True,
    help="Byte cap for one result message (outputs are truncated to fit).",
)
@click.option(
    "--on-shutdown",
    type=click.Choice(["cancel", "finish"]),
    default="cancel",
    show_default=True,
    help="On SIGTERM/SIGINT, cancel the running job or let it finish.",
)
@click.option(
    "--image-layout",
    type=click.Choice(["bencher", "legacy"]),
    default="bencher",
    show_default=True,
    help="Image reference form: {registry}/{project}@{digest} or legacy {registry}/{project}/images@...",
)
@vm_sandbox_option
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (the key is still never logged).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    envvar="BENCHER_RUNNER_LOG_FORMAT",
    default="text",
    show_default=True,
    help="Log lines as readable text or one JSON object a line; each carries the job uuid (env "
    "BENCHER_RUNNER_LOG_FORMAT).",
)
@click.option(
    "--metrics-addr",
    envvar="BENCHER_RUNNER_METRICS_ADDR",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (`:PORT`: all interfaces; env "
    "BENCHER_RUNNER_METRICS_ADDR). Off by default.",
)
@click.option(
    "--announce-pause",
    is_flag=True,
    help="While paused (drained, a RAID check), send upstream's `paused` message and `health` in `ready` "
    "(unreleased after Bencher v0.6.12: a v0.6.12 server drops the connection on `paused`).",
)
@host_options
@tuning_options
def daemon_command(  # long: one parameter per daemon flag, as click passes them
    host: str,
    runner: str,
    key: str,
    poll_timeout: int,
    danger_allow_no_sandbox: bool,
    no_auto_update: bool,
    cache_dir: Path | None = None,
    state_dir: Path | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_BYTES,
    on_shutdown: str = "cancel",
    image_layout: str = "bencher",
    verbose: bool = False,
    log_format: str = "text",
    metrics_addr: str | None = None,
    sandbox: str = "qemu",
    announce_pause: bool = False,
    **flags: Any,
) -> None:
    """Serve jobs from a Bencher API over one WebSocket until SIGTERM/SIGINT (exit 75: update available)."""
    os.environ.pop("BENCHER_RUNNER_KEY", None)  # read once (into `key`): no child process inherits it
    cache = default_cache_dir(cache_dir)
    state_dir = default_state_dir(state_dir)
    try:
        host_settings = host_settings_from(
            flags, backend=sandbox, allow_no_sandbox=danger_allow_no_sandbox, image_layout=image_layout
        )
    except RunnerError as err:
        fail(err)
    tuning = tuning_options_from(flags)
    setup_logging("json" if log_format == "json" else "text", verbose=verbose)
    settings = DaemonSettings(
        host=host,
        runner=runner,
        key=key,
        state_dir=state_dir,
        poll_timeout=poll_timeout,
        auto_update=not no_auto_update and auto_update_allowed(state_dir),  # off after an unapplied update
        on_shutdown="finish" if on_shutdown == "finish" else "cancel",
        max_message_bytes=max_message_size,
        announce_pause=announce_pause,
        run_dir=run_dir(),
        host_settings=host_settings,
    )
    from bencher_runner.recovery import recover_from_crash

    log = logging.getLogger("bencher_runner.daemon")
    host_lock = _take_host_lock()
    if metrics_addr:
        try:
            log.info("metrics at http://%s:%d/metrics", *serve_metrics(metrics_addr, cache))
        except RunnerError as err:
            fail(err)
    # a crashed daemon's VMs died with it; its jails' leftovers are removed, cache and state kept 0700
    recover_from_crash(
        cache, warn=log.warning, info=log.info, jail_uid=host_settings.jail_uid, state=state_dir
    )
    from bencher_runner.daemon.preflight import HostPreflight, fetch_default_kernel

    preflight = HostPreflight(cache, settings.host_settings, fetch_kernel=fetch_default_kernel)
    try:
        code = run_daemon(settings, default_executor(cache, tuning), preflight)
    except RunnerError as err:
        fail(err, 1)
    finally:
        host_lock.release()
    sys.exit(code)


def _take_host_lock() -> HeldLock:
    """One runner per host, held for the daemon's life."""
    try:
        return take_daemon_lock(run_dir())
    except HostBusyError as err:
        fail(err)
    except OSError as err:
        fail(
            f"cannot take the host lock in {run_dir()}: {err.strerror or err}; run as root or set "
            "BENCHER_RUNNER_RUN_DIR to a directory this user can write"
        )
