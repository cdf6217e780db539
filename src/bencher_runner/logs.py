"""Log set-up for the daemon: readable text by default, one JSON object a line with ``--log-format json``.

Every record carries the uuid of the job it belongs to (``job``), taken from a context variable that
the daemon sets for a job's task and worker thread (``asyncio.to_thread`` copies the context), so a log
collector can follow one job across the event loop and the worker. JSON rendering is python-json-logger's.
"""

import contextvars
import logging
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_job", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(job_tag)s: %(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(message)s %(job)s"


class JobContext(logging.Filter):
    """Adds ``job`` (the uuid, or None outside a job) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job = getattr(record, "job", None) or current_job.get()
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [job=uuid]: message``; the job tag only inside a job."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job", None)
        record.job_tag = f" [job={job}]" if job else ""
        return super().formatMessage(record)


def setup_logging(fmt: LogFormat = "text", *, verbose: bool = False) -> None:
    """Configure the root logger once for the process (stderr)."""
    handler = logging.StreamHandler()
    handler.addFilter(JobContext())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                JSON_FIELDS,
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",  # ISO 8601, UTC
            )
        )
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("bencher_runner.daemon.ws").setLevel(logging.INFO)  # handshake headers hold the key
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
