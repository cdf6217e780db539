"""Durable outbox of terminal messages: a result survives a crash, a restart or a lost connection.

One JSON file per job, written to a temp file, fsynced, renamed over the final name and the directory
fsynced, so that a file either holds a whole message or does not exist. Files are removed only when the
server acks the job; after every (re)connect they are resent in the order they were queued.

A file is named by a hash of the job id, so that any id the server sends can name one (the id itself is
inside, with the message's exact wire text).
"""

import hashlib
import json
import os
import re
import time
from pathlib import Path

from bencher_runner.atomicfile import sync_directory, write_atomic
from bencher_runner.protocol import Terminal
from bencher_runner.spec.errors import RunnerError

_LEGACY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")  # files written before names were hashed


class OutboxError(RunnerError):
    """The outbox directory cannot be read or written."""


def _file_name(job: str) -> str:
    return hashlib.sha256(job.encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".json"


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise OutboxError(f"cannot create the outbox directory {directory}: {err}") from None

    def _path(self, job: str) -> Path:
        return self.directory / _file_name(job)

    def put(self, message: Terminal) -> None:
        path = self._path(message.job)
        head = json.dumps({"queued_ns": time.time_ns(), "job": message.job})[:-1]  # still open: `}` cut
        data = f'{head},"message":{message.wire()}}}'.encode()
        try:
            write_atomic(path, data, mode=0o600)
        except OSError as err:
            raise OutboxError(f"cannot write the result of job {message.job!r} to {path}: {err}") from None

    def remove(self, job: str) -> None:
        paths = [self._path(job)]
        if _LEGACY_NAME.match(job):
            paths.append(self.directory / f"{job}.json")
        try:
            for path in paths:
                path.unlink(missing_ok=True)
            self._sync_dir()
        except OSError as err:
            raise OutboxError(f"cannot remove the outbox entry of job {job!r}: {err}") from None

    def park(self, job: str) -> Path:
        """Move the job's entry to `undelivered/` (the server kept refusing it): kept, never resent."""
        parked = self.directory / "undelivered"
        try:
            parked.mkdir(mode=0o700, exist_ok=True)
            target = parked / _file_name(job)
            os.replace(self._path(job), target)
            self._sync_dir()
        except FileNotFoundError:
            return parked
        except OSError as err:
            raise OutboxError(f"cannot move the outbox entry of job {job!r} aside: {err}") from None
        return target

    def load(self) -> list[Terminal]:
        """Queued messages, oldest first; unreadable files are skipped (left for a human)."""
        entries: list[tuple[int, str, Terminal]] = []
        for path in self.directory.glob("*.json"):
            try:
                doc = json.loads(path.read_bytes())
                message = doc["message"]
                job = doc.get("job", message.get("job"))
                if not isinstance(job, str) or message.get("job") != job:
                    continue
                entries.append((int(doc.get("queued_ns", 0)), job, Terminal.of(message)))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        entries.sort(key=lambda e: (e[0], e[1]))
        return [message for _, _, message in entries]

    def _sync_dir(self) -> None:
        sync_directory(self.directory)
