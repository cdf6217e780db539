"""The `job` message of the runner protocol, and its translation into the RunConfig a job runs with.

Resources come only from the job (spec.cpu, spec.memory/disk in bytes rounded up to MiB, spec.network):
the runner adds no defaults of its own. Anything invalid or not supported becomes a SpecError whose text
goes into the `failed` message, so a bad job never crashes the daemon. The job's uuid names outbox files
and tags log lines, so it must be a UUID in the wire form (8-4-4-4-12 hex digits) and nothing else.
"""

import re
from collections.abc import Sized
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, SecretStr, ValidationError

from bencher_runner.spec.bmf import benchmark_name
from bencher_runner.spec.config import (
    NO_SANDBOX_ERROR,
    HostSettings,
    ImageLayout,
    RunConfig,
    make_job_request,
)
from bencher_runner.spec.errors import SpecError
from bencher_runner.spec.registry import parse_registry_url
from bencher_runner.spec.units import MIB, bytes_to_mib

MAX_ENTRYPOINT_LEN = 64
MAX_CMD_LEN = 64
MAX_ENV_LEN = 255
MAX_FILE_PATHS_LEN = 255
SANDBOXES = ("firecracker",)
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_PROJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
SHOWN_VALUE_CHARS = 60  # a hostile value is echoed at most this long


def shown(value: str) -> str:
    """``repr(value)``, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 4] + "…" + text[-3:]


def _check_uuid(value: str) -> str:
    if not _UUID.fullmatch(value):
        raise ValueError(f"expected a UUID such as 550e8400-e29b-41d4-a716-446655440000, got {shown(value)}")
    return value


Uuid = Annotated[str, AfterValidator(_check_uuid)]  # kept as sent: acks must repeat the server's spelling


class JobSpec(BaseModel):
    """`job.spec`: the hardware spec the job was queued for (unknown fields ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    uuid: Uuid | None = None
    name: str | None = None
    os: str | None = None
    architecture: str | None = None
    sandbox: str | None = None
    cpu: int
    memory: int
    disk: int
    network: bool = False


class JobConfig(BaseModel):
    """`job.config`: what to run (unknown fields such as average/fold/backdate ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    registry: str
    project: str
    digest: str
    image: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: dict[str, str] | None = None
    timeout: int
    file_paths: list[str] | None = None
    build_time: bool | None = None
    file_size: bool | None = None
    iter: int | None = None
    allow_failure: bool | None = None


class ClaimedJob(BaseModel):
    """The `job` message without its `event` tag."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    uuid: Uuid
    spec: JobSpec
    config: JobConfig
    oci_token: SecretStr | None = None
    timeout: int | None = None
    created: str | None = None


def parse_job(message: dict[str, Any]) -> ClaimedJob:
    """Validate a `job` message (the `event` key is ignored); SpecError names every bad field."""
    try:
        return ClaimedJob.model_validate(message)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "job"
            problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        raise SpecError("invalid job message: " + "; ".join(problems)) from None


def image_reference(config: JobConfig, layout: ImageLayout = "bencher") -> tuple[str, bool]:
    """`{registry host[:port]}/{project}@{digest}` (legacy: `.../{project}/images@{digest}`) and
    whether the registry speaks plain HTTP."""
    registry, insecure = parse_registry_url(config.registry)  # never a path: a registry only
    if not _PROJECT.match(config.project):
        raise SpecError(f"config.project={config.project!r}: expected the project UUID")
    if not _DIGEST.match(config.digest):
        raise SpecError(
            f"config.digest={config.digest!r}: expected sha256:<64 hex> or sha512:<128 hex> (lowercase)"
        )
    repo = f"{config.project}/images" if layout == "legacy" else config.project
    return f"{registry}/{repo}@{config.digest}", insecure


def build_time_benchmark(config: JobConfig) -> str:
    """Bencher's name for a job's build time: entrypoint + cmd joined by spaces, else the image
    reference, else project@digest."""
    command = " ".join((*(config.entrypoint or ()), *(config.cmd or ())))
    return benchmark_name(command, config.image, f"{config.project}@{config.digest}")


def _check_len(name: str, items: Sized | None, limit: int) -> None:
    if items is not None and len(items) > limit:
        raise SpecError(f"config.{name} has {len(items)} items; at most {limit} are allowed")


def build_config_from_job(job: ClaimedJob, host: HostSettings) -> RunConfig:
    """The RunConfig of a claimed job; SpecError (with a user-facing text) when it cannot run here."""
    spec, config = job.spec, job.config
    if spec.sandbox is None:
        if not host.allow_no_sandbox:
            raise SpecError(NO_SANDBOX_ERROR)
    elif spec.sandbox not in SANDBOXES:
        raise SpecError(f"spec.sandbox={spec.sandbox!r} is not supported; this runner supports firecracker")
    if spec.cpu < 1:
        raise SpecError(f"spec.cpu={spec.cpu}: a job needs at least 1 CPU")
    if spec.memory < 1:
        raise SpecError(f"spec.memory={spec.memory}: memory must be at least 1 byte")
    if spec.disk < 1:
        raise SpecError(f"spec.disk={spec.disk}: disk must be at least 1 byte")
    if spec.disk > host.max_disk_mib * MIB:
        raise SpecError(
            f"spec.disk={spec.disk} bytes is more than this runner gives a job "
            f"({host.max_disk_mib} MiB, --max-disk)"
        )
    if config.timeout < 1:
        raise SpecError(f"config.timeout={config.timeout}: the timeout must be at least 1 second")
    _check_len("entrypoint", config.entrypoint, MAX_ENTRYPOINT_LEN)
    _check_len("cmd", config.cmd, MAX_CMD_LEN)
    _check_len("env", config.env, MAX_ENV_LEN)
    _check_len("file_paths", config.file_paths, MAX_FILE_PATHS_LEN)
    iterations = 1 if config.iter is None else config.iter
    if iterations < 0:
        raise SpecError(f"config.iter={iterations}: the iteration count cannot be negative")
    file_paths = config.file_paths or []
    if len(file_paths) > host.max_file_count:
        raise SpecError(
            f"config.file_paths has {len(file_paths)} items; this runner allows at most "
            f"{host.max_file_count} (--max-file-count)"
        )
    image, insecure = image_reference(config, host.image_layout)
    request = make_job_request(
        image=image,
        allow_local_image=False,  # a job's image comes from a registry, never a host directory
        insecure_registry=insecure,
        token=job.oci_token,
        entrypoint=tuple(config.entrypoint) if config.entrypoint is not None else None,
        cmd=tuple(config.cmd) if config.cmd is not None else None,
        env=dict(config.env or {}),
        vcpus=spec.cpu,
        memory_mib=bytes_to_mib(spec.memory),
        disk_mib=bytes_to_mib(spec.disk),
        network=spec.network,
        sandboxed=spec.sandbox is not None,
        timeout_s=config.timeout,
        iterations=iterations,
        allow_failure=bool(config.allow_failure),
        output_paths=tuple(file_paths),
        build_time=bool(config.build_time),
        file_size=bool(config.file_size),
        benchmark_name=build_time_benchmark(config),
    )
    return RunConfig(job=request, host=host)
