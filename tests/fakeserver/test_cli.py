"""`python -m bencher_runner.fakeserver` is a user-facing tool: its help, options and shutdown."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bencher_runner.fakeserver.__main__ import parser

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "bencher_runner.fakeserver", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def test_help_lists_the_knobs() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--heartbeat-timeout", "--grace-period", "--max-message-size", "--reject-401", "--fault"):
        assert option in result.stdout


@pytest.mark.parametrize("fault", ["completed", "completed=explode", "nowhere=drop"])
def test_a_bad_fault_is_refused_with_the_choices(fault: str) -> None:
    result = run("--fault", fault)
    assert result.returncode == 2
    assert "POINT=ACTION" in result.stderr and "withhold" in result.stderr


def test_faults_parse() -> None:
    args = parser().parse_args(["--fault", "completed=withhold", "--fault", "running=drop"])
    assert [(p, f.value) for p, f in args.fault] == [("completed", "withhold"), ("running", "drop")]


def test_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [
        sys.executable,
        "-m",
        "bencher_runner.fakeserver",
        "--port",
        "0",
        "--jobs",
        "2",
        "--status-every",
        "0.1",
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert banner.startswith("fake Bencher API at http://127.0.0.1:"), banner
        states = json.loads(proc.stdout.readline())
        assert [s["state"] for s in states.values()] == ["pending", "pending"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
