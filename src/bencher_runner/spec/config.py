"""The two settings of a run: what the job asks for (JobRequest) and how this host runs jobs
(HostSettings). A RunConfig is the pair; both `runner run` and `runner daemon` execute one.

A job request comes from a Bencher `job` message (spec/jobspec.py) or from `runner run`'s job flags;
host settings come from the one set of host flags both commands take (cli/host_options.py), so every
host setting and every policy about impossible combinations is the same for both. Each default is
written here once.

Validated with pydantic so that a bad value from a flag or a job message becomes a SpecError naming
the field and the value, never a crash deep inside the pipeline.

`timeout_s` bounds the whole job (the pull, every boot and every iteration), as Bencher's server
does: its hard limit is the timeout plus 60 s counted from `running`, which the daemon sends when the
job arrives. So the clock is an explicit `started_at` (a time.monotonic() instant) that the daemon
sets; `runner run` leaves it unset and the clock starts when the job does.
"""

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bencher_runner.spec.bmf import benchmark_name
from bencher_runner.spec.errors import SpecError
from bencher_runner.spec.units import MIB

MIN_DISK_MIB = 64
MIN_MEMORY_MIB = 64
MAX_DISK_MIB = 2**43 - 1  # a disk's size in bytes must fit in off_t
MAX_TIMEOUT_S = 2**31 - 1  # flags only: a job message's values are bounded by the host checks
MAX_ITERATIONS = 1_000_000
MAX_FILE_COUNT = 65_535
DEFAULT_MAX_OUTPUT = 25 * MIB
DEFAULT_MAX_FILE_COUNT = 255
DEFAULT_GRACE_PERIOD_S = 1
DEFAULT_MAX_SYMLINKS = 40
DEFAULT_MAX_DISK_MIB = 1024 * 1024  # 1 TiB: a policy cap (--max-disk); the host's free space is checked too
DEFAULT_JAIL_UID = 64434  # every VMM's uid and gid (sandbox/jail.py): no login account, not root
DEFAULT_JAILER_CHROOT_BASE = Path("/srv/jailer")
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged"
NO_SANDBOX_ERROR = (
    "Job requires non-sandboxed execution but runner was not started with --danger-allow-no-sandbox"
)
FIRECRACKER_NAT_ERROR = "--sandbox firecracker has no user-mode NAT: use --network-mode tap"
FIRECRACKER_TCG_ERROR = "--sandbox firecracker runs on KVM only; use --sandbox qemu for --accel tcg"

Accel = Literal["auto", "kvm", "tcg"]
VmBackendName = Literal["qemu", "firecracker"]
Backend = Literal["qemu", "firecracker", "none"]  # "none": on the host, no sandbox
NetworkMode = Literal["user", "tap"]
LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]  # Firecracker's
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
DEFAULT_LOG_LEVEL: LogLevel = "Warning"
ImageLayout = Literal["bencher", "legacy"]


class JobRequest(BaseModel):
    """Everything a job asks for: a Bencher job message, or `runner run`'s job flags."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(min_length=1)
    allow_local_image: bool = True  # `image` may name a local OCI layout (`runner run`); jobs: False
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    vcpus: int = Field(default=1, ge=1, le=255)
    memory_mib: int = Field(default=512, ge=MIN_MEMORY_MIB)  # the host's MemTotal bounds it
    disk_mib: int = Field(default=1024, ge=MIN_DISK_MIB)  # --max-disk and free space bound it
    timeout_s: int = Field(default=300, ge=1)  # the whole job, from started_at
    started_at: float | None = None  # time.monotonic() when the job's clock started; None: at run_job
    iterations: int = Field(default=1, ge=0)
    allow_failure: bool = False
    output_paths: tuple[str, ...] = ()
    # Bencher's metric modes (spec/bmf.py): each iteration reports, instead of its output files, its
    # command's run time (build_time) and/or each output file's size (file_size) as BMF.
    build_time: bool = False
    file_size: bool = False
    benchmark_name: str | None = None  # of the build time; None: entrypoint + cmd, else the image
    network: bool = False
    sandboxed: bool = True  # False: Bencher's `spec.sandbox: null`, `runner run --sandbox none`
    # Registry pulls (image given as host[:port]/repo[:tag][@digest]); never logged.
    token: SecretStr | None = None
    registry_username: str | None = None
    registry_password: SecretStr | None = None
    insecure_registry: bool = False

    def deadline(self, now: float) -> float:
        """The time.monotonic() instant by which the whole job must end (``now``: when it starts)."""
        return (now if self.started_at is None else self.started_at) + self.timeout_s

    def build_time_name(self) -> str:
        """The build-time benchmark's name: as set (a job's), else entrypoint + cmd, else the image."""
        command = " ".join((*(self.entrypoint or ()), *(self.cmd or ())))
        return benchmark_name(self.benchmark_name, command, self.image)

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if not name or "=" in name or "\0" in name or "\0" in value:
                raise ValueError(f"invalid environment variable {name!r}: use NAME=VALUE, NAME non-empty")
        return env

    @field_validator("output_paths")
    @classmethod
    def _output_paths(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        """The guest gets these as UTF-8 C strings: an empty path, a NUL or a lone surrogate (from a job
        message's JSON escapes) cannot reach it."""
        for path in paths:
            if not path or "\0" in path or any("\ud800" <= c <= "\udfff" for c in path):
                shown = path.encode("utf-8", "backslashreplace").decode()
                raise ValueError(f"output file path {shown!r} must be non-empty valid text without NUL bytes")
        return paths


class HostSettings(BaseModel):
    """How this host runs every job: the same for `runner run` and `runner daemon`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: VmBackendName = "qemu"  # the microVM that runs sandboxed jobs
    allow_no_sandbox: bool = False  # run jobs that ask for no sandbox (`runner run --sandbox none`: yes)
    accel: Accel = "auto"
    kernel: Path | None = None  # else the built lean kernel, else the fetched cloud kernel
    kernel_modules: Path | None = None
    network_mode: NetworkMode | None = None  # None: user-mode NAT for QEMU, TAP for Firecracker
    max_output_bytes: int = Field(default=DEFAULT_MAX_OUTPUT, ge=0)
    max_file_count: int = Field(default=DEFAULT_MAX_FILE_COUNT, ge=0, le=MAX_FILE_COUNT)
    max_disk_mib: int = Field(default=DEFAULT_MAX_DISK_MIB, ge=MIN_DISK_MIB, le=MAX_DISK_MIB)
    grace_period_s: int = Field(default=DEFAULT_GRACE_PERIOD_S, ge=1, le=900)
    max_symlinks: int = Field(default=DEFAULT_MAX_SYMLINKS, ge=0)
    image_layout: ImageLayout = "bencher"  # how a job's image reference is spelled (daemon)
    firecracker: Path | None = None  # the binary (else BENCHER_RUNNER_FIRECRACKER, else PATH)
    jailer: Path | None = None  # with it, Firecracker runs under the jailer (chroot, uid/gid drop)
    # The jail of every VMM (sandbox/jail.py); the jailer's uid/gid for Firecracker too.
    jail_uid: int = Field(default=DEFAULT_JAIL_UID, ge=1, le=MAX_ID)
    jail_gid: int = Field(default=DEFAULT_JAIL_UID, ge=1, le=MAX_ID)
    danger_no_jail: bool = False  # development hosts: the VMM runs unconfined (warned on every job)
    jailer_chroot_base: Path = DEFAULT_JAILER_CHROOT_BASE
    sandbox_log_level: LogLevel = DEFAULT_LOG_LEVEL

    @model_validator(mode="after")
    def _possible(self) -> "HostSettings":
        if self.backend == "firecracker":
            if self.accel == "tcg":
                raise ValueError(FIRECRACKER_TCG_ERROR)
            if self.network_mode == "user":
                raise ValueError(FIRECRACKER_NAT_ERROR)
        return self

    @property
    def network(self) -> NetworkMode:
        """The network of a job that asks for one."""
        return self.network_mode or ("tap" if self.backend == "firecracker" else "user")

    @property
    def jail_ids(self) -> tuple[int, int] | None:
        """The jail's uid and gid (the owner of a TAP device), None without a jail."""
        return None if self.danger_no_jail else (self.jail_uid, self.jail_gid)


class RunConfig(BaseModel):
    """One job as this host runs it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job: JobRequest
    host: HostSettings = Field(default_factory=HostSettings)

    @model_validator(mode="after")
    def _runnable(self) -> "RunConfig":
        if not self.job.sandboxed and not self.host.allow_no_sandbox:
            raise ValueError(NO_SANDBOX_ERROR)
        return self

    @property
    def backend(self) -> Backend:
        """What runs this job: the host's microVM, or "none" for a job that asks for no sandbox."""
        return self.host.backend if self.job.sandboxed else "none"

    def with_clock(self, started_at: float) -> "RunConfig":
        """The same job, its clock started at ``started_at`` (when the daemon claimed it)."""
        return self.model_copy(update={"job": self.job.model_copy(update={"started_at": started_at})})


def _problems(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "value_error" and not e["loc"]:
            problems.append(e["msg"].removeprefix("Value error, "))
            continue
        problems.append(f"{where}={e.get('input')!r}: {e['msg']}")
    return "; ".join(problems)


def make_host_settings(**fields: Any) -> HostSettings:
    """HostSettings from flag values; SpecError naming every bad one."""
    try:
        return HostSettings(**fields)
    except ValidationError as err:
        raise SpecError("invalid runner settings: " + _problems(err)) from None


def make_job_request(**fields: Any) -> JobRequest:
    try:
        return JobRequest(**fields)
    except ValidationError as err:
        raise SpecError("invalid run configuration: " + _problems(err)) from None


def make_run_config(*, host: HostSettings | None = None, **fields: Any) -> RunConfig:
    """A RunConfig from flat fields, each going to the request or the host settings by its name
    (``backend="none"`` is a request for no sandbox, which this caller allows); SpecError on a bad one."""
    if fields.get("backend") == "none":
        fields.pop("backend")
        fields["sandboxed"] = False
        fields.setdefault("allow_no_sandbox", True)
    host_fields = {name: fields.pop(name) for name in list(fields) if name in HostSettings.model_fields}
    if host is None or host_fields:
        host = make_host_settings(**{**(host.model_dump() if host else {}), **host_fields})
    try:
        return RunConfig(job=make_job_request(**fields), host=host)
    except ValidationError as err:
        raise SpecError(_problems(err)) from None
