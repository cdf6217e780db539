"""Job semantics on real microVMs: iterations, output files, limits, timeout, network, guest failures."""

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm.conftest import runner


@pytest.fixture
def counting_server() -> Iterator[tuple[int, list[str]]]:
    """An HTTP server on the host's loopback that answers each GET with how many it has seen."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = f"{len(hits)}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], hits
    server.shutdown()


def test_three_iterations_each_in_a_fresh_vm(plain_image: str) -> None:
    script = "ls /tmp/marker 2>/dev/null || echo fresh; echo x > /tmp/marker"
    run = runner("--image", plain_image, "--json", "--iter", "3", "--", "/bin/sh", "-c", script)
    assert run.returncode == 0, run.stderr
    assert [r["stdout"] for r in run.doc["results"]] == ["fresh\n"] * 3


def test_zero_iterations_complete_with_no_results(plain_image: str) -> None:
    run = runner("--image", plain_image, "--json", "--iter", "0", "--", "/bin/true")
    assert run.returncode == 0 and run.doc == run.doc | {"status": "completed", "results": []}


@pytest.mark.parametrize("allow_failure", [False, True])
def test_failing_second_iteration(
    plain_image: str, counting_server: tuple[int, list[str]], allow_failure: bool
) -> None:
    port, _ = counting_server
    script = f'n=$(wget -qO- http://10.0.2.2:{port}/); echo "run $n"; [ "$n" != 2 ]'
    # A jailed VMM's user-mode NAT never reaches the host's loopback (tests/vm/test_network_tap.py):
    # this counting server is there only without the jail.
    flags = ["--danger-no-jail", *(["--allow-failure"] if allow_failure else [])]
    run = runner(
        "--image", plain_image, "--json", "--network", "--iter", "3", *flags, "--", "/bin/sh", "-c", script
    )
    codes = [r["exit_code"] for r in run.doc["results"]]
    if allow_failure:
        assert codes == [0, 1, 0] and run.doc["status"] == "completed" and run.returncode == 0
    else:
        assert codes == [0, 1] and run.returncode == 1
        assert "non-zero exit code 1 in iteration 2/3" in run.doc["error"]


def test_network_reaches_a_host_loopback_server(
    plain_image: str, counting_server: tuple[int, list[str]]
) -> None:
    port, hits = counting_server
    script = f"ls /sys/class/net; cat /etc/resolv.conf; wget -qO- http://10.0.2.2:{port}/hello"
    # Only without the jail: a jailed VMM's 10.0.2.2 is its own netns (tests/vm/test_network_tap.py).
    run = runner(
        "--image", plain_image, "--json", "--network", "--danger-no-jail", "--", "/bin/sh", "-c", script
    )
    assert run.returncode == 0, run.stderr
    assert run.doc["results"][0]["stdout"].split() == ["eth0", "lo", "nameserver", "10.0.2.3", "1"]
    assert hits == ["/hello"]
    assert run.doc["sandbox"]["network"] is True


def test_no_network_cannot_reach_the_host(plain_image: str, counting_server: tuple[int, list[str]]) -> None:
    port, hits = counting_server
    script = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 10.0.2.2 {port}; echo rc=$?"
    run = runner("--image", plain_image, "--json", "--", "/bin/sh", "-c", script)
    result = run.doc["results"][0]
    assert result["stdout"] == "rc=1\n"
    assert "Network is unreachable" in result["stderr"]  # no interface but lo: no route at all
    assert hits == []


def test_large_stdout_is_capped_and_the_benchmark_exits_0(plain_image: str) -> None:
    script = "dd if=/dev/zero bs=1M count=64 2>/dev/null | tr '\\0' 'a'; echo done >&2"
    run = runner(
        "--image", plain_image, "--json", "--max-output-size", str(1024 * 1024), "--", "/bin/sh", "-c", script
    )
    assert run.returncode == 0, run.stderr
    result = run.doc["results"][0]
    assert result["exit_code"] == 0
    assert len(result["stdout"]) == 1024 * 1024 and set(result["stdout"]) == {"a"}
    assert result["stderr"] == "done\n"
    assert result["truncated"] == ["stdout"]


def test_the_timeout_covers_all_iterations_together(plain_image: str) -> None:
    # Each iteration (boot + 8 s) fits 20 s; three of them cannot, however fast the VM boots.
    started = time.monotonic()
    run = runner(
        "--image", plain_image, "--json", "--iter", "3", "--timeout", "20", "--", "/bin/sh", "-c",
        "sleep 8; echo done",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert run.returncode == 1 and run.doc["status"] == "failed", "the job's time is for all iterations"
    error = run.doc["error"]
    assert "timed out after 20 s" in error and "the whole job" in error
    assert elapsed < 20 + 60  # stopped at the deadline, not after a third full iteration
    results = run.doc["results"]
    assert 1 <= len(results) <= 3
    assert all(r["exit_code"] == 0 and r["stdout"] == "done\n" for r in results[:-1])
    last = results[-1]
    if last["exit_code"] == 124:  # stopped while it ran
        assert f"in iteration {len(results)}/3" in error
    else:  # the deadline passed between two iterations
        assert last["stdout"] == "done\n" and f"before iteration {len(results) + 1}/3 started" in error


def test_output_files(make_image: Any, tmp_path: Path) -> None:
    image = make_image({"Env": ["PATH=/bin"], "WorkingDir": "/work", "Cmd": ["/bin/sh", "-c", (
        "mkdir -p /work/sub; printf 'rel' > /work/rel.txt; printf 'deep' > /work/sub/deep.txt; "
        "printf '\\377\\376bin' > /abs.bin; ln -s /abs.bin /work/link; printf '%05000d' 0 > /work/big"
    )]})  # fmt: skip
    out_dir = tmp_path / "out"
    run = runner(
        "--image", image, "--json", "--max-output-size", "1000", "--output-dir", str(out_dir),
        "--output", "rel.txt", "--output", "sub/deep.txt", "--output", "/abs.bin", "--output", "link",
        "--output", "missing.txt", "--output", "big",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = run.doc["results"][0]
    assert result["output"]["rel.txt"] == "rel"
    assert result["output"]["sub/deep.txt"] == "deep"
    assert result["output"]["/abs.bin"] == "\ufffd\ufffdbin"  # lossy UTF-8 in the result
    assert result["output"]["link"] == result["output"]["/abs.bin"]
    assert len(result["output"]["big"]) == 1000 and result["truncated"] == ["big"]
    assert "missing.txt" in result["missing"] and "missing.txt" not in result["output"]
    assert (out_dir / "iter-1" / "files" / "abs.bin").read_bytes() == b"\xff\xfebin"  # exact bytes saved
    assert (out_dir / "iter-1" / "files" / "sub" / "deep.txt").read_bytes() == b"deep"


def test_too_many_output_files_fail_before_boot(plain_image: str) -> None:
    outputs = [arg for i in range(300) for arg in ("--output", f"f{i}")]
    run = runner("--image", plain_image, "--json", *outputs, "--", "/bin/true")
    assert run.returncode == 2
    assert "300 output files requested" in run.doc["error"] and "255" in run.doc["error"]
    assert "booting" not in run.stderr


def test_guest_panic_is_reported_as_a_panic(plain_image: str) -> None:
    run = runner(
        "--image", plain_image, "--json", "--", "/bin/sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60"
    )
    assert run.returncode == 1
    assert "panicked" in run.doc["error"] and "timed out" not in run.doc["error"]


def test_guest_out_of_memory_is_reported(plain_image: str) -> None:
    # awk keeps doubling a string until the guest's OOM killer ends it.
    script = "awk 'BEGIN { s = \"x\"; while (1) { s = s s } }'"
    run = runner("--image", plain_image, "--json", "--memory", "128", "--", "/bin/sh", "-c", script)
    assert run.returncode == 1
    assert "ran out of memory (128 MiB)" in run.doc["error"]
    assert run.doc["results"][0]["exit_code"] == 137


def test_a_build_time_and_file_size_job_reports_bmf(plain_image: str) -> None:
    from bencher_runner.fakeserver import default_config, default_spec
    from bencher_runner.job import run_job
    from bencher_runner.paths import cache_dir
    from bencher_runner.spec.config import HostSettings
    from bencher_runner.spec.jobspec import build_config_from_job, parse_job

    script = "sleep 1; mkdir /out; head -c 1234 /dev/zero > /out/app.bin; printf abc > /out/notes.txt"
    message = {
        "event": "job",
        "uuid": "550e8400-e29b-41d4-a716-446655440000",
        "spec": default_spec(),
        "config": default_config(
            entrypoint=["/bin/sh", "-c"],
            cmd=[script],
            build_time=True,
            file_size=True,
            file_paths=["/out/app.bin", "/out/notes.txt", "/out/none"],
        ),
        "oci_token": "x.y.z",
        "timeout": 120,
    }
    config = build_config_from_job(parse_job(message), HostSettings())
    request = config.job.model_copy(
        update={"image": plain_image, "allow_local_image": True, "insecure_registry": False, "token": None}
    )
    local = config.model_copy(update={"job": request})
    result = run_job(local, cache=cache_dir())
    assert result.status == "completed", result.error
    [wire] = [r.to_protocol() for r in result.results]  # what `completed` carries
    assert set(wire) == {"exit_code", "output"} and wire["exit_code"] == 0
    assert list(wire["output"]) == ["\0bencher"]
    text = wire["output"]["\0bencher"]
    name = f"/bin/sh -c {script}"
    seconds = json.loads(text)[name]["build-time"]["value"]
    assert 1.0 <= seconds < 1.0 + 30  # the command (sleep 1 and two writes), not the boot
    assert text == (
        f'{{"{name}":{{"build-time":{{"value":{seconds},"lower_value":null,"upper_value":null}}}},'
        '"app.bin":{"file-size":{"value":1234.0,"lower_value":null,"upper_value":null}},'
        '"notes.txt":{"file-size":{"value":3.0,"lower_value":null,"upper_value":null}}}'
    )
