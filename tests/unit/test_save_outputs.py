"""`runner run --output-dir`: whatever names the guest's output files have, each lands in its own file
under the directory, and a failure is one line, with the JSON result still printed."""

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from bencher_runner import run as run_module
from bencher_runner.run import INDEX_NAME, run_command, save_outputs
from bencher_runner.sandbox.outputdisk import wire_name
from bencher_runner.spec.config import make_run_config
from bencher_runner.spec.errors import RunnerError
from bencher_runner.spec.results import IterationOutput, RunResult


def result_with(files: dict[str, bytes], iterations: int = 1) -> RunResult:
    outputs = [IterationOutput(0, b"out", b"err", output=files) for _ in range(iterations)]
    return RunResult(status="completed", results=outputs, sandbox=None)


def saved(base: Path) -> list[tuple[str, bytes]]:
    """(guest path, saved bytes) of every saved file, through the index."""
    index = json.loads((base / INDEX_NAME).read_text())
    return sorted((guest, (base / rel).read_bytes()) for rel, guest in index.items())


def as_saved(files: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return sorted((wire_name(guest), data) for guest, data in files.items())


def inside(root: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def test_plain_paths_keep_the_documented_layout(tmp_path: Path) -> None:
    files = {"rel.txt": b"rel", "sub/deep.txt": b"deep", "/abs.bin": b"\xff\xfe", "./dot/x": b"x"}
    save_outputs(result_with(files, iterations=2), tmp_path)
    for n in (1, 2):
        base = tmp_path / f"iter-{n}"
        assert (base / "stdout").read_bytes() == b"out" and (base / "stderr").read_bytes() == b"err"
        assert (base / "files" / "rel.txt").read_bytes() == b"rel"
        assert (base / "files" / "sub" / "deep.txt").read_bytes() == b"deep"
        assert (base / "files" / "abs.bin").read_bytes() == b"\xff\xfe"
        assert (base / "files" / "dot" / "x").read_bytes() == b"x"
        assert json.loads((base / INDEX_NAME).read_text())["files/sub/deep.txt"] == "sub/deep.txt"
        assert saved(base) == as_saved(files)


@pytest.mark.parametrize(
    "files",
    [
        {"a": b"file a", "a/b": b"file a/b"},  # a file and a directory of the same name
        {"a/b": b"file a/b", "a": b"file a"},
        {"..": b"dots", "": b"empty"},
        {"../x": b"up", "__/x": b"under"},  # the old layout mapped both to files/__/x
        {"x\0y": b"nul"},
        {"z" * 300: b"long", "d/" + "y" * 300 + "/f": b"long dir"},
        {"/": b"root", ".": b"dot", "./": b"dot slash"},
        {"caf\udce9": b"undecodable", "caf\\xe9": b"escaped"},
        {"a//b": b"1", "a/b": b"2", "/a/b": b"3", "a/./b": b"4"},
        {"/etc/passwd": b"not the host's", "../../../../../../tmp/evil": b"no"},
        {"-rf": b"dash", " ": b"space", "new\nline": b"newline"},
    ],
    ids=[
        "a-then-a/b", "a/b-then-a", "dotdot-and-empty", "up-and-underscores", "nul", "300-byte",
        "root-and-dots", "undecodable", "same-path-spelled-4-ways", "absolute-and-escape", "odd-chars",
    ],
)  # fmt: skip
def test_hostile_names_each_get_their_own_file_inside_the_dir(
    tmp_path: Path, files: dict[str, bytes]
) -> None:
    out = tmp_path / "out"
    save_outputs(result_with(files), out)
    base = out / "iter-1"
    assert saved(base) == as_saved(files)  # every file, byte-exact, none overwritten by another
    for path in tmp_path.rglob("*"):
        assert inside(out, path)
    json.dumps(json.loads((base / INDEX_NAME).read_text()), ensure_ascii=False).encode()


def test_renamed_files_are_listed_and_named_after_the_guest_name(tmp_path: Path) -> None:
    save_outputs(result_with({"a": b"1", "a/b": b"2", "../up.txt": b"3", "ok.txt": b"4"}), tmp_path)
    where = {guest: rel for rel, guest in json.loads((tmp_path / "iter-1" / INDEX_NAME).read_text()).items()}
    assert where["ok.txt"] == "files/ok.txt"
    assert where["a"].startswith("renamed/") and where["a/b"].startswith("renamed/")
    assert where["../up.txt"].startswith("renamed/") and where["../up.txt"].endswith("up.txt")
    assert len(set(where.values())) == 4


def test_a_previous_run_in_the_way_does_not_fail_the_save(tmp_path: Path) -> None:
    save_outputs(result_with({"a/b": b"old"}), tmp_path)  # files/a is a directory now
    save_outputs(result_with({"a": b"new"}), tmp_path)
    assert saved(tmp_path / "iter-1") == [("a", b"new")]


def test_an_unwritable_output_dir_is_one_runner_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    with pytest.raises(RunnerError) as err:
        save_outputs(result_with({"x": b"1"}), blocker / "out")
    assert "cannot save the outputs" in str(err.value) and str(blocker) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.fixture
def fake_job(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(run_module, "run_job", lambda *a, **k: result_with({"a": b"1", "a/b": b"2"}))
    monkeypatch.setattr(run_module, "recover_from_crash", lambda *a, **k: None)
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_json_is_printed_when_saving_fails(
    tmp_path: Path, fake_job: None, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = make_run_config(image="unused")
    code = run_command(config, cache=tmp_path, as_json=True, quiet=True, output_dir=blocker / "out")
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "completed"
    assert code == 2
    assert "runner: error: cannot save the outputs" in captured.err


def test_json_and_files_for_names_that_used_to_crash(
    tmp_path: Path, fake_job: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_run_config(image="unused")
    code = run_command(config, cache=tmp_path, as_json=True, quiet=True, output_dir=tmp_path / "out")
    assert code == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["output"] == {"a": "1", "a/b": "2"}
    assert saved(tmp_path / "out" / "iter-1") == [("a", b"1"), ("a/b", b"2")]
