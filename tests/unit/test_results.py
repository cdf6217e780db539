"""Result shapes: the wire form omits what is empty (PROTOCOL.md), `runner run --json` never does."""

import json

import pytest

from bencher_runner.spec.results import IterationOutput, RunResult, SandboxInfo

ITERATION_KEYS = {"exit_code", "stdout", "stderr", "output", "missing", "truncated"}
RUN_KEYS = {"status", "results", "error", "sandbox", "timings", "host"}


@pytest.mark.parametrize(
    "output",
    [
        IterationOutput(124),  # a timeout before the command printed anything
        IterationOutput(0, stdout=b"x"),
        IterationOutput(1, stderr=b"e"),
        IterationOutput(0, output={"/o": b"1"}, missing={"/m": "No such file or directory"}),
        IterationOutput(0, b"a", b"b", {"/o": b""}, {}, ("stdout",)),
    ],
)
def test_json_iteration_always_has_every_key(output: IterationOutput) -> None:
    doc = output.to_json()
    assert set(doc) == ITERATION_KEYS
    assert isinstance(doc["stdout"], str) and isinstance(doc["stderr"], str)
    assert isinstance(doc["output"], dict) and isinstance(doc["missing"], dict)
    assert isinstance(doc["truncated"], list)


def test_json_iteration_empty_values_are_empty_not_missing() -> None:
    assert IterationOutput(124).to_json() == {
        "exit_code": 124,
        "stdout": "",
        "stderr": "",
        "output": {},
        "missing": {},
        "truncated": [],
    }


def test_protocol_iteration_omits_empty_fields() -> None:
    assert IterationOutput(124).to_protocol() == {"exit_code": 124}
    assert IterationOutput(0, stdout=b"\xffok", output={"/o": b"1"}).to_protocol() == {
        "exit_code": 0,
        "stdout": "\ufffdok",
        "output": {"/o": "1"},
    }


@pytest.mark.parametrize(
    "result",
    [
        RunResult("completed", [], None),
        RunResult("failed", [IterationOutput(124)], None, error="timed out"),
        RunResult(
            "completed",
            [IterationOutput(0, b"x")],
            SandboxInfo("qemu", "tcg", 1, 512, 1024, False),
            timings={"total_s": 1.23456},
            metadata={"cpus": {}},
        ),
    ],
)
def test_json_run_result_always_has_every_key(result: RunResult) -> None:
    doc = json.loads(json.dumps(result.to_json()))
    assert set(doc) == RUN_KEYS
    assert doc["error"] == result.error
    assert isinstance(doc["timings"], dict) and isinstance(doc["host"], dict)
    for iteration in doc["results"]:
        assert set(iteration) == ITERATION_KEYS
