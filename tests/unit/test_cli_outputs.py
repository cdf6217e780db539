"""`runner run --output`: an empty or NUL path is refused up front (issue 12, finding 15); absolute
and relative paths are taken as before."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from bencher_runner.cli import main
from bencher_runner.cli.run import _check_outputs


@pytest.mark.parametrize("value", ["", "a\0b"], ids=["empty", "nul"])
def test_an_output_path_the_guest_cannot_look_up_is_a_usage_error(tmp_path: Path, value: str) -> None:
    result = CliRunner().invoke(
        main,
        ["run", "--image", "/nonexistent", "--cache-dir", str(tmp_path), "--output", "ok", "--output", value],
    )
    assert result.exit_code == 2
    assert "Invalid value for '--output'" in result.output
    assert not (tmp_path / "work").exists()


def test_absolute_and_relative_paths_are_taken() -> None:
    paths = ("rel.txt", "/abs/out.json", "./x", "../up", "dir/")
    assert _check_outputs(paths) == paths
