"""Upgrading `runner up` when the server offers an update (exit 75), without a restart loop.

Why this exists: the server's `update` message names Bencher's own Rust runner binary (`url`,
`checksum`); this runner is a Python package, so it never downloads that binary. Instead:

1. on `update` the daemon records the offer (version, url, checksum) in `<state dir>/update.json`
   and exits 75 (`record_offer`, called by the driver);
2. systemd restarts it (`RestartForceExitStatus=75`) and the unit's `ExecStartPre` runs
   `python -m bencher_runner.daemon.upgrade`, which runs the operator's
   `BENCHER_RUNNER_UPGRADE_COMMAND` with the offered version (`apply_pending_update`). It never blocks
   the start: a missing command, a failure or a timeout is logged and the installed version starts;
3. at start the daemon keeps auto-update off while a recorded offer names another version than the
   installed one (`auto_update_allowed`): the server offers the same version on every `ready`, so
   exiting 75 again would restart it in a loop. Installing that version clears the record.
"""

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bencher_runner import __version__
from bencher_runner.atomicfile import write_atomic
from bencher_runner.paths import state_dir as default_state_dir

log = logging.getLogger("bencher_runner.daemon.update")

RECORD_NAME = "update.json"
COMMAND_ENV = "BENCHER_RUNNER_UPGRADE_COMMAND"
MAX_ATTEMPTS = 3  # upgrade attempts per offered version (one per start of the service)
UPGRADE_TIMEOUT_S = 300.0  # the unit's TimeoutStartSec must exceed this
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")
_HIDDEN_ENV = ("BENCHER_RUNNER_KEY",)  # never handed to the upgrade command

Status = Literal["pending", "upgraded", "failed", "skipped"]
Runner = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass
class UpdateRecord:
    version: str
    url: str
    checksum: str
    offered_to: str  # the version that was running when the server offered the update
    offered_at: str  # UTC, ISO 8601
    status: Status = "pending"
    attempts: int = 0
    detail: str = ""


def record_path(state_dir: Path) -> Path:
    return state_dir / RECORD_NAME


def load_record(state_dir: Path) -> UpdateRecord | None:
    path = record_path(state_dir)
    try:
        data: Any = json.loads(path.read_text())
        return UpdateRecord(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        log.warning("ignoring the unreadable update record %s: %s", path, err)
        return None


def save_record(state_dir: Path, record: UpdateRecord) -> Path:
    """Write atomically (temp file, fsync, rename), like the outbox."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = record_path(state_dir)
    write_atomic(path, json.dumps(asdict(record), indent=2), mode=0o600)
    return path


def record_offer(
    state_dir: Path, version: str, url: str, checksum: str, current: str = __version__
) -> Path | None:
    """The daemon got `update` and is about to exit 75: remember what was offered (None: not written)."""
    old = load_record(state_dir)
    attempts = old.attempts if old is not None and old.version == version else 0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = UpdateRecord(version, url, checksum, current, stamp, "pending", attempts)
    try:
        path = save_record(state_dir, record)
    except OSError as err:
        log.error("cannot record the offered update in %s: %s", state_dir, err)
        return None
    log.info("recorded the offered update in %s; exiting 75 so that it can be applied", path)
    return path


def auto_update_allowed(state_dir: Path, current: str = __version__) -> bool:
    """False while an offered version is not installed (so `update` cannot restart us in a loop)."""
    record = load_record(state_dir)
    if record is None:
        return True
    if record.version == current:
        log.info("runner %s is installed: the update offered on %s is done", current, record.offered_at)
        record_path(state_dir).unlink(missing_ok=True)
        return True
    log.warning(
        "the server offered runner %s on %s but this is %s (upgrade status: %s%s): auto-update is off "
        "for this run, so the same offer does not restart the runner again; delete %s to turn it back on",
        record.version,
        record.offered_at,
        current,
        record.status,
        f", {record.detail}" if record.detail else "",
        record_path(state_dir),
    )
    return False


def upgrade_argv(template: str, record: UpdateRecord) -> list[str]:
    """Split the command like a shell (no shell runs it) and fill {version}, {url}, {checksum}."""
    if not _VERSION.match(record.version):
        raise ValueError(f"the offered version {record.version!r} is not a plain version string")
    values = {"{version}": record.version, "{url}": record.url, "{checksum}": record.checksum}
    argv = []
    for arg in shlex.split(template):
        for key, value in values.items():
            arg = arg.replace(key, value)
        argv.append(arg)
    if not argv:
        raise ValueError(f"{COMMAND_ENV} is empty")
    return argv


def installed_version(python: str = sys.executable, run: Runner = subprocess.run) -> str:
    """The version a fresh interpreter imports now (this process still runs the old code)."""
    probe = "import bencher_runner; print(bencher_runner.__version__)"
    proc = run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def apply_pending_update(
    state_dir: Path,
    env: Mapping[str, str],
    current: str = __version__,
    run: Runner = subprocess.run,
) -> UpdateRecord | None:
    """The ExecStartPre step: run the upgrade command for a recorded offer. Never raises."""
    record = load_record(state_dir)
    if record is None or record.status == "upgraded":
        return record
    if record.version == current:
        return record  # already installed; the daemon clears the record at start
    template = env.get(COMMAND_ENV, "").strip()
    if not template:
        record.status, record.detail = "skipped", f"{COMMAND_ENV} is not set"
        log.warning(
            "the server offered runner %s (its binary at %s is Bencher's Rust runner, which this Python "
            "runner never downloads); %s is not set, so %s starts unchanged",
            record.version,
            record.url,
            COMMAND_ENV,
            current,
        )
        _save_quietly(state_dir, record)
        return record
    if record.attempts >= MAX_ATTEMPTS:
        log.warning("upgrade to %s failed %d times; not trying again", record.version, record.attempts)
        return record
    record.attempts += 1
    _save_quietly(state_dir, record)  # counted before running: a killed upgrade counts too
    try:
        _run_upgrade(template, record, env, current, run)
    except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired) as err:
        record.status, record.detail = "failed", str(err)
        log.error("upgrade to %s failed (%s); starting %s", record.version, err, current)
    else:
        now = installed_version(run=run)
        record.status = "upgraded"
        record.detail = f"the upgrade command succeeded; installed version: {now}"
        log.info("upgrade to %s done; installed version: %s", record.version, now)
        if now != record.version:
            log.warning("the installed version %s is not the offered %s", now, record.version)
    _save_quietly(state_dir, record)
    return record


def _run_upgrade(
    template: str, record: UpdateRecord, env: Mapping[str, str], current: str, run: Runner
) -> None:
    """Run the upgrade command (its output logged); RuntimeError when it exits non-zero."""
    argv = upgrade_argv(template, record)
    log.info("upgrading runner %s -> %s: %s", current, record.version, shlex.join(argv))
    child_env = {k: v for k, v in env.items() if k not in _HIDDEN_ENV}
    child_env.update(
        BENCHER_RUNNER_UPDATE_VERSION=record.version,
        BENCHER_RUNNER_UPDATE_URL=record.url,
        BENCHER_RUNNER_UPDATE_CHECKSUM=record.checksum,
    )
    proc = run(
        argv,
        env=child_env,
        stdin=subprocess.DEVNULL,
        timeout=UPGRADE_TIMEOUT_S,
        check=False,
        capture_output=True,
        text=True,
    )
    for line in (proc.stdout + proc.stderr).splitlines()[-20:]:
        log.info("upgrade: %s", line)
    if proc.returncode != 0:
        raise RuntimeError(f"the upgrade command exited {proc.returncode}")


def _save_quietly(state_dir: Path, record: UpdateRecord) -> None:
    try:
        save_record(state_dir, record)
    except OSError as err:
        log.error("cannot write the update record in %s: %s", state_dir, err)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bencher_runner.daemon.upgrade",
        description=f"Run {COMMAND_ENV} for an update the server offered (the systemd unit's "
        "ExecStartPre). Always exits 0: a failed upgrade must not stop the runner from starting.",
    )
    parser.add_argument("--state-dir", type=Path, help="default: BENCHER_RUNNER_STATE_DIR or user state")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        apply_pending_update(default_state_dir(args.state_dir), os.environ)
    except Exception:  # the start must go on whatever happens here
        log.exception("the upgrade step failed")
    return 0
