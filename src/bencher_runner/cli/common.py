"""What every command of the CLI shares: its click context settings and the one way a command ends
on a RunnerError (one line on stderr, never a traceback)."""

import sys
from typing import NoReturn

import click

from bencher_runner.spec.errors import RunnerError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_USAGE = 2  # a value or a host that cannot run the job; 1 is the job's own failure


def fail(err: RunnerError | str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"runner: error: {err}", err=True)
    sys.exit(code)
