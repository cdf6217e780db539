"""Spare root disks (sparedisk.py): copied from the last job's template while idle, taken by rename."""

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bencher_runner import sparedisk
from bencher_runner.rootfs import Template, TemplateCache
from bencher_runner.sparedisk import RefillThread, SpareDisks
from bencher_runner.spec.units import MIB

A_KEY = "sha256-" + "a" * 64 + "-8M-v1"
B_KEY = "sha256-" + "b" * 64 + "-8M-v1"


def template(tmp_path: Path, key: str = A_KEY, mib: int = 8) -> Template:
    """A sparse 'template' in the cache's template dir: a few data extents with holes between them."""
    disk = TemplateCache(tmp_path / "cache").root / f"{key}.ext4"
    disk.parent.mkdir(parents=True, exist_ok=True)
    with disk.open("wb") as f:
        f.truncate(mib * MIB)
        for at in (0, 3 * MIB, mib * MIB - 4096):
            f.seek(at)
            f.write(hashlib.sha256(str(at).encode()).digest() * 128)
    return Template(disk, None, None, key)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_refill_makes_the_wanted_count_of_fully_allocated_copies(tmp_path: Path) -> None:
    spares, t = SpareDisks(tmp_path / "cache"), template(tmp_path)
    spares.want(t, 3)
    assert spares.refill() == 3 and spares.count(t.key) == 3
    assert spares.refill() == 0  # already there
    for spare in spares.root.glob("*.ext4"):
        assert digest(spare) == digest(t.disk)
        assert spare.stat().st_blocks * 512 >= 8 * MIB  # allocated: the guest cannot over-commit the host
    assert spares.allocated_bytes() >= 3 * 8 * MIB


def test_taking_moves_a_spare_once(tmp_path: Path) -> None:
    spares, t = SpareDisks(tmp_path / "cache"), template(tmp_path)
    spares.want(t, 1)
    spares.refill()
    first, second = tmp_path / "a.ext4", tmp_path / "b.ext4"
    assert spares.take(t.key, first) and digest(first) == digest(t.disk)
    assert not spares.take(t.key, second) and not second.exists()
    assert not spares.take(B_KEY, second)


def test_a_job_on_another_image_drops_the_spares(tmp_path: Path) -> None:
    spares, a, b = SpareDisks(tmp_path / "cache"), template(tmp_path), template(tmp_path, B_KEY)
    spares.want(a, 2)
    spares.refill()
    spares.keep_only(b.key)
    assert spares.count(None) == 0 and spares.allocated_bytes() == 0
    spares.want(b, 1)  # the refill after that job: b's spares
    spares.refill()
    assert spares.count(b.key) == 1
    spares.want(a, 1)  # a refill for a drops b's first
    spares.refill()
    assert spares.count(a.key) == 1 and spares.count(b.key) == 0


def test_a_refill_keeps_within_its_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spares, t = SpareDisks(tmp_path / "cache"), template(tmp_path)
    spares.want(t, 10)
    monkeypatch.setattr(sparedisk, "MAX_SPARE_BYTES", 2 * 8 * MIB + MIB)
    assert spares.refill() == 2  # a third would pass MAX_SPARE_BYTES
    spares.drop()
    monkeypatch.setattr(sparedisk, "MAX_SPARE_BYTES", 1 << 40)
    free = (
        sparedisk.KEEP_FREE_BYTES + 8 * MIB
    )  # room for one spare above the floor; each spare takes its part
    monkeypatch.setattr(sparedisk, "free_bytes", lambda path: (free - spares.allocated_bytes(), path))
    assert spares.refill() == 1  # the second would leave less than KEEP_FREE_BYTES free
    monkeypatch.setattr(sparedisk, "free_bytes", lambda path: (sparedisk.KEEP_FREE_BYTES, path))
    spares.drop()
    assert spares.refill() == 0


def test_a_killed_refills_partial_copy_is_removed_and_a_missing_template_is_no_error(tmp_path: Path) -> None:
    spares, t = SpareDisks(tmp_path / "cache"), template(tmp_path)
    spares.want(t, 1)
    partial = spares.root / f"{t.key}.dead.tmp"
    partial.write_bytes(b"half")
    assert spares.refill() == 1 and not partial.exists() and spares.count(t.key) == 1
    t.disk.unlink()  # the template was pruned
    spares.drop()
    assert spares.refill() == 0 and spares.count(None) == 0
    (spares.root / sparedisk.WANTED).write_text("{not json")

    (spares.root / sparedisk.WANTED).write_text('{"key": "../../etc/shadow", "count": 1}')
    assert spares.wanted() is None  # the template is the cache's own file for a well-formed key


def test_prune_drops_spares_and_a_copy_under_way(tmp_path: Path) -> None:
    spares, t = SpareDisks(tmp_path / "cache"), template(tmp_path)
    spares.want(t, 1)
    spares.refill()
    (spares.root / f"{t.key}.busy.tmp").write_bytes(b"half")
    spares.drop()
    assert not list(spares.root.glob("*.ext4")) and not list(spares.root.glob("*.tmp"))


def test_a_refill_stops_between_copies(tmp_path: Path) -> None:
    spares, t = SpareDisks(tmp_path / "cache"), template(tmp_path)
    spares.want(t, 5)
    stop = threading.Event()
    stop.set()
    assert spares.refill(stop) == 0


def test_the_refill_thread_waits_for_the_host_lock_and_stop_ends_that_wait(tmp_path: Path) -> None:
    t = template(tmp_path)
    held = threading.Event()
    entered = threading.Event()

    @contextmanager
    def host_lock(stop: threading.Event) -> Iterator[None]:
        while held.is_set():  # another job holds the host: wait, unless stopped
            if stop.wait(0.01):
                raise RuntimeError("stopped while waiting")
        entered.set()
        yield

    refill = RefillThread(tmp_path / "cache", host_lock)
    refill.spares.want(t, 2)
    held.set()
    refill.start()
    time.sleep(0.1)
    refill.stop()  # returns although the lock never came free
    assert not entered.is_set() and refill.spares.count(t.key) == 0
    held.clear()
    refill.start()
    deadline = time.monotonic() + 30
    while refill.spares.count(t.key) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    refill.stop()
    assert entered.is_set() and refill.spares.count(t.key) == 2


def test_the_daemons_executor_refills_between_jobs_and_stops_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bencher_runner import job as job_module
    from bencher_runner.daemon.driver import default_executor
    from bencher_runner.spec.config import make_run_config
    from bencher_runner.spec.results import RunResult

    cache = tmp_path / "cache"
    t = template(tmp_path)
    seen: list[tuple[int, bool]] = []

    def fake_run_job(config: object, *, cache: Path, **_: object) -> RunResult:
        spares = SpareDisks(cache)
        seen.append((spares.count(t.key), any(spares.root.glob("*.tmp"))))  # no copy runs beside a job
        spares.want(t, 2)  # what job.py records once the template is known
        return RunResult(status="completed", results=[], sandbox=None)

    monkeypatch.setattr(job_module, "run_job", fake_run_job)
    executor = default_executor(cache)
    config = make_run_config(image="/nonexistent:latest")
    executor(config, threading.Event())  # nothing wanted yet
    deadline = time.monotonic() + 30
    while SpareDisks(cache).count(t.key) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the refill runs after the job, while the daemon is idle
    executor(config, threading.Event())
    assert seen == [(0, False), (2, False)]


def test_a_wish_that_cannot_be_written_costs_no_job(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "spare-disks").write_text("a file where the directory belongs")
    spares, t = SpareDisks(cache), template(tmp_path)
    spares.want(t, 1)  # no exception: the next job copies instead
    spares.keep_only(t.key)
    assert spares.wanted() is None
