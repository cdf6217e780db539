"""`runner run` on real microVMs: the behaviours of SCENARIOS.md that this issue covers."""

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.oci_builder import Entry, build_layout
from tests.vm.conftest import runner

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 40  # a TCG boot takes 3 to 7 s on an idle 2-core host; several times that under load


def test_example_image_runs_in_a_vm() -> None:
    run = runner("--image", str(REPO / "examples/hello/oci:latest"), "--json")
    assert run.returncode == 0, run.stderr
    doc = run.doc
    assert doc["status"] == "completed"
    [result] = doc["results"]
    assert result["exit_code"] == 0
    assert "hello from inside the microVM" in result["stdout"]
    assert doc["sandbox"]["backend"] == "qemu"
    assert doc["sandbox"]["accel"] in ("kvm", "tcg")
    if doc["sandbox"]["accel"] == "tcg":
        assert "TCG" in run.stderr  # the user is told timings are emulated


@pytest.mark.parametrize(
    "script,code",
    [("exit 0", 0), ("exit 3", 3), ("exit 42", 42), ("kill -9 $$", 137)],
)
def test_exit_codes_come_back_exactly(plain_image: str, script: str, code: int) -> None:
    run = runner("--image", plain_image, "--json", "--", "/bin/sh", "-c", script)
    assert run.doc["results"][0]["exit_code"] == code
    if code == 0:
        assert run.returncode == 0 and run.doc["status"] == "completed"
    else:
        assert run.returncode == 1 and run.doc["status"] == "failed"
        assert f"non-zero exit code {code}" in run.doc["error"]


def test_streams_separate_and_argv_byte_exact(plain_image: str) -> None:
    args = ["a b", "", "'single'", '"double"', "$HOME", "line\nbreak", "naïve ✓", "--flag=x"]
    script = 'echo out1; echo err1 >&2; for a in "$@"; do printf "[%s]" "$a"; done; echo; echo err2 >&2'
    run = runner("--image", plain_image, "--json", "--", "/bin/sh", "-c", script, "sh", *args)
    assert run.returncode == 0, run.stderr
    result = run.doc["results"][0]
    expected = "out1\n" + "".join(f"[{a}]" for a in args) + "\n"
    assert result["stdout"] == expected
    assert result["stderr"] == "err1\nerr2\n"


def test_human_mode_prints_streams_to_their_own_fds(plain_image: str) -> None:
    run = runner("--image", plain_image, "--", "/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2")
    assert run.returncode == 0
    assert run.stdout == b"to-stdout\n"
    assert "to-stderr" in run.stderr and "to-stdout" not in run.stderr


def test_env_workdir_and_user_from_image(make_image: Any) -> None:
    image = make_image(
        {
            "Env": ["PATH=/bin", "FROM_IMAGE=image", "OVERRIDDEN=image", "WITH_EQ=a=b"],
            "WorkingDir": "/home/bench",
            "User": "bench",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ['id -u; id -g; id -G; pwd; echo "$FROM_IMAGE|$OVERRIDDEN|$WITH_EQ|$HOME|$NEW"'],
        }
    )
    run = runner("--image", image, "--json", "--env", "OVERRIDDEN=job value=x", "--env", "NEW=1")
    assert run.returncode == 0, run.stderr
    lines = run.doc["results"][0]["stdout"].splitlines()
    assert lines == ["1000", "1000", "1000 10", "/home/bench", "image|job value=x|a=b|/home/bench|1"]


def test_numeric_user_and_default_workdir(make_image: Any) -> None:
    image = make_image(
        {"Env": ["PATH=/bin"], "User": "4242:77", "Cmd": ["/bin/sh", "-c", "id -u; id -g; pwd"]}
    )
    run = runner("--image", image, "--json")
    assert run.doc["results"][0]["stdout"].splitlines() == ["4242", "77", "/"]


def test_resources_and_no_network(plain_image: str) -> None:
    script = (
        "nproc; grep MemTotal /proc/meminfo | awk '{print $2}'; "
        "df -k / | awk 'NR==2 {print $2}'; ls /sys/class/net"
    )
    run = runner(
        "--image", plain_image, "--json", "--vcpus", "2", "--memory", "384", "--disk", "256",
        "--", "/bin/sh", "-c", script,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    nproc, mem_kib, disk_kib, *ifaces = run.doc["results"][0]["stdout"].split()
    assert int(nproc) == 2
    assert 384 * 1024 * 0.75 <= int(mem_kib) <= 384 * 1024
    assert 256 * 1024 * 0.85 <= int(disk_kib) <= 256 * 1024
    assert ifaces == ["lo"]
    assert run.doc["sandbox"] | {"accel": None} == {
        "backend": "qemu", "accel": None, "vcpus": 2, "memory_mib": 384, "disk_mib": 256, "network": False,
    }  # fmt: skip


def test_timeout_kills_the_vm_and_keeps_output(plain_image: str) -> None:
    # The command outlives any timeout; the timeout leaves room for a TCG boot on a loaded host.
    started = time.monotonic()
    run = runner(
        "--image", plain_image, "--json", "--timeout", str(TIMEOUT_S), "--", "/bin/sh", "-c",
        "echo started; sleep 600",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 60
    assert run.returncode == 1
    assert run.doc["status"] == "failed"
    assert f"timed out after {TIMEOUT_S} s" in run.doc["error"] and "iteration 1/1" in run.doc["error"]
    [partial] = run.doc["results"]
    assert partial["exit_code"] == 124
    assert partial["stdout"] == "started\n"  # output produced before the timeout is kept
    assert partial["stderr"] == "" and partial["output"] == {}  # the same keys as any result


def test_missing_binary_is_127_with_a_message(plain_image: str) -> None:
    run = runner("--image", plain_image, "--json", "--", "/no/such/program", "arg")
    result = run.doc["results"][0]
    assert result["exit_code"] == 127
    assert "/no/such/program" in result["stderr"]
    assert run.returncode == 1


def test_missing_image_is_a_one_line_usage_error(tmp_path: Path) -> None:
    run = runner("--image", str(tmp_path / "nope"))
    assert run.returncode == 2
    assert "nope" in run.stderr
    assert "Traceback" not in run.stderr
    assert len([line for line in run.stderr.splitlines() if "error" in line]) == 1


def test_image_without_command_fails_before_boot(make_image: Any) -> None:
    image = make_image({"Env": ["PATH=/bin"]})
    run = runner("--image", image, "--json")
    assert run.returncode == 2
    assert "no ENTRYPOINT or CMD" in run.doc["error"]
    assert run.doc["results"] == []
    assert "booting" not in run.stderr


def test_too_small_disk_names_both_sizes(make_image: Any) -> None:
    big = Entry("big.bin", data=bytes(70 * 1024 * 1024))
    image = make_image({"Env": ["PATH=/bin"], "Cmd": ["/bin/true"]}, ([big],))
    run = runner("--image", image, "--json", "--disk", "64")
    assert run.returncode == 2
    error = run.doc["error"]
    content = int(re.search(r"files take (\d+) MiB", error).group(1))  # type: ignore[union-attr]
    assert 70 <= content <= 74  # 70 MiB + busybox
    assert "the disk is 64 MiB" in error and "--disk" in error
    assert "booting" not in run.stderr


def test_tagged_layout_with_several_images(tmp_path: Path, busybox_layer: list[Entry]) -> None:
    dest = tmp_path / "layout"
    build_layout(dest, [busybox_layer], {"Cmd": ["/bin/echo", "first"]}, tag="one")
    build_layout(dest, [busybox_layer], {"Cmd": ["/bin/echo", "second"]}, tag="two")
    assert runner("--image", f"{dest}:two", "--json").doc["results"][0]["stdout"] == "second\n"
    ambiguous = runner("--image", str(dest), "--json")
    assert ambiguous.returncode == 2 and "one" in ambiguous.doc["error"] and "two" in ambiguous.doc["error"]


def test_sigterm_stops_the_vm_and_cleans_up(plain_image: str) -> None:
    import os
    import signal
    import subprocess
    import sys

    from bencher_runner.paths import cache_dir, work_root

    proc = subprocess.Popen(
        [sys.executable, "-m", "bencher_runner", "run", "--image", plain_image, "--", "/bin/sleep", "600"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    work = work_root(cache_dir())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(work.glob("*/iter-1/serial.log")):
        time.sleep(0.2)
    time.sleep(1)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    # the autouse fixture checks that no VM and no work directory is left


def test_warm_job_reuses_the_root_disk_template(make_image: Any) -> None:
    import secrets

    unique = Entry("unique", data=secrets.token_bytes(16))  # a new manifest digest: a cold first run
    image = make_image({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", "cat /unique | wc -c"]}, ([unique],))
    cold = runner("--image", image, "--json", "--disk", "128")
    warm = runner("--image", image, "--json", "--disk", "128")
    assert cold.doc["results"] == warm.doc["results"]
    assert [(r["exit_code"], r["stdout"]) for r in cold.doc["results"]] == [(0, "16\n")]
    assert "building 128 MiB" in cold.stderr  # in full, or from a cached disk of the busybox layer
    assert "unpacking layers" in cold.stderr or "new layer(s)" in cold.stderr
    assert "unpacking layers" not in warm.stderr and "template cached" in warm.stderr
    assert "mkfs_s" not in warm.doc["timings"]
    other_size = runner("--image", image, "--json", "--disk", "96")  # another size: its own template
    assert "building 96 MiB" in other_size.stderr


def test_a_spare_disk_made_while_idle_boots_fresh(make_image: Any) -> None:
    import secrets

    from bencher_runner.paths import cache_dir
    from bencher_runner.sparedisk import SpareDisks

    unique = Entry("unique", data=secrets.token_bytes(16))  # its own template key: no other test's spares
    image = make_image({"Env": ["PATH=/bin"]}, ([unique],))
    script = "ls /marker 2>/dev/null || echo fresh; echo x > /marker"
    first = runner("--image", image, "--json", "--disk", "128", "--", "/bin/sh", "-c", script)
    assert first.returncode == 0, first.stderr
    spares = SpareDisks(cache_dir())
    assert spares.refill() == 1  # what the daemon does while idle after that job
    second = runner("--image", image, "--json", "--disk", "128", "--", "/bin/sh", "-c", script)
    assert second.returncode == 0, second.stderr
    assert [r["stdout"] for r in first.doc["results"] + second.doc["results"]] == ["fresh\n"] * 2
    assert second.doc["host"]["root_disk"] == {"built": "template", "spare_disks_taken": 1}
    assert spares.count(None) == 0


def test_runner_affinity_is_restored_after_a_job(plain_image: str) -> None:
    import os

    from bencher_runner.job import run_job
    from bencher_runner.paths import cache_dir
    from bencher_runner.spec.config import make_run_config

    before = os.sched_getaffinity(0)
    result = run_job(make_run_config(image=plain_image, cmd=("/bin/true",)), cache=cache_dir())
    assert result.status == "completed", result.error
    assert os.sched_getaffinity(0) == before  # the job moved this process to housekeeping, then back


def test_a_guest_spamming_its_console_cannot_fill_the_host_disk(plain_image: str) -> None:
    """Issue 12, finding 15: the serial log keeps its head and tail on disk, whatever the guest writes."""
    import secrets
    import subprocess
    import sys

    from bencher_runner.paths import cache_dir, work_root
    from bencher_runner.sandbox.serial import HEAD_BYTES, TAIL_BYTES

    marker = f"spam-{secrets.token_hex(8)}"
    script = f"echo {marker} > /dev/console; head -c 4194304 /dev/zero | tr '\\0' x > /dev/console; echo done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bencher_runner", "run", "--image", plain_image, "--json", "--",
         "/bin/sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    work = work_root(cache_dir())
    peak = apparent = 0
    while proc.poll() is None:
        for log in work.glob("*/iter-1/serial.log"):  # other jobs may share the cache: find ours
            try:
                with log.open("rb") as f:
                    if marker.encode() not in f.read(HEAD_BYTES):
                        continue
                    st = os.fstat(f.fileno())
            except OSError:
                continue
            peak, apparent = max(peak, st.st_blocks * 512), max(apparent, st.st_size)
        time.sleep(0.05)
    stdout, _ = proc.communicate()
    assert proc.returncode == 0
    assert json.loads(stdout)["results"][0]["stdout"] == "done\n"
    assert apparent > 4 << 20  # the guest did write it all
    assert peak <= HEAD_BYTES + TAIL_BYTES + (1 << 20)  # the old runner kept all 4 MiB and more
