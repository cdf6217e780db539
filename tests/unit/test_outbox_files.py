"""The outbox and the update record on disk, written through atomicfile (issue 14)."""

import os
from pathlib import Path

import pytest

from bencher_runner.daemon.outbox import Outbox, OutboxError
from bencher_runner.daemon.update import UpdateRecord, load_record, record_path, save_record
from bencher_runner.protocol import Terminal


def _completed(job: str, stdout: str) -> Terminal:
    return Terminal.of({"event": "completed", "job": job, "results": [{"exit_code": 0, "stdout": stdout}]})


def test_put_load_replace_park_remove(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put(_completed("job-1", "first"))
    box.put(_completed("job-2", "other"))
    box.put(_completed("job-1", "again"))  # a rewrite replaces the whole file
    assert [m.wire() for m in box.load()] == [
        _completed("job-2", "other").wire(),
        _completed("job-1", "again").wire(),
    ]
    files = sorted((tmp_path / "outbox").iterdir())
    assert [p.suffix for p in files] == [".json", ".json"]  # no temporary left behind
    assert {p.stat().st_mode & 0o777 for p in files} == {0o600}
    parked = box.park("job-2")
    assert parked.parent.name == "undelivered" and parked.exists()
    box.remove("job-1")
    assert box.load() == []


def test_a_failed_put_is_an_outbox_error_and_keeps_the_old_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Outbox(tmp_path / "outbox")
    box.put(_completed("job-1", "kept"))

    def no_space(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(OutboxError, match=r"cannot write the result of job 'job-1'.*No space left"):
        box.put(_completed("job-1", "lost"))
    monkeypatch.undo()
    assert [m.wire() for m in box.load()] == [_completed("job-1", "kept").wire()]
    assert len(list((tmp_path / "outbox").iterdir())) == 1


def test_update_record_round_trip(tmp_path: Path) -> None:
    record = UpdateRecord(
        "1.2.3", "https://example.invalid/r.whl", "sha256:" + "0" * 64, "1.2.2", "2026-01-01T00:00:00Z"
    )
    path = save_record(tmp_path / "state", record)
    assert path == record_path(tmp_path / "state") and path.stat().st_mode & 0o777 == 0o600
    assert load_record(tmp_path / "state") == record
    assert [p.name for p in (tmp_path / "state").iterdir()] == [path.name]
