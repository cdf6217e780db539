import fcntl
import multiprocessing
import os
import stat
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from bencher_runner.oci.blobcache import BlobCache, image_cache_dir, list_cache, prune_cache
from bencher_runner.oci.digest import digest_bytes
from bencher_runner.spec.errors import CanceledError, DigestMismatchError, ImageError
from tests.support.bounded import call_bounded


def writer(data: bytes, calls: list[int] | None = None, delay: float = 0.0):  # type: ignore[no-untyped-def]
    def fetch(f: BinaryIO) -> str:
        if calls is not None:
            calls.append(1)
        time.sleep(delay)
        f.write(data)
        return digest_bytes(data)

    return fetch


def age(path: Path, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def test_ensure_writes_once_then_hits(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    data = b"hello blob"
    d = digest_bytes(data)
    calls: list[int] = []
    path, cached = cache.ensure(d, len(data), writer(data, calls))
    assert (path, cached) == (tmp_path / "blobs" / "sha256" / d.split(":")[1], False)
    assert path.read_bytes() == data and path.stat().st_mode & 0o777 == 0o644
    assert cache.ensure(d, len(data), writer(data, calls)) == (path, True)
    assert calls == [1]
    assert image_cache_dir(Path("/c")) == Path("/c/images")


def test_mismatch_deletes_temp_and_names_digests(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    expected = digest_bytes(b"good")
    with pytest.raises(DigestMismatchError, match=rf"expected {expected}, got {digest_bytes(b'evil')}"):
        cache.ensure(expected, 4, writer(b"evil"))
    assert not cache.path(expected).exists()
    assert list((tmp_path / "blobs" / "sha256").iterdir()) == []
    with pytest.raises(ImageError, match="size mismatch: the descriptor says 5 bytes, 4 were received"):
        cache.ensure(expected, 5, writer(b"good"))
    assert list((tmp_path / "blobs" / "sha256").iterdir()) == []


def test_fetch_error_cleans_up(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)

    def boom(f: BinaryIO) -> str:
        f.write(b"partial")
        raise ImageError("network gone")

    with pytest.raises(ImageError, match="network gone"):
        cache.ensure(digest_bytes(b"x"), 1, boom)
    assert list((tmp_path / "blobs" / "sha256").iterdir()) == []


def test_lookup_checks_size_and_rejects_hostile_digests(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    d = digest_bytes(b"abc")
    assert cache.lookup(d) is None
    cache.ensure(d, 3, writer(b"abc"))
    assert cache.lookup(d, 3) is not None and cache.lookup(d, 4) is None
    with pytest.raises(ImageError, match="not a valid digest"):
        cache.path("sha256:../../etc/passwd")


def test_concurrent_threads_download_once(tmp_path: Path) -> None:
    data = b"shared" * 1000
    d = digest_bytes(data)
    calls: list[int] = []
    results: list[Path] = []

    def go() -> None:
        results.append(BlobCache(tmp_path).ensure(d, len(data), writer(data, calls, delay=0.1))[0])

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and len(set(results)) == 1 and results[0].read_bytes() == data


def _proc_ensure(root: str, data: bytes, out: "multiprocessing.Queue[bool]") -> None:
    _, cached = BlobCache(Path(root)).ensure(digest_bytes(data), len(data), writer(data, delay=0.2))
    out.put(cached)


def test_concurrent_processes_download_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue[bool] = ctx.Queue()
    procs = [ctx.Process(target=_proc_ensure, args=(str(tmp_path), b"proc-blob", q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    assert sorted(q.get(timeout=1) for _ in procs) == [False, True, True]


def test_ls_and_lru_prune(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    blobs = {name: bytes([i]) * (100 * (i + 1)) for i, name in enumerate("abcd")}  # 100..400 bytes
    digests = {}
    for i, (name, data) in enumerate(blobs.items()):
        d = digest_bytes(data)
        digests[name] = d
        path, _ = cache.ensure(d, len(data), writer(data))
        age(path, 1000 - i * 100)  # a oldest ... d newest
    cache.lookup(digests["a"])  # use touches: a becomes newest

    entries = list_cache(tmp_path)
    assert [e.digest for e in entries] == [digests[n] for n in "bcda"]
    assert [e.size for e in entries] == [200, 300, 400, 100]
    assert entries[0].last_used < entries[-1].last_used

    result = prune_cache(tmp_path, 550)  # total 1000: drop b (200), c (300) -> 500
    assert [e.digest for e in result.removed] == [digests["b"], digests["c"]]
    assert (result.freed_bytes, result.kept_bytes, result.kept_count) == (500, 500, 2)

    kept = cache.prune(0, keep={digests["a"]})
    assert [e.digest for e in kept.removed] == [digests["d"]] and kept.kept_bytes == 100
    everything = prune_cache(tmp_path)
    assert everything.kept_count == 0 and list_cache(tmp_path) == []
    assert prune_cache(tmp_path / "missing").removed == ()


def test_prune_skips_blobs_being_written_and_removes_stale_temps(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    d = digest_bytes(b"busy")
    cache.ensure(d, 4, writer(b"busy"))
    stale = tmp_path / "blobs" / "sha256" / ".tmp-dead"
    stale.write_bytes(b"x")
    age(stale, 7200)
    fresh = tmp_path / "blobs" / "sha256" / ".tmp-live"
    fresh.write_bytes(b"x")
    assert [e.digest for e in cache.entries()] == [d]  # temps are not entries
    with cache.locked(d):
        assert cache.prune(None).removed == ()
    assert not stale.exists() and fresh.exists()
    assert len(cache.prune(None).removed) == 1


def test_unwritable_cache_is_an_image_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    cache = BlobCache(tmp_path / "file" / "cache")
    with pytest.raises(ImageError, match=r"cannot store blob sha256:\w+ in the image cache .*/file/cache"):
        cache.ensure(digest_bytes(b"x"), 1, writer(b"x"))


# --- special files in the cache (a FIFO blocks a plain open forever) ---------------------------------


def _plant(cache: BlobCache, digest: str, kind: str, data: bytes) -> Path:
    path = cache.path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":  # to a file with the right bytes elsewhere: still not a cache blob
        outside = cache.root / "outside"
        outside.write_bytes(data)
        os.symlink(outside, path)
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_special_file_at_a_cached_blob_is_not_a_hit_and_is_replaced(tmp_path: Path, kind: str) -> None:
    cache = BlobCache(tmp_path)
    data = b"the real blob"
    d = digest_bytes(data)
    path = _plant(cache, d, kind, data)
    assert cache.lookup(d) is None and cache.lookup(d, len(data)) is None
    calls: list[int] = []
    got, cached = call_bounded(lambda: cache.ensure(d, len(data), writer(data, calls)), fifos=[path])
    assert (got, cached, calls) == (path, False, [1])
    assert stat.S_ISREG(os.lstat(path).st_mode) and path.read_bytes() == data
    assert (tmp_path / "outside").exists() or kind != "symlink"  # the link's target is left alone


def test_directory_at_a_cached_blob_is_an_image_error(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    d = digest_bytes(b"x")
    _plant(cache, d, "dir", b"x")
    assert cache.lookup(d) is None
    with pytest.raises(ImageError, match=r"cannot store blob sha256:\w+ in the image cache"):
        cache.ensure(d, 1, writer(b"x"))


def test_entries_list_only_regular_blobs(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    real = digest_bytes(b"real")
    cache.ensure(real, 4, writer(b"real"))
    _plant(cache, digest_bytes(b"fifo"), "fifo", b"")
    _plant(cache, digest_bytes(b"link"), "symlink", b"link")
    assert [e.digest for e in cache.entries()] == [real]


def _hold_lock(lock_path: str, ready: "multiprocessing.Queue[bool]") -> None:
    fd = os.open(lock_path, os.O_RDONLY)  # a read-only descriptor can hold an flock too
    fcntl.flock(fd, fcntl.LOCK_EX)
    ready.put(True)
    time.sleep(600)


@pytest.mark.parametrize("when", ["before", "while"])
def test_waiting_for_a_blob_lock_ends_on_cancel(tmp_path: Path, when: str) -> None:
    cache = BlobCache(tmp_path)
    d = digest_bytes(b"locked")
    lock_path = cache._lock_path(d)
    lock_path.parent.mkdir(parents=True)
    lock_path.touch()
    ctx = multiprocessing.get_context("fork")
    ready: multiprocessing.Queue[bool] = ctx.Queue()
    holder = ctx.Process(target=_hold_lock, args=(str(lock_path), ready), daemon=True)
    holder.start()
    try:
        assert ready.get(timeout=30)
        cancel = threading.Event()
        if when == "before":
            cancel.set()
        else:
            threading.Timer(0.3, cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(CanceledError, match="canceled"):
            call_bounded(lambda: cache.ensure(d, 6, writer(b"locked"), cancel=cancel))
        assert time.monotonic() - t0 < 5
        assert not cache.path(d).exists()
    finally:
        holder.kill()
        holder.join(10)
