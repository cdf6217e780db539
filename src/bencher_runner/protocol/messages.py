"""The runner channel's messages: their wire form (runner -> server) and their parsing (server -> runner).

Typed values instead of dicts, so the state machine matches on types. Everything sent is encodable as
UTF-8 by construction (`encode`): a str that carries undecodable bytes (lone surrogates) would
otherwise crash the send or be refused by the server's JSON parser.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_ERROR_CHARS = 16 * 1024  # an error text longer than this is cut (it is one line of a UI)

Message = dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# Wire encoding

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def encode(message: Message) -> str:
    """The wire form of a message: compact JSON, UTF-8 kept as is, and always encodable as UTF-8.

    Lone surrogates (undecodable bytes that reached a str through ``surrogateescape``, e.g. a file name)
    become U+FFFD: the server's JSON parser rejects them, and `str.encode` would raise on them.
    """
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    return _LONE_SURROGATE.sub("\ufffd", text)


def wire_size(text: str) -> int:
    return len(text.encode())


# ---------------------------------------------------------------------------------------------------
# Runner -> server messages


@dataclass(frozen=True)
class Ready:
    poll_timeout: int
    runner: Message | None = None  # metadata for self-update (None: --no-auto-update)
    health: Message | None = None  # upstream's unreleased `health` (sent only with --announce-pause)

    def fields(self) -> Message:
        msg: Message = {"poll_timeout": self.poll_timeout}
        if self.runner is not None:
            msg["runner"] = self.runner
        if self.health is not None:
            msg["health"] = self.health
        return msg

    def wire(self) -> str:
        return encode({"event": "ready", **self.fields()})


@dataclass(frozen=True)
class Paused:
    """Upstream's unreleased `paused`: every field of `ready` plus why and since when (RFC 3339 UTC).
    A v0.6.12 server drops the connection on it: sent only with --announce-pause."""

    ready: Ready
    reasons: tuple[Message, ...]
    since: str

    def wire(self) -> str:
        reasons = list(self.reasons[:16])
        return encode({"event": "paused", **self.ready.fields(), "reasons": reasons, "since": self.since})


@dataclass(frozen=True)
class Running:
    def wire(self) -> str:
        return encode({"event": "running"})


@dataclass(frozen=True)
class Heartbeat:
    def wire(self) -> str:
        return encode({"event": "heartbeat"})


TerminalEvent = Literal["completed", "failed", "canceled"]


@dataclass(frozen=True)
class Terminal:
    """`completed`, `failed` or `canceled`, already encoded (it may be MiBs: built off the event loop)."""

    event: TerminalEvent
    job: str
    text: str = field(repr=False)

    def wire(self) -> str:
        return self.text

    @classmethod
    def of(cls, message: Message) -> "Terminal":
        event = message.get("event")
        job = message.get("job")
        if event not in ("completed", "failed", "canceled") or not isinstance(job, str):
            raise ValueError(f"not a terminal message: event={event!r}")
        return cls(event, job, encode(message))


RunnerMessage = Ready | Paused | Running | Heartbeat | Terminal


def one_line_error(text: str) -> str:
    text = text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + " [error text truncated]"
    return _LONE_SURROGATE.sub("\ufffd", text)


def failed_message(job: str, error: str) -> Terminal:
    return Terminal.of({"event": "failed", "job": job, "results": [], "error": one_line_error(error)})


def canceled_message(job: str) -> Terminal:
    return Terminal.of({"event": "canceled", "job": job})


# ---------------------------------------------------------------------------------------------------
# Server -> runner messages


@dataclass(frozen=True)
class Ack:
    job: str | None


@dataclass(frozen=True)
class JobOffer:
    raw: Message = field(repr=False)  # validated by `parse_job` when claimed

    @property
    def uuid(self) -> object:
        return self.raw.get("uuid")


@dataclass(frozen=True)
class NoJob:
    pass


@dataclass(frozen=True)
class Cancel:
    pass


@dataclass(frozen=True)
class Update:
    version: str
    url: str
    checksum: str


@dataclass(frozen=True)
class Garbage:
    """A frame that is no protocol message: bad JSON, binary, no or unknown `event`."""

    why: str


ServerMessage = Ack | JobOffer | NoJob | Cancel | Update | Garbage


def parse_server_message(frame: str | bytes) -> ServerMessage:
    if isinstance(frame, bytes):
        return Garbage("binary frame")
    try:
        msg = json.loads(frame)
    except ValueError:
        return Garbage(f"malformed JSON {frame[:200]!r}")
    if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
        return Garbage(f"message without an event {frame[:200]!r}")
    event = msg["event"]
    if event == "ack":
        job = msg.get("job")
        return Ack(job if isinstance(job, str) else None)
    if event == "job":
        return JobOffer(msg)
    if event == "no_job":
        return NoJob()
    if event == "cancel":
        return Cancel()
    if event == "update":
        return Update(str(msg.get("version")), str(msg.get("url")), str(msg.get("checksum")))
    return Garbage(f"unknown event {event[:64]!r}")
