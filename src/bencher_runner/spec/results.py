"""Result types: one iteration's output and a whole run's result.

`IterationOutput.to_protocol()` is the wire form of PROTOCOL.md ("Iteration output"): exit_code,
then stdout/stderr/output only when non-empty, bytes decoded as UTF-8 with replacement. The same
types make `runner run --json` and the daemon's `completed`/`failed` messages. `runner run --json`
is read by scripts, so its documents always have the same keys (an empty string, dict or list, or
null, never a missing key): a timeout before the command printed anything must not change the shape.
A build_time/file_size job reports, instead of its output files, one Bencher Metric Format entry
(spec/bmf.py); the files stay in `output` for `runner run --output-dir`.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

from bencher_runner.spec.bmf import BMF_OUTPUT_KEY
from bencher_runner.spec.errors import RunnerError


def lossy(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class IterationOutput:
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    output: dict[str, bytes] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # requested output file -> why it is absent
    truncated: tuple[str, ...] = ()  # "stdout", "stderr" and output paths cut at the size limit
    bmf: str | None = None  # build_time/file_size: BMF JSON reported instead of the files

    def reported_output(self) -> dict[str, str]:
        """The `output` field: the files as text, or the one metric entry that replaces them."""
        if self.bmf is not None:
            return {BMF_OUTPUT_KEY: self.bmf}
        return {path: lossy(data) for path, data in self.output.items()}

    def to_protocol(self) -> dict[str, Any]:
        out: dict[str, Any] = {"exit_code": self.exit_code}
        if self.stdout:
            out["stdout"] = lossy(self.stdout)
        if self.stderr:
            out["stderr"] = lossy(self.stderr)
        if output := self.reported_output():
            out["output"] = output
        return out

    def to_json(self) -> dict[str, Any]:
        """`runner run --json`: every protocol field (empty ones too) plus what the protocol lacks."""
        return {
            "exit_code": self.exit_code,
            "stdout": lossy(self.stdout),
            "stderr": lossy(self.stderr),
            "output": self.reported_output(),
            "missing": dict(self.missing),
            "truncated": list(self.truncated),
        }


@dataclass(frozen=True)
class SandboxInfo:
    backend: str
    accel: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    network: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "accel": self.accel,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "disk_mib": self.disk_mib,
            "network": self.network,
        }


@dataclass(frozen=True)
class RunResult:
    status: Literal["completed", "failed"]
    results: list[IterationOutput]
    sandbox: SandboxInfo | None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, object] = field(default_factory=dict)  # host tuning state, CPU layout
    failure: RunnerError | None = field(default=None, compare=False)  # the error behind `error`
    interference: list[dict[str, Any] | None] = field(default_factory=list)  # host/interference.py
    fingerprint: dict[str, Any] | None = None  # host/fingerprint.py; neither goes on the wire

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "results": [r.to_json() for r in self.results],
            "error": self.error,
            "sandbox": self.sandbox.to_json() if self.sandbox else None,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "host": dict(self.metadata),
            "interference": list(self.interference),
            "fingerprint": self.fingerprint,
        }
