"""Bencher Metric Format (BMF) for `build_time` / `file_size` jobs, in the shape Bencher's runner sends.

With either flag an iteration's output files are replaced on the wire by one entry under the key
``"\\0bencher"``, whose value is BMF JSON text: ``{benchmark: {measure: {"value": v, "lower_value":
null, "upper_value": null}}}``, compact like serde_json's output. The measures are Bencher's built-in
slugs ``build-time`` (seconds, rounded to 0.01 s as Bencher does) and ``file-size`` (bytes, the
file's whole size even when its content was cut at the output limit). The build time is named after
the job's entrypoint + cmd, else its image, else project@digest; each file size after the file's
basename. Checked against bencherdev/bencher v0.6.12 (plus/bencher_runner/src/up/job.rs,
lib/bencher_json/src/project/measure/built_in.rs).

One deliberate difference: Bencher's build time is the wall time of the whole iteration, pull,
unpack, mkfs and boot included, so it measures the runner's cache state as much as the build. Here
it is the command's own run time (the guest's clock from exec to exit), reported per iteration like
Bencher's (the server folds iterations), so two commits compare by what their build does.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

BMF_OUTPUT_KEY = "\0bencher"
BUILD_TIME = "build-time"
FILE_SIZE = "file-size"
MAX_BENCHMARK_NAME_BYTES = 1024  # Bencher's BenchmarkName limit; an empty name is invalid too


def valid_benchmark_name(name: str | None) -> bool:
    return name is not None and 0 < len(name.encode()) <= MAX_BENCHMARK_NAME_BYTES


def benchmark_name(*candidates: str | None) -> str:
    """The first candidate Bencher accepts as a benchmark name, else the last one cut to the limit.

    Bencher drops the build-time metric when its first choice is invalid; taking the next one keeps it.
    """
    for candidate in candidates:
        if candidate is not None and valid_benchmark_name(candidate):
            return candidate
    last = (candidates[-1] if candidates else None) or "build"
    return last.encode()[:MAX_BENCHMARK_NAME_BYTES].decode(errors="ignore") or "build"


def file_benchmark_name(path: str) -> str:
    """A file's basename, or the whole path when it has none (``/``, ``..``), as Bencher names it."""
    name = PurePosixPath(path).name
    return path if name in ("", "..") else name


def _metric(value: float) -> dict[str, float | None]:
    return {"value": value, "lower_value": None, "upper_value": None}


@dataclass(frozen=True)
class MetricReport:
    bmf: str | None  # None: nothing to report (file_size alone and no file collected)
    warnings: list[str] = field(default_factory=list)


def metric_report(
    *, build_time: tuple[str, float] | None, file_sizes: Mapping[str, int] | None
) -> MetricReport:
    """BMF for one iteration: ``build_time`` = (benchmark name, seconds); ``file_sizes``: path -> bytes
    of every collected file, in the order the job asked for them."""
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    warnings: list[str] = []
    if build_time is not None:
        name, seconds = build_time
        results.setdefault(name, {})[BUILD_TIME] = _metric(round(seconds, 2))
    named: dict[str, str] = {}
    for path, size in (file_sizes or {}).items():
        name = file_benchmark_name(path)
        if not valid_benchmark_name(name):
            warnings.append(f"{FILE_SIZE}: {path} gives no valid benchmark name; its size is not reported")
            continue
        if name in named:
            warnings.append(f"{FILE_SIZE}: {named[name]} and {path} are both named {name}; {path} is kept")
        named[name] = path
        results.setdefault(name, {})[FILE_SIZE] = _metric(float(size))
    if not results:
        return MetricReport(None, warnings)
    return MetricReport(json.dumps(results, separators=(",", ":"), ensure_ascii=False), warnings)
