"""Locating the guest agent binary (guest/agent.c, built static by `make agent`)."""

import os
from importlib import resources
from pathlib import Path

from bencher_runner.spec.errors import SandboxError

AGENT_NAME = "bencher-agent"


def find_agent() -> Path:
    env = os.environ.get("BENCHER_RUNNER_AGENT")
    if env:
        path = Path(env)
        if not path.is_file():
            raise SandboxError(f"BENCHER_RUNNER_AGENT={env} does not exist; build it with `make agent`")
        return path
    path = Path(str(resources.files("bencher_runner") / "_agent" / AGENT_NAME))
    if not path.is_file():
        raise SandboxError(
            f"the guest agent is not built ({path} is missing); run `make agent` "
            "(needs gcc and static libc: `apt-get install gcc libc6-dev`)"
        )
    return path
