"""Durable outbox of terminal messages: a result survives a crash, a restart or a lost connection.

One JSON file per job, written to a temp file, fsynced, renamed over the final name and the directory
fsynced, so that a file either holds a whole message or does not exist. Files are removed only when the
server acks the job; after every (re)connect they are resent in the order they were queued.
"""

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from bencher_runner.spec.errors import RunnerError

_JOB = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class OutboxError(RunnerError):
    """The outbox directory cannot be read or written."""


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutboxError(f"cannot create the outbox directory {directory}: {err}") from None

    def _path(self, job: str) -> Path:
        if not _JOB.match(job):
            raise OutboxError(f"job id {job!r} cannot name an outbox file")
        return self.directory / f"{job}.json"

    def put(self, job: str, message: dict[str, Any]) -> None:
        path = self._path(job)
        tmp = path.with_suffix(".tmp")
        data = json.dumps({"queued_ns": time.time_ns(), "message": message}, ensure_ascii=False).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._sync_dir()
        except OSError as err:
            raise OutboxError(f"cannot write the result of job {job} to {path}: {err}") from None

    def remove(self, job: str) -> None:
        try:
            self._path(job).unlink(missing_ok=True)
            self._sync_dir()
        except OSError as err:
            raise OutboxError(f"cannot remove {self._path(job)}: {err}") from None

    def load(self) -> list[tuple[str, dict[str, Any]]]:
        """Queued messages, oldest first; unreadable files are skipped (left for a human)."""
        entries: list[tuple[int, str, dict[str, Any]]] = []
        for path in self.directory.glob("*.json"):
            try:
                doc = json.loads(path.read_bytes())
                message = doc["message"]
                if not isinstance(message, dict) or message.get("job") != path.stem:
                    continue
                entries.append((int(doc.get("queued_ns", 0)), path.stem, message))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        entries.sort(key=lambda e: (e[0], e[1]))
        return [(job, message) for _, job, message in entries]

    def _sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
