"""What the v0.6.12 server accepts and sends on the runner channel, as data (no I/O).

The real server parses every text frame with serde into `RunnerMessage`; whether a frame parses decides
what happens to it (dropped connection while idle, ignored during a job), so the fake must accept and
refuse exactly the same frames. This module mirrors those types' rules: required fields, `poll_timeout`
in 1..=900, UUIDs, `exit_code` as an i32, metadata enums, unknown fields ignored. It also holds the
checks the server applies elsewhere: the runner key format and `Bearer` parsing, and the stored job
config (`JsonJobConfig`) that must deserialize before a job can be claimed.
"""

import base64
import hashlib
import hmac
import json
import re
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

KEY_PREFIX = "bencher_runner_"
_KEY_BODY = re.compile(r"[0-9A-Za-z]{30}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
I32 = (-(2**31), 2**31 - 1)
POLL_TIMEOUT_RANGE = (1, 900)
MAX_ENTRYPOINT, MAX_CMD, MAX_FILE_PATHS, MAX_ENV = 64, 64, 255, 255


class WireError(ValueError):
    """The frame does not parse as the server's type (the text says which field)."""


@dataclass(frozen=True)
class RunnerMetadata:
    os: str
    arch: str
    version: str
    channel: str | None = None
    checksum: str | None = None


@dataclass(frozen=True)
class Ready:
    poll_timeout: int | None = None
    runner: RunnerMetadata | None = None
    event: str = "ready"


@dataclass(frozen=True)
class Running:
    event: str = "running"


@dataclass(frozen=True)
class Heartbeat:
    event: str = "heartbeat"


@dataclass(frozen=True)
class Completed:
    job: str
    results: list[dict[str, Any]]
    event: str = "completed"


@dataclass(frozen=True)
class Failed:
    job: str
    results: list[dict[str, Any]]
    error: str
    event: str = "failed"


@dataclass(frozen=True)
class Canceled:
    job: str
    event: str = "canceled"


RunnerMessage = Ready | Running | Heartbeat | Completed | Failed | Canceled
Terminal = Completed | Failed | Canceled


def _reject_constant(name: str) -> Any:
    raise WireError(f"{name} is not JSON")


def loads(text: str) -> Any:
    """Strict JSON, as serde_json reads it (no NaN/Infinity)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise WireError(f"not JSON: {exc}") from None


def dumps(message: dict[str, Any]) -> str:
    """Compact JSON, as serde_json writes it."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_str(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise WireError(f"{name} must be a string")
    return value


def _required(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise WireError(f"missing field `{name}`")
    return obj[name]


def parse_uuid(value: Any, what: str = "job") -> str:
    """A UUID in any form the uuid crate reads, returned as it serializes it (lowercase, hyphenated)."""
    if not isinstance(value, str):
        raise WireError(f"{what} must be a UUID string")
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise WireError(f"{what}={value!r} is not a UUID") from None


def _metadata(value: Any) -> RunnerMetadata | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise WireError("runner must be an object")
    os_name, arch, version = (_required(value, k) for k in ("os", "arch", "version"))
    if os_name not in ("linux", "macos", "windows"):
        raise WireError(f"runner.os={os_name!r} is not linux, macos or windows")
    if arch not in ("x86_64", "aarch64"):
        raise WireError(f"runner.arch={arch!r} is not x86_64 or aarch64")
    if not isinstance(version, str):
        raise WireError("runner.version must be a string")
    channel = value.get("channel")
    if channel not in (None, "stable", "canary"):
        raise WireError(f"runner.channel={channel!r} is not stable or canary")
    checksum = value.get("checksum")
    if checksum is not None and not (isinstance(checksum, str) and _SHA256.fullmatch(checksum)):
        raise WireError("runner.checksum is not a 64-character lowercase hex SHA-256")
    return RunnerMetadata(os_name, arch, version, channel, checksum)


def _iteration(value: Any) -> dict[str, Any]:
    """One `JsonIterationOutput`, re-serialized as the server stores it (absent fields left out)."""
    if not isinstance(value, dict):
        raise WireError("a result must be an object")
    code = _required(value, "exit_code")
    if not _is_int(code) or not I32[0] <= code <= I32[1]:
        raise WireError(f"exit_code={code!r} is not an i32")
    out: dict[str, Any] = {"exit_code": code}
    for name in ("stdout", "stderr"):
        text = _opt_str(value, name)
        if text is not None:
            out[name] = text
    files = value.get("output")
    if files is not None:
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise WireError("output must map paths to strings")
        out["output"] = dict(sorted(files.items()))
    return out


def _results(obj: dict[str, Any]) -> list[dict[str, Any]]:
    results = _required(obj, "results")
    if not isinstance(results, list):
        raise WireError("results must be a list")
    return [_iteration(r) for r in results]


def parse_runner_message(text: str) -> RunnerMessage:
    """A text frame as `RunnerMessage`, or WireError when serde would refuse it."""
    obj = loads(text)
    if not isinstance(obj, dict):
        raise WireError("a message must be a JSON object")
    event = obj.get("event")
    if event == "ready":
        pt = obj.get("poll_timeout")
        if pt is not None and not (_is_int(pt) and POLL_TIMEOUT_RANGE[0] <= pt <= POLL_TIMEOUT_RANGE[1]):
            raise WireError(f"poll_timeout={pt!r} is not an integer in 1..=900")
        return Ready(pt, _metadata(obj.get("runner")))
    if event == "running":
        return Running()
    if event == "heartbeat":
        return Heartbeat()
    if event == "completed":
        return Completed(parse_uuid(_required(obj, "job")), _results(obj))
    if event == "failed":
        job, results, error = parse_uuid(_required(obj, "job")), _results(obj), _required(obj, "error")
        if not isinstance(error, str):
            raise WireError("error must be a string")
        return Failed(job, results, error)
    if event == "canceled":
        return Canceled(parse_uuid(_required(obj, "job")))
    raise WireError(f"unknown event {event!r}")


# -- auth ------------------------------------------------------------------------------------------------
def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, token trimmed)."""
    if header is None or " " not in header:
        return None
    scheme, token = header.split(" ", 1)
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def valid_key(key: str) -> bool:
    return key.startswith(KEY_PREFIX) and _KEY_BODY.fullmatch(key[len(KEY_PREFIX) :]) is not None


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# -- stored job config -------------------------------------------------------------------------------------
def config_error(config: Any) -> str | None:
    """Why a stored job config would not deserialize as `JsonJobConfig` (None when it does)."""
    if not isinstance(config, dict):
        return "config is not an object"
    for name in ("registry", "project", "digest", "timeout"):
        if name not in config:
            return f"config.{name} is missing"
    registry = config["registry"]
    if not isinstance(registry, str) or not urlsplit(registry).scheme or not urlsplit(registry).netloc:
        return f"config.registry={registry!r} is not a URL"
    try:
        parse_uuid(config["project"], "config.project")
    except WireError as exc:
        return str(exc)
    if not isinstance(config["digest"], str) or not _DIGEST.fullmatch(config["digest"]):
        return f"config.digest={config['digest']!r} is not sha256:<64 hex> or sha512:<128 hex>"
    timeout = config["timeout"]
    if not _is_int(timeout) or not 1 <= timeout <= I32[1]:
        return f"config.timeout={timeout!r} is not in 1..=2147483647"
    for name, limit in (("entrypoint", MAX_ENTRYPOINT), ("cmd", MAX_CMD), ("file_paths", MAX_FILE_PATHS)):
        items = config.get(name)
        if items is not None and (not isinstance(items, list) or not all(isinstance(i, str) for i in items)):
            return f"config.{name} is not a list of strings"
        if items is not None and len(items) > limit:
            return f"config.{name} has {len(items)} items, more than {limit}"
    env = config.get("env")
    if env is not None and (not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values())):
        return "config.env is not a map of strings"
    if env is not None and len(env) > MAX_ENV:
        return f"config.env has {len(env)} entries, more than {MAX_ENV}"
    for name in ("build_time", "file_size", "allow_failure"):
        if config.get(name) is not None and not isinstance(config[name], bool):
            return f"config.{name} is not a bool"
    iters = config.get("iter")
    if iters is not None and (not _is_int(iters) or iters < 0):
        return f"config.iter={iters!r} is not a non-negative integer"
    return None


CONFIG_FIELDS = (
    "registry", "project", "digest", "image", "entrypoint", "cmd", "env", "timeout", "file_paths",
    "build_time", "file_size", "average", "iter", "fold", "allow_failure", "backdate",
)  # fmt: skip


def stored_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the server re-serializes `JsonJobConfig`: its fields in its order, absent ones and
    unknown ones left out, the project UUID and registry URL normalized the way the uuid and url crates
    write them (a bare host gets a trailing `/`)."""
    out = {k: config[k] for k in CONFIG_FIELDS if config.get(k) is not None}
    out["project"] = parse_uuid(out["project"], "config.project")
    parts = urlsplit(out["registry"])
    if not parts.path:
        out["registry"] = parts._replace(path="/").geturl()
    return out


# -- OCI token ------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_oci_token(*, runner: str, project: str, issued: int, secret: bytes = b"fake-bencher") -> str:
    """A pull-only HS256 JWT shaped like the server's (`aud` oci_runner, 600 s, scoped to the project)."""
    header = {"typ": "JWT", "alg": "HS256"}
    claims = {
        "aud": "oci_runner",
        "exp": issued + 600,
        "iat": issued,
        "iss": "http://fake-bencher.invalid/",
        "sub": runner,
        "oci": {"repository": project, "actions": ["pull"]},
    }
    signing = f"{_b64(dumps(header).encode())}.{_b64(dumps(claims).encode())}"
    signature = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(signature)}"
