"""Host tuning flags with bad values are one-line usage errors (exit 2), never a traceback (issue 12,
finding 11)."""

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bencher_runner.cli.tuning_options import tuning_options, tuning_options_from


@click.command()
@tuning_options
def command(**kwargs: object) -> None:
    tuning_options_from(kwargs)


@pytest.mark.parametrize(
    "args",
    [
        ["--governor", "a b"],
        ["--governor", ""],
        ["--governor", "../../../../etc/passwd"],
        ["--governor", "perf\normance"],
        ["--swappiness", "300"],
        ["--perf-event-paranoid", "9"],
        ["--thp", "sometimes"],
    ],
    ids=["space", "empty", "path", "newline", "swappiness", "paranoid", "thp"],
)
def test_bad_tuning_values_are_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Invalid value for" in result.output


def test_good_governors_pass() -> None:
    for governor in ("performance", "powersave", "schedutil", "on_demand-2"):
        assert CliRunner().invoke(command, ["--governor", governor]).exit_code == 0


def test_values_that_bypass_click_are_a_usage_error_too() -> None:
    with pytest.raises(click.UsageError, match="invalid host tuning setting: swappiness 300"):
        tuning_options_from({"swappiness": 300})


@pytest.mark.parametrize(
    "subcommand", [["run", "--image", "/nonexistent"], ["daemon", "--runner", "r", "--key", "k"]]
)
def test_runner_says_one_line_and_exits_2(tmp_path: Path, subcommand: list[str]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bencher_runner",
            *subcommand,
            "--cache-dir",
            str(tmp_path),
            "--governor",
            "a b",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Invalid value for '--governor'" in proc.stderr and "'a b' is not a governor name" in proc.stderr
