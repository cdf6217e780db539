"""Fixtures for tests that boot real microVMs through the `runner` CLI (TCG here, KVM where it works)."""

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.paths import cache_dir, work_root
from bencher_runner.recovery import LOCK_NAME, jail_uid_processes
from bencher_runner.spec.config import DEFAULT_JAIL_UID
from tests.support.busybox import busybox_tree
from tests.support.oci_builder import Entry, build_layout, layer_from_dir


@dataclass
class Run:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.stdout)  # type: ignore[no-any-return]


def runner(*args: str, timeout: float = 240) -> Run:
    proc = subprocess.run(
        [sys.executable, "-m", "bencher_runner", "run", *args],
        capture_output=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
    return Run(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


@pytest.fixture(scope="session")
def busybox_layer(tmp_path_factory: pytest.TempPathFactory) -> list[Entry]:
    return layer_from_dir(busybox_tree(tmp_path_factory.mktemp("tree")))


@pytest.fixture(scope="session")
def make_image(tmp_path_factory: pytest.TempPathFactory, busybox_layer: list[Entry]) -> Any:
    """make_image(config, extra_layers=()) -> layout path (busybox base + extra layers)."""

    def make(config: dict[str, Any], extra_layers: tuple[list[Entry], ...] = ()) -> str:
        dest = tmp_path_factory.mktemp("image")
        build_layout(dest, [busybox_layer, *extra_layers], config, tag=None)
        return str(dest)

    return make


@pytest.fixture(scope="session")
def plain_image(make_image: Any) -> str:
    return make_image({"Env": ["PATH=/bin"]})  # type: ignore[no-any-return]


def _held_by_a_live_runner(work_dir: Path) -> bool:
    """A job that is still running somewhere (another runner on this machine) holds its dir's lock."""
    try:
        fd = os.open(work_dir / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Every VM test must leave no work directory behind: every job of the test has ended by now, so
    a dir left unlocked is a leftover (one still locked belongs to a job of another runner)."""
    work = work_root(cache_dir())
    before = set(work.iterdir()) if work.exists() else set()
    yield
    left = [d for d in (work.iterdir() if work.exists() else ()) if d not in before]
    left = [d for d in left if not _held_by_a_live_runner(d)]
    assert not left, f"work dirs left: {left}"
    procs = subprocess.run(["pgrep", "-f", f"qemu-system.*{work}"], capture_output=True, text=True)
    assert procs.stdout.strip() == "", f"QEMU still running: {procs.stdout}"
    # A jailed QEMU's argv names only jail paths: find it by the jail uid instead.
    assert jail_uid_processes(DEFAULT_JAIL_UID) == {}, "a process of the jail uid is still running"
