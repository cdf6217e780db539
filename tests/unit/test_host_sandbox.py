"""`--sandbox none`: the command runs on the host from the unpacked image, confined to its tree."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.oci_builder import Entry, build_layout, layer_from_dir


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tree")
    (root / "bin").mkdir()
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "echo", "cat", "pwd", "env", "sleep", "id", "ls", "true"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nbench:x:1000:1000::/home:/bin/sh\n")
    extra = [
        Entry("data/inside.txt", data=b"inside"),
        Entry("data/escape", type="symlink", linkname="/etc/hostname"),  # the image's, not the host's
        Entry("data/loop", type="symlink", linkname="loop"),
    ]
    dest = tmp_path_factory.mktemp("layout")
    build_layout(
        dest, [layer_from_dir(root), extra], {"Env": ["PATH=/bin", "FROM_IMAGE=1"], "WorkingDir": "/data"}
    )
    return str(dest)


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "bencher_runner", "run", "--sandbox", "none", "--json", *args],
        capture_output=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, json.loads(proc.stdout), proc.stderr.decode()


def test_env_cleared_then_set_and_cwd_inside_the_tree(image: str) -> None:
    code, doc, stderr = run(
        "--image", image, "--env", "JOB=2", "--", "sh", "-c", "pwd; env | sort", env={"HOST_SECRET": "x"}
    )
    assert code == 0, stderr
    lines = doc["results"][0]["stdout"].splitlines()
    assert lines[0].endswith("/iter-1/data")  # the image WorkingDir, inside the job's tree
    assert "FROM_IMAGE=1" in lines and "JOB=2" in lines
    assert not any(line.startswith("HOST_SECRET") for line in lines)
    assert doc["sandbox"]["backend"] == "none"
    assert "unisolated" in stderr


def test_program_is_found_in_the_tree_not_on_the_host(image: str) -> None:
    code, doc, _ = run("--image", image, "--", "python3", "-c", "print(1)")  # exists on the host only
    assert code == 1 and doc["results"][0]["exit_code"] == 127


def test_exit_code_and_image_user(image: str) -> None:
    code, doc, _ = run("--image", image, "--", "sh", "-c", "exit 42")
    assert code == 1 and doc["results"][0]["exit_code"] == 42


def test_output_files_resolve_inside_the_tree(image: str) -> None:
    code, doc, stderr = run(
        "--image", image, "--output", "inside.txt", "--output", "escape", "--output", "loop", "--", "true"
    )
    assert code == 0, stderr
    result = doc["results"][0]
    assert result["output"] == {"inside.txt": "inside"}
    assert set(result["missing"]) == {"escape", "loop"}  # /etc/hostname is absent in the image


def test_timeout_kills_the_process_group(image: str) -> None:
    started = time.monotonic()
    code, doc, _ = run("--image", image, "--timeout", "2", "--", "sh", "-c", "echo go; sleep 100 & sleep 100")
    assert time.monotonic() - started < 30
    assert code == 1 and "timed out after 2 s" in doc["error"]
    assert doc["results"][0]["stdout"] == "go\n"
    deadline = time.monotonic() + 10  # SIGKILL is queued; on a loaded CPU the death takes a moment
    while (
        subprocess.run(["pgrep", "-f", "sleep 100"], capture_output=True).stdout
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert subprocess.run(["pgrep", "-f", "sleep 100"], capture_output=True).stdout == b""


def test_network_needs_a_sandbox(image: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bencher_runner", "run", "--sandbox", "none", "--network", "--image", image],
        capture_output=True,
    )
    assert proc.returncode == 2 and b"--network needs a sandbox" in proc.stderr


def test_stale_work_dirs_are_removed_but_live_ones_kept(tmp_path: Path) -> None:
    import fcntl

    from bencher_runner.paths import work_root
    from bencher_runner.recovery import LOCK_NAME, remove_stale_work_dirs

    root = work_root(tmp_path)
    stale, live, starting = root / "job-stale", root / "job-live", root / "job-starting"
    for work in (stale, live, starting):
        work.mkdir(parents=True)
    (stale / LOCK_NAME).touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    lock = os.open(live / LOCK_NAME, os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        assert remove_stale_work_dirs(tmp_path) == [stale]
    finally:
        os.close(lock)
    assert live.exists() and starting.exists() and not stale.exists()


def test_an_unexpected_host_error_is_one_line_not_a_traceback(
    image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bencher_runner import rootdisk as job_module
    from bencher_runner.job import run_job
    from bencher_runner.spec.config import make_run_config

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job_module, "unpack_layers", broken)
    result = run_job(make_run_config(image=image, backend="none", cmd=("true",)), cache=tmp_path)
    assert result.status == "failed"
    assert result.error == "the job failed on this host: OSError: [Errno 28] No space left on device"


def _host_job(image: str, tmp_path: Path, script: str, **fields: Any) -> Any:
    from bencher_runner.job import run_job
    from bencher_runner.spec.config import make_run_config

    config = make_run_config(image=image, backend="none", cmd=("sh", "-c", script), **fields)
    return run_job(config, cache=tmp_path)


def test_the_timeout_covers_the_whole_job_not_each_iteration(image: str, tmp_path: Path) -> None:
    started = time.monotonic()
    result = _host_job(image, tmp_path, "echo run; sleep 1", iterations=6, timeout_s=3)
    elapsed = time.monotonic() - started
    assert result.status == "failed", "each iteration fits the timeout, the whole job does not"
    assert 3 <= elapsed < 3 + 10
    assert "timed out after 3 s" in (result.error or "")
    assert "the whole job" in (result.error or "")
    codes = [r.exit_code for r in result.results]
    assert 1 <= len(codes) <= 3  # 3 iterations of >= 1 s cannot all end before 3 s
    assert all(code == 0 for code in codes[:-1])
    if codes[-1] == 124:  # stopped while it ran: its output so far is kept
        assert f"iteration {len(codes)}/6" in (result.error or "")
        assert result.results[-1].stdout in (b"", b"run\n")


def test_the_job_clock_starts_at_started_at(image: str, tmp_path: Path) -> None:
    started = time.monotonic()
    result = _host_job(image, tmp_path, "echo hi; sleep 100", timeout_s=5, started_at=started - 3)
    assert result.status == "failed" and "timed out after 5 s" in (result.error or "")
    assert time.monotonic() - started < 2 + 5  # 2 s were left when the job began
    [partial] = result.results
    assert partial.exit_code == 124 and partial.stdout == b"hi\n"


def test_a_job_whose_time_is_already_up_runs_nothing(image: str, tmp_path: Path) -> None:
    result = _host_job(image, tmp_path, "echo never", timeout_s=5, started_at=time.monotonic() - 10)
    assert result.status == "failed" and result.results == []
    assert "timed out after 5 s" in (result.error or "") and "before" in (result.error or "")


def test_run_on_host_stops_at_the_deadline_it_is_given(tmp_path: Path) -> None:
    import threading

    from bencher_runner.oci.unpack import resolve_in_tree
    from bencher_runner.sandbox.host import run_on_host
    from bencher_runner.spec.launch import Launch, User

    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", tree / "bin" / "sh")
    launch = Launch(("sh", "-c", "echo a; sleep 100"), (("PATH", "/bin"),), "/", User(0, 0, (), "/"))
    limits: dict[str, Any] = {
        "max_output": 1024,
        "outputs": (),
        "max_symlinks": 40,
        "resolve": resolve_in_tree,
    }
    t0 = time.monotonic()
    run = run_on_host(tree, launch, deadline=t0 + 1.0, cancel=threading.Event(), **limits)
    assert run.timed_out and bytes(run.stdout.data) == b"a\n"
    assert 1.0 <= time.monotonic() - t0 < 1.0 + 5
    past = run_on_host(tree, launch, deadline=t0, cancel=threading.Event(), **limits)
    assert past.timed_out  # a deadline already gone: killed at once, still a timeout


def test_a_pull_stops_at_the_deadline(tmp_path: Path) -> None:
    from bencher_runner.job import Job
    from bencher_runner.oci.progress import PullProgress
    from bencher_runner.spec.config import make_run_config
    from bencher_runner.spec.errors import JobTimeoutError

    job = Job(make_run_config(image="x", timeout_s=5, started_at=time.monotonic() - 6), cache=tmp_path)
    event = PullProgress(image="x", kind="layer", digest="sha256:" + "0" * 64, done=1, total=2)
    with pytest.raises(JobTimeoutError, match=r"timed out after 5 s .* while its image was pulled"):
        job._pull_progress(event)  # called from the download threads: raising there stops the pull


def test_build_time_and_file_size_replace_the_files_by_bmf(image: str, tmp_path: Path) -> None:
    code, doc, stderr = run(
        "--image", image, "--build-time", "--file-size", "--iter", "2", "--output-dir", str(tmp_path / "out"),
        "--output", "inside.txt", "--output", "/data/missing", "--", "sh", "-c", "sleep 0.3; echo built",
    )  # fmt: skip
    assert code == 0, stderr
    for index, result in enumerate(doc["results"], start=1):
        assert result["stdout"] == "built\n" and list(result["output"]) == ["\0bencher"]
        bmf = json.loads(result["output"]["\0bencher"])
        assert list(bmf) == ["sh -c sleep 0.3; echo built", "inside.txt"]
        build = bmf["sh -c sleep 0.3; echo built"]["build-time"]
        assert build["lower_value"] is None and build["upper_value"] is None
        assert 0.3 <= build["value"] < 0.3 + 10  # the command's own time, not the unpack
        assert bmf["inside.txt"] == {"file-size": {"value": 6.0, "lower_value": None, "upper_value": None}}
        assert "/data/missing" in result["missing"]
        assert (tmp_path / "out" / f"iter-{index}" / "files" / "inside.txt").read_bytes() == b"inside"


def test_build_time_alone_drops_the_files_and_is_named_by_the_image(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    layout = tmp_path / "layout"
    config = {"Env": ["PATH=/bin"], "Cmd": ["sh", "-c", "echo x > /made"]}
    build_layout(layout, [layer_from_dir(root)], config, tag="v1")
    code, doc, stderr = run("--image", f"{layout}:v1", "--build-time", "--output", "/made")
    assert code == 0, stderr
    [result] = doc["results"]
    assert list(result["output"]) == ["\0bencher"]  # the file's content is not reported
    assert list(json.loads(result["output"]["\0bencher"])) == [f"{layout}:v1"]  # no command given


def test_file_size_needs_output_files(image: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bencher_runner", "run", "--sandbox", "none", "--file-size", "--image", image],
        capture_output=True,
    )
    assert proc.returncode == 2 and b"--file-size needs the files to measure" in proc.stderr
