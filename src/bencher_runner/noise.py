"""`runner noise`: measure a host before trusting its numbers.

The same static reference workloads (guest/noise.c: an integer loop, a memory copy, a syscall loop)
run N times on one benchmark CPU of the bare host (affinity set) and N times inside the sandbox
through the normal job path (`job.run_job`, the code `runner run` uses, from a tiny OCI layout built
here in a temp dir), so the spread of each says how repeatable this host is, and the ratio of their
medians what the sandbox costs. Every bare run is watched by the interference sampler and every
sandbox run gets the job's interference report, so a noisy verdict names what disturbed it. Under
TCG the sandbox figures are emulated: they are shown, but neither their spread nor the overhead is
held against the host.
"""

import hashlib
import io
import json
import os
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bencher_runner.host.cpus import online_cpus, partition
from bencher_runner.host.fingerprint import host_fingerprint
from bencher_runner.host.sampler import InterferenceSampler
from bencher_runner.host.tuning import TuningOptions, tuned_host
from bencher_runner.spec.errors import RunnerError, SandboxError, SpecError

if TYPE_CHECKING:
    from bencher_runner.spec.config import HostSettings

NOISE_NAME = "bencher-noise"
WORKLOADS = ("cpu", "mem", "syscall")
# A workload whose runs spread more than this (coefficient of variation) cannot show a regression
# of a few percent with a handful of runs: the host is noisy for it.
NOISY_CV = 0.03
SANDBOX_TIMEOUT_S = 900
EMULATED_NOTE = (
    "sandbox figures are emulated (TCG): their spread and the overhead are not held against the host"
)


def find_noise_binary() -> Path:
    path = Path(str(resources.files("bencher_runner") / "_agent" / NOISE_NAME))
    if not path.is_file():
        raise SandboxError(
            f"the reference workloads are not built ({path} is missing); run `make noise` "
            "(needs gcc and static libc: `apt-get install gcc libc6-dev`)"
        )
    return path


def parse_output(text: str) -> dict[str, int]:
    """bencher-noise's "MODE NANOSECONDS" lines."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in WORKLOADS and value.strip().isdigit():
            out[name] = int(value)
    return out


def _blob(root: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_image(dest: Path, binary: Path) -> str:
    """A one-layer OCI layout in ``dest`` holding ``binary`` as /noise; its reference (DIR:latest)."""
    (dest / "blobs" / "sha256").mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("noise")
        data = binary.read_bytes()
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(dest, buf.getvalue())}
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/noise", "all"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_blob(dest, json.dumps(config).encode()),
        },
        "layers": [layer],
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **_blob(dest, json.dumps(manifest).encode()),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return f"{dest}:latest"


@dataclass
class Measurements:
    bare: dict[str, list[int]] = field(default_factory=lambda: {w: [] for w in WORKLOADS})
    sandbox: dict[str, list[int]] = field(default_factory=lambda: {w: [] for w in WORKLOADS})
    reports: list[dict[str, Any]] = field(default_factory=list)  # every interference report taken
    accel: str | None = None
    fingerprint: dict[str, Any] | None = None


Progress = Callable[[str], None]


def run_bare(binary: Path, cpu: int, runs: int, into: Measurements, progress: Progress) -> None:
    for run in range(runs):
        for workload in WORKLOADS:
            proc = subprocess.Popen(
                [str(binary), workload],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
            )
            sampler = InterferenceSampler(proc.pid, (cpu,), "noise-affinity").start()
            # Its last snapshot while it is a zombie (waited for, not reaped): its time is still there.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            sampler.stop()
            out, err = proc.communicate()
            values = parse_output(out.decode(errors="replace"))
            if proc.returncode != 0 or workload not in values:
                raise RunnerError(
                    f"the reference workload {workload} failed on the host (exit {proc.returncode}): "
                    f"{err.decode(errors='replace').strip() or 'no output'}"
                )
            into.bare[workload].append(values[workload])
            if (report := sampler.report(None)) is not None:
                into.reports.append(report)
            progress(f"host run {run + 1}/{runs}: {workload}")


def run_sandbox(
    image: str,
    runs: int,
    cache: Path,
    tuning: TuningOptions,
    into: Measurements,
    progress: Progress,
    host: "HostSettings | None" = None,
) -> None:
    from bencher_runner.job import Reporter, run_job  # the VM stack: only when it is used
    from bencher_runner.spec.config import HostSettings, JobRequest, RunConfig
    from bencher_runner.spec.results import IterationOutput

    class Report(Reporter):
        def iteration(self, index: int, output: IterationOutput) -> None:
            progress(f"sandbox run {index + 1}/{runs}")

        def phase(self, text: str) -> None:
            if text.startswith("iteration"):
                progress(text)

    request = JobRequest(image=image, iterations=runs, timeout_s=SANDBOX_TIMEOUT_S)
    config = RunConfig(job=request, host=host or HostSettings())  # the host's usual settings
    result = run_job(config, cache=cache, reporter=Report(), tuning=tuning)
    if result.status != "completed":
        raise RunnerError(f"the reference workloads failed in the sandbox: {result.error}")
    into.accel = result.sandbox.accel if result.sandbox else None
    into.fingerprint = result.fingerprint
    for index, output in enumerate(result.results, start=1):
        values = parse_output(output.stdout.decode(errors="replace"))
        missing = [w for w in WORKLOADS if w not in values]
        if missing:
            raise RunnerError(f"sandbox run {index} printed no figure for {', '.join(missing)}")
        for workload in WORKLOADS:
            into.sandbox[workload].append(values[workload])
    into.reports.extend(r for r in result.interference if r is not None)


def _stats(values: Sequence[int]) -> dict[str, Any]:
    median = statistics.median(values) if values else 0.0
    mean = statistics.fmean(values) if values else 0.0
    cv = statistics.pstdev(values) / mean if len(values) > 1 and mean else 0.0
    return {"median_ns": round(median), "cv": round(cv, 4), "runs_ns": list(values)}


def top_sources(reports: Sequence[dict[str, Any]], limit: int = 3) -> list[str]:
    """The interference sources seen most often over the runs (a task or interrupt by name, else the
    check), with how many runs had each."""
    seen: Counter[str] = Counter()
    for report in reports:
        found: dict[str, None] = {}  # in report order: ties keep it
        for check, doc in report["checks"].items():
            docs = doc.values() if check == "pressure" else [doc]
            if any(d.get("verdict") == "disturbed" for d in docs):
                found.update(dict.fromkeys(_sources(check, doc)))
        seen.update(list(found))
    return [f"{name} ({n}/{len(reports)} runs)" for name, n in seen.most_common(limit)]


def _sources(check: str, doc: dict[str, Any]) -> list[str]:
    names = (
        [t["name"] for t in doc.get("top", [])[:2]] if check in ("other_tasks", "irqs", "softirqs") else []
    )
    what = {"other_tasks": "task", "irqs": "interrupt", "softirqs": "softirq"}.get(check)
    return [f"{what} {name}" for name in names] if names else [check.replace("_", " ")]


def summarize(m: Measurements, *, cpu: int, runs: int) -> dict[str, Any]:
    """Pure: the per-workload figures and verdicts of `runner noise --json`."""
    emulated = m.accel == "tcg"
    sources = top_sources(m.reports)
    workloads: dict[str, Any] = {}
    for workload in WORKLOADS:
        bare, sandbox = _stats(m.bare[workload]), _stats(m.sandbox[workload])
        overhead = (
            sandbox["median_ns"] / bare["median_ns"] - 1 if bare["median_ns"] and sandbox["runs_ns"] else None
        )
        noisy = [f"host runs vary {bare['cv']:.1%}"] if bare["cv"] > NOISY_CV else []
        if not emulated and sandbox["cv"] > NOISY_CV:
            noisy.append(f"sandbox runs vary {sandbox['cv']:.1%}")
        workloads[workload] = {
            "bare": bare,
            "sandbox": sandbox,
            "overhead": round(overhead, 4) if overhead is not None else None,
            "verdict": "noisy" if noisy else "fit",
            "why": noisy,
        }
    noisy_any = any(w["verdict"] == "noisy" for w in workloads.values())
    return {
        "verdict": "noisy" if noisy_any else "fit",
        "cpu": cpu,
        "runs": runs,
        "accel": m.accel,
        "emulated": emulated,
        "note": EMULATED_NOTE if emulated else None,
        "threshold_cv": NOISY_CV,
        "interference_sources": sources,
        "workloads": workloads,
        "fingerprint": m.fingerprint,
    }


def measure(
    *,
    runs: int,
    cpu: int | None,
    cache: Path,
    tuning: TuningOptions,
    progress: Progress,
    log: Progress,
    host: "HostSettings | None" = None,
) -> dict[str, Any]:
    benchmark = partition(online_cpus()).benchmark
    chosen = benchmark[-1] if cpu is None else cpu
    if chosen not in online_cpus():
        raise SpecError(
            f"--cpu {chosen} is not an online CPU; pick one of the benchmark CPUs {list(benchmark)}"
        )
    binary = find_noise_binary()
    m = Measurements()
    with tuned_host(tuning, log=log):
        run_bare(binary, chosen, runs, m, progress)
    with tempfile.TemporaryDirectory(prefix="bencher-noise-") as tmp:
        image = build_image(Path(tmp) / "oci", binary)
        run_sandbox(image, runs, cache, tuning, m, progress, host)
    if m.fingerprint is None:
        m.fingerprint = host_fingerprint(accel=m.accel)
    doc = summarize(m, cpu=chosen, runs=runs)
    doc["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return doc


def plain_lines(doc: dict[str, Any]) -> list[str]:
    lines = [f"runner noise: CPU {doc['cpu']}, {doc['runs']} runs each, sandbox accel {doc['accel']}"]
    for name, w in doc["workloads"].items():
        overhead = f"{w['overhead']:+.1%}" if w["overhead"] is not None else "-"
        lines.append(
            f"{name:8} host {w['bare']['median_ns'] / 1e6:9.2f} ms (cv {w['bare']['cv']:.1%})  "
            f"sandbox {w['sandbox']['median_ns'] / 1e6:9.2f} ms (cv {w['sandbox']['cv']:.1%})  "
            f"overhead {overhead}  {w['verdict']}" + (f": {'; '.join(w['why'])}" if w["why"] else "")
        )
    if doc["note"]:
        lines.append(f"note: {doc['note']}")
    sources = "; ".join(doc["interference_sources"]) or "none seen"
    lines.append(f"verdict: this host is {doc['verdict']} (interference: {sources})")
    return lines


def _table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    emulated = " (emulated)" if doc["emulated"] else ""
    table = Table(title=f"runner noise: CPU {doc['cpu']}, {doc['runs']} runs each, sandbox {doc['accel']}")
    for column in (
        "workload",
        "host median",
        "host cv",
        f"sandbox median{emulated}",
        "sandbox cv",
        "overhead",
    ):
        table.add_column(column, justify="left" if column == "workload" else "right")
    table.add_column("verdict")
    for name, w in doc["workloads"].items():
        overhead = f"{w['overhead']:+.1%}" if w["overhead"] is not None else "-"
        style = "green" if w["verdict"] == "fit" else "red"
        table.add_row(
            name,
            f"{w['bare']['median_ns'] / 1e6:.2f} ms",
            f"{w['bare']['cv']:.1%}",
            f"{w['sandbox']['median_ns'] / 1e6:.2f} ms",
            f"{w['sandbox']['cv']:.1%}",
            overhead,
            f"[{style}]{w['verdict']}[/]" + (f": {'; '.join(w['why'])}" if w["why"] else ""),
        )
    return table


def noise_command(
    *,
    runs: int,
    as_json: bool,
    cpu: int | None,
    cache: Path,
    tuning: TuningOptions,
    host: "HostSettings | None" = None,
) -> int:
    """`runner noise`: 0 fit, 1 noisy, 2 it could not measure (the error on stderr)."""
    from rich.console import Console

    from bencher_runner.host.maintenance import HostBusyError, host_job_lock

    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False)
    live = err.is_terminal and not as_json
    total = runs * (len(WORKLOADS) + 1)
    status = err.status("measuring", spinner="dots") if live else None
    done = 0

    def progress(text: str) -> None:
        nonlocal done
        if text.startswith(("host run", "sandbox run")):
            done += 1
        line = f"[{done}/{total}] {text}"
        if status is not None:
            status.update(line)
        elif not as_json:
            err.print(f"runner: {line}", markup=False)

    def log(text: str) -> None:
        if not as_json and not live:
            err.print(f"runner: {text}", markup=False)

    try:
        if status is not None:
            status.start()
        with host_job_lock(wait=True, on_wait=log, warn=log):
            doc = measure(
                runs=runs, cpu=cpu, cache=cache, tuning=tuning, progress=progress, log=log, host=host
            )
    except (RunnerError, HostBusyError) as error:
        if status is not None:
            status.stop()
        err.print(f"runner: error: {error}", style="red", markup=False)
        return 2
    if status is not None:
        status.stop()
    if as_json:
        print(json.dumps(doc))
    elif out.is_terminal:
        out.print(_table(doc))
        if doc["note"]:
            out.print(f"note: {doc['note']}", markup=False)
        sources = "; ".join(doc["interference_sources"]) or "none seen"
        out.print(f"verdict: this host is {doc['verdict']} (interference: {sources})", markup=False)
    else:
        print("\n".join(plain_lines(doc)))
    return 0 if doc["verdict"] == "fit" else 1
