"""Result shapes: the wire form omits what is empty (PROTOCOL.md), `runner run --json` never does."""

import json

import pytest

from bencher_runner.spec.results import IterationOutput, RunResult, SandboxInfo

ITERATION_KEYS = {"exit_code", "stdout", "stderr", "output", "missing", "truncated"}
RUN_KEYS = {"status", "results", "error", "sandbox", "timings", "host", "interference", "fingerprint"}


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


# -- build_time / file_size: Bencher Metric Format under "\0bencher" ---------------------------------


def bmf(build_time: tuple[str, float] | None = None, sizes: dict[str, int] | None = None) -> str | None:
    from bencher_runner.spec.bmf import metric_report

    return metric_report(build_time=build_time, file_sizes=sizes).bmf


def test_build_time_alone_is_exact_bmf() -> None:
    assert bmf(("/bin/sh -c make", 2.5)) == (
        '{"/bin/sh -c make":{"build-time":{"value":2.5,"lower_value":null,"upper_value":null}}}'
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(3.14159, "3.14"), (1.0, "1.0"), (0.004, "0.0"), (12.345, "12.35"), (59.999, "60.0")],
)
def test_build_time_is_rounded_to_hundredths_as_bencher_does(seconds: float, text: str) -> None:
    assert (
        bmf(("b", seconds))
        == f'{{"b":{{"build-time":{{"value":{text},"lower_value":null,"upper_value":null}}}}}}'
    )


def test_file_sizes_are_keyed_by_basename_in_request_order() -> None:
    assert bmf(sizes={"/out/app.bin": 1024, "rel/lib.so": 7, "plain": 0}) == (
        '{"app.bin":{"file-size":{"value":1024.0,"lower_value":null,"upper_value":null}},'
        '"lib.so":{"file-size":{"value":7.0,"lower_value":null,"upper_value":null}},'
        '"plain":{"file-size":{"value":0.0,"lower_value":null,"upper_value":null}}}'
    )


def test_build_time_then_file_sizes_in_one_document() -> None:
    doc = json.loads(bmf(("-c cargo bench", 2.5), {"/tmp/result.bin": 512}) or "")
    assert list(doc) == ["-c cargo bench", "result.bin"]
    assert doc["-c cargo bench"] == {"build-time": {"value": 2.5, "lower_value": None, "upper_value": None}}
    assert doc["result.bin"] == {"file-size": {"value": 512.0, "lower_value": None, "upper_value": None}}


def test_a_benchmark_named_like_a_file_gets_both_measures() -> None:
    doc = json.loads(bmf(("app", 1.0), {"/bin/app": 9}) or "")
    none = {"lower_value": None, "upper_value": None}
    assert doc == {"app": {"build-time": {"value": 1.0, **none}, "file-size": {"value": 9.0, **none}}}


def test_two_files_with_one_basename_keep_the_last_and_say_so() -> None:
    from bencher_runner.spec.bmf import metric_report

    report = metric_report(build_time=None, file_sizes={"/a/out.bin": 1, "/b/out.bin": 2})
    assert json.loads(report.bmf or "")["out.bin"]["file-size"]["value"] == 2.0
    assert report.warnings == [
        "file-size: /a/out.bin and /b/out.bin are both named out.bin; /b/out.bin is kept"
    ]


@pytest.mark.parametrize("path", ["/x/..", "..", "/"])
def test_a_path_without_a_file_name_is_named_by_the_whole_path(path: str) -> None:
    assert list(json.loads(bmf(sizes={path: 3}) or "")) == [path]


def test_nothing_to_report_is_no_document() -> None:
    assert bmf() is None
    assert bmf(sizes={}) is None


@pytest.mark.parametrize(
    ("candidates", "name"),
    [
        (("/bin/sh -c make", "img", "p@d"), "/bin/sh -c make"),
        (("", "registry.example/bench:v1", "p@d"), "registry.example/bench:v1"),
        (("", None, "p@d"), "p@d"),
        (("", "", "p@d"), "p@d"),
        (("x" * 1025, "img", "p@d"), "img"),  # Bencher's limit is 1024 bytes
        (("é" * 512, "img"), "é" * 512),  # 1024 bytes exactly
        (("é" * 513, "img"), "img"),
    ],
)
def test_benchmark_name_is_the_first_valid_candidate(candidates: tuple[str | None, ...], name: str) -> None:
    from bencher_runner.spec.bmf import benchmark_name

    assert benchmark_name(*candidates) == name


def test_wire_and_json_forms_replace_the_files_by_the_metric_entry() -> None:
    text = bmf(("b", 1.0))
    it = IterationOutput(0, b"out", output={"/o": b"content"}, bmf=text)
    assert it.to_protocol() == {"exit_code": 0, "stdout": "out", "output": {"\0bencher": text}}
    assert it.to_json()["output"] == {"\0bencher": text}
    assert '"\\u0000bencher"' in json.dumps(it.to_protocol())  # the key as Bencher's server reads it
    assert it.output == {"/o": b"content"}  # still there for runner run --output-dir
