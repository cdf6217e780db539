"""Where the runner keeps things on a host (platformdirs defaults, all overridable).

cache: kernel bundle, initramfs, accel probe answer; work: per-job directories (on disk, not tmpfs,
because a job's root disk is as large as the job asks); state: the daemon's outbox and update record.
"""

import os
from pathlib import Path

import platformdirs

APP = "bencher-runner"


def _dir(override: Path | None, env_var: str, default: str) -> Path:
    """The flag's value, else the environment variable's, else the platform's directory."""
    if override is not None:
        return override
    return Path(os.environ.get(env_var) or default)


def cache_dir(override: Path | None = None) -> Path:
    return _dir(override, "BENCHER_RUNNER_CACHE_DIR", platformdirs.user_cache_dir(APP))


def state_dir(override: Path | None = None) -> Path:
    return _dir(override, "BENCHER_RUNNER_STATE_DIR", platformdirs.user_state_dir(APP))


def work_root(cache: Path) -> Path:
    return cache / "work"
