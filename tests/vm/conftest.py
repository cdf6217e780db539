"""Fixtures for tests that boot real microVMs through the `runner` CLI (TCG here, KVM where it works)."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bencher_runner.paths import cache_dir, work_root
from bencher_runner.recovery import jail_uid_processes
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


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Every VM test must leave no QEMU process and no work directory behind."""
    yield
    work = work_root(cache_dir())
    assert not (work.exists() and any(work.iterdir())), f"work dirs left: {list(work.iterdir())}"
    procs = subprocess.run(["pgrep", "-f", f"qemu-system.*{work}"], capture_output=True, text=True)
    assert procs.stdout.strip() == "", f"QEMU still running: {procs.stdout}"
    # A jailed QEMU's argv names only jail paths: find it by the jail uid instead.
    assert jail_uid_processes(DEFAULT_JAIL_UID) == {}, "a process of the jail uid is still running"
