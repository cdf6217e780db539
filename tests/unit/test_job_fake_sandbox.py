"""A whole Job (job.py) on the fake Sandbox: the orchestration without any VM.

Image pull (a local OCI layout), root disk template (real mkfs), one iteration loop, results,
timeout, cancel, guest panic, out of memory, a backend error, cleanup on every path.
"""

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.job import run_job
from bencher_runner.paths import work_root
from bencher_runner.sandbox.backend import JobContext
from bencher_runner.sparedisk import SpareDisks
from bencher_runner.spec.config import make_run_config
from bencher_runner.spec.results import RunResult
from tests.support.fake_sandbox import FakeSandbox, Record
from tests.support.oci_builder import Entry, build_layout

DISK_MIB = 64


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("layout")
    entries = [
        Entry("bin/true", data=b"#!/bin/sh\n", mode=0o755),
        Entry("etc/passwd", data=b"root:x:0:0::/:/bin/sh\n"),
    ]
    build_layout(layout, [entries], {"Cmd": ["/bin/true"], "WorkingDir": "/work"})
    return f"{layout}:latest"


def run(image: str, cache: Path, script: list[str], **fields: Any) -> tuple[RunResult, Record]:
    record = Record()
    kind = fields.pop("root_kind", "disk")
    prepare_error = fields.pop("prepare_error", None)
    fields.setdefault("iterations", len(script))
    fields.setdefault("disk_mib", DISK_MIB)
    config = make_run_config(image=image, **fields)

    def sandbox(ctx: JobContext) -> FakeSandbox:
        return FakeSandbox(ctx, script, record, root_kind=kind, prepare_error=prepare_error)

    result = run_job(config, cache=cache, sandbox=sandbox)
    assert not list(work_root(cache).glob("job-*")), "the job's work dir outlived it"
    return result, record


def test_every_iteration_runs_on_its_own_copy_of_the_root_disk(image: str, tmp_path: Path) -> None:
    result, record = run(image, tmp_path, ["ok", "ok", "ok"])
    assert result.status == "completed" and result.error is None
    assert [r.stdout for r in result.results] == [b"out 0", b"out 1", b"out 2"]
    assert [path.name for path, _ in record.roots] == ["rootfs.ext4"] * 3
    assert len({path for path, _ in record.roots}) == 3
    assert all(size == DISK_MIB * 2**20 for _, size in record.roots)  # the requested size, exactly
    assert all(not path.exists() for path, _ in record.roots)  # freed after each iteration
    assert record.sessions_open == record.sessions_closed == 1 and record.prepared == 1
    assert record.launch is not None and record.launch.argv == ("/bin/true",) and record.launch.cwd == "/work"
    assert len(set(record.deadlines)) == 1  # one deadline for the whole job
    assert result.sandbox is not None and result.sandbox.backend == "fake"
    assert result.metadata["root_disk"] == {"built": "full", "layers": 1}
    for phase in ("pull_s", "rootfs_s", "disk_copy_s", "total_s"):
        assert phase in result.timings


def test_the_second_job_of_an_image_uses_its_cached_template(image: str, tmp_path: Path) -> None:
    run(image, tmp_path, ["ok"])
    result, _ = run(image, tmp_path, ["ok"])
    assert result.metadata["root_disk"] == {"built": "template"}


def test_a_non_zero_exit_stops_the_job_unless_failure_is_allowed(image: str, tmp_path: Path) -> None:
    result, record = run(image, tmp_path, ["ok", "exit:3", "ok"])
    assert result.status == "failed"
    assert result.error == "benchmark exited with non-zero exit code 3 in iteration 2/3"
    assert [r.exit_code for r in result.results] == [0, 3] and len(record.iterations) == 2
    allowed, record = run(image, tmp_path, ["ok", "exit:3", "ok"], allow_failure=True)
    assert allowed.status == "completed" and [r.exit_code for r in allowed.results] == [0, 3, 0]


def test_a_timeout_keeps_the_partial_output_and_names_the_iteration(image: str, tmp_path: Path) -> None:
    result, record = run(image, tmp_path, ["ok", "timeout", "ok"], timeout_s=50)
    assert result.status == "failed" and result.error is not None
    assert result.error.startswith("the job timed out after 50 s (the timeout covers the whole job")
    assert (
        "in iteration 2/3, which ran 9.9 s (boot included) and was stopped (its output so far is kept)"
        in (result.error)
    )
    assert [r.exit_code for r in result.results] == [0, 124]
    assert result.results[1].stdout == b"partial out" and len(record.iterations) == 2
    assert record.sessions_closed == 1


def test_a_job_past_its_deadline_runs_no_further_iteration(image: str, tmp_path: Path) -> None:
    started = time.monotonic()
    result, record = run(image, tmp_path, ["slow:1.5", "ok"], timeout_s=1, started_at=started)
    assert result.status == "failed" and result.error is not None
    assert "before iteration 2/2 started" in result.error and len(record.iterations) == 1
    assert record.deadlines == [started + 1]


def test_cancel_during_an_iteration_ends_the_job_canceled(image: str, tmp_path: Path) -> None:
    result, record = run(image, tmp_path, ["ok", "cancel", "ok"])
    assert result.status == "failed"
    assert result.error == "the job was canceled while the benchmark ran"
    assert len(result.results) == 1 and len(record.iterations) == 2
    assert record.sessions_open == record.sessions_closed == 1


@pytest.mark.parametrize(
    ("step", "error", "kept"),
    [
        ("panic", "the guest kernel panicked: Kernel panic - not syncing: test", 1),
        ("oom", "the benchmark was killed because the guest ran out of memory", 2),
        ("error", "the VM stopped without reporting a result (QEMU exited with status 1)", 1),
    ],
)
def test_a_sandbox_failure_is_the_jobs_error(
    image: str, tmp_path: Path, step: str, error: str, kept: int
) -> None:
    result, record = run(image, tmp_path, ["ok", step, "ok"])
    assert result.status == "failed" and result.error == error
    assert len(result.results) == kept  # the OOM'd iteration's output is kept
    assert len(record.iterations) == 2 and record.sessions_closed == 1


def test_a_backend_that_cannot_start_fails_before_any_root_disk(image: str, tmp_path: Path) -> None:
    result, record = run(image, tmp_path, ["ok"], prepare_error="no KVM and no TCG here")
    assert result.status == "failed" and result.error == "no KVM and no TCG here"
    assert record.sessions_open == 0 and not record.iterations
    assert "rootfs_s" not in result.timings


def test_a_tree_backend_gets_the_unpacked_tree(image: str, tmp_path: Path) -> None:
    result, record = run(image, tmp_path, ["ok", "ok"], root_kind="tree")
    assert result.status == "completed"
    assert [path.name for path, _ in record.roots] == ["iter-1", "iter-2"]
    assert all(size == -1 for _, size in record.roots)


def test_zero_iterations_still_prepare_and_complete(image: str, tmp_path: Path) -> None:
    result, record = run(image, tmp_path, [], iterations=0)
    assert result.status == "completed" and result.results == [] and record.sessions_closed == 1


def test_a_full_work_filesystem_is_one_line(
    image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bencher_runner import job as job_module

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job_module, "copy_disk", full)
    result, record = run(image, tmp_path, ["ok"])
    assert result.error == "the job failed on this host: OSError: [Errno 28] No space left on device"
    assert record.sessions_closed == 1
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_spare_disk_made_while_idle_is_taken_instead_of_a_copy(image: str, tmp_path: Path) -> None:
    first, record = run(image, tmp_path, ["ok", "ok"])
    assert first.metadata["root_disk"] == {"built": "full", "layers": 1}  # no spare was made yet
    copied = record.root_disks[0]
    assert SpareDisks(tmp_path).refill() == 2  # the daemon's idle time: as many as the job had iterations
    second, record = run(image, tmp_path, ["ok", "ok", "ok"])
    assert second.metadata["root_disk"] == {"built": "template", "spare_disks_taken": 2}
    assert record.root_disks == [copied] * 3  # the same bytes, fully allocated, whichever way it came
    assert SpareDisks(tmp_path).count(None) == 0


def test_a_job_on_another_image_drops_the_spares_first(image: str, tmp_path: Path) -> None:
    run(image, tmp_path, ["ok"])
    spares = SpareDisks(tmp_path)
    spares.refill()
    result, _ = run(image, tmp_path, ["ok"], disk_mib=DISK_MIB * 2)  # another template: another key
    assert result.status == "completed" and result.metadata["root_disk"] == {"built": "full", "layers": 1}
    assert spares.count(None) == 0
