"""The command line: every click command and option of `runner`, and nothing else.

Every user value is validated where it is parsed (click types, host_options.host_settings_from), and
every RunnerError becomes one line on stderr and exit 2 (a job's own failure: exit 1).
"""

from bencher_runner.cli.main import main

__all__ = ["main"]
