"""RunConfig: the one description of a job that both `runner run` and `runner daemon` execute.

Validated with pydantic so that a bad value from a flag or a job message becomes a SpecError naming
the field and the value, never a crash deep inside the pipeline.

`timeout_s` bounds the whole job (the pull, every boot and every iteration), as Bencher's server
does: its hard limit is the timeout plus 60 s counted from `running`, which the daemon sends when the
job arrives. So the clock is an explicit `started_at` (a time.monotonic() instant) that the daemon
sets; `runner run` leaves it unset and the clock starts when the job does.
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from bencher_runner.spec.bmf import benchmark_name
from bencher_runner.spec.errors import SpecError
from bencher_runner.spec.units import MIB

MIN_DISK_MIB = 64
MIN_MEMORY_MIB = 64
DEFAULT_MAX_OUTPUT = 25 * MIB
DEFAULT_JAIL_UID = 64434  # every VMM's uid and gid (sandbox/jail.py): no login account, not root
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged"

Accel = Literal["auto", "kvm", "tcg"]
Backend = Literal["qemu", "firecracker", "none"]  # "none": on the host, no sandbox


class RunConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(min_length=1)
    allow_local_image: bool = True  # `image` may name a local OCI layout (`runner run`); jobs: False
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    vcpus: int = Field(default=1, ge=1, le=255)
    memory_mib: int = Field(default=512, ge=MIN_MEMORY_MIB)
    disk_mib: int = Field(default=1024, ge=MIN_DISK_MIB)
    timeout_s: int = Field(default=300, ge=1)  # the whole job, from started_at
    started_at: float | None = None  # time.monotonic() when the job's clock started; None: at run_job
    iterations: int = Field(default=1, ge=0)
    allow_failure: bool = False
    max_output_bytes: int = Field(default=DEFAULT_MAX_OUTPUT, ge=0)
    output_paths: tuple[str, ...] = ()
    # Bencher's metric modes (spec/bmf.py): each iteration reports, instead of its output files, its
    # command's run time (build_time) and/or each output file's size (file_size) as BMF.
    build_time: bool = False
    file_size: bool = False
    benchmark_name: str | None = None  # of the build time; None: entrypoint + cmd, else the image
    max_file_count: int = Field(default=255, ge=0)
    grace_period_s: int = Field(default=1, ge=1, le=900)
    max_symlinks: int = Field(default=40, ge=0)
    network: bool = False
    network_mode: Literal["user", "tap"] = "user"  # user-mode NAT, or a TAP in a per-job netns
    # Registry pulls (image given as host[:port]/repo[:tag][@digest]); never logged.
    token: SecretStr | None = None
    registry_username: str | None = None
    registry_password: SecretStr | None = None
    insecure_registry: bool = False
    backend: Backend = "qemu"
    firecracker: Path | None = None  # the binary (else BENCHER_RUNNER_FIRECRACKER, else PATH)
    jailer: Path | None = None  # with it, Firecracker runs under the jailer (chroot, uid/gid drop)
    # The jail of every VMM (sandbox/jail.py); the jailer's uid/gid for Firecracker too.
    jail_uid: int = Field(default=DEFAULT_JAIL_UID, ge=1, le=MAX_ID)
    jail_gid: int = Field(default=DEFAULT_JAIL_UID, ge=1, le=MAX_ID)
    danger_no_jail: bool = False  # development hosts: the VMM runs unconfined (warned on every job)
    jailer_chroot_base: Path = Path("/srv/jailer")
    sandbox_log_level: Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"] = "Warning"
    accel: Accel = "auto"
    kernel: Path | None = None
    kernel_modules: Path | None = None

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


def make_run_config(**fields: Any) -> RunConfig:
    """Build a RunConfig, turning validation failures into one readable SpecError."""
    try:
        return RunConfig(**fields)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "config"
            value = e.get("input")
            problems.append(f"{where}={value!r}: {e['msg']}")
        raise SpecError("invalid run configuration: " + "; ".join(problems)) from None
