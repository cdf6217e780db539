"""Random tar streams against the unpacker (hypothesis; a few seconds in the normal run).

Each example builds one to three layers of random entries (every member type, names with `..`,
absolute paths, whiteouts, undecodable bytes, NULs, symlinks and hard links aimed at a sentinel
directory next to the tree, out-of-range owners and times), or random and mutated bytes, unpacks
them into ``<tmp>/tree`` with a small budget and asserts: nothing outside the tree is created,
changed or removed; the tree stays within the budget; every failure is a RunnerError whose text is
one UTF-8 line. Derandomized, no example database: the same examples every run.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bencher_runner.oci.unpack import (
    ByteBudget,
    ensure_directory,
    read_image_file,
    resolve_in_tree,
    unpack_layer_stream,
)
from bencher_runner.spec.errors import RunnerError

LIMIT_BYTES = 64 * 1024
LIMIT_INODES = 100
SENTINEL = "@SENTINEL@"  # replaced by the sentinel's absolute path
FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=10),  # generous: the host is shared and loaded; typical is ~20 ms
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Generation dominates the run time, so every strategy below is a small sampled_from.
COMPONENTS = st.sampled_from(
    [
        *("a", "a", "b", "b", "c", "victim", "deep", "..", ".", "", ".wh.a", ".wh.victim", ".wh..wh..opq"),
        *("é", "名", "\u2028", " ", "x" * 255),
        *(".wh..wh.plnk", "\udcff", "a\nb", "\x00", "x" * 256),  # rarer: each alone ends most layers
    ]
)
BENIGN_COMPONENTS = st.sampled_from(
    [
        *("a", "a", "b", "b", "c", "c", "victim", "victim", "deep", "file", "pipe", "new", ".wh.a"),
        *(".wh.victim", ".wh..wh..opq", "..", ".", "\udcff", "a\nb", "é", "名", "\u2028"),
    ]
)
NAMES = st.builds(
    lambda lead, parts: lead + "/".join(parts),
    st.sampled_from(["", "", "", "./", "./", "/"]),
    st.lists(COMPONENTS, min_size=1, max_size=5),
)
TARGETS = NAMES | st.sampled_from(
    [
        SENTINEL,
        f"{SENTINEL}/victim",
        "../sentinel",
        "../../sentinel/victim",
        "../" * 8 + "sentinel",
        "/",
        "/etc/passwd",
        "a",
        "../a",
    ]
)
KINDS = [tarfile.REGTYPE] * 4 + [tarfile.DIRTYPE] * 4 + [tarfile.SYMTYPE] * 3 + [tarfile.LNKTYPE] * 2
KINDS += [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, b"Z"]
IDS = st.sampled_from([0, 0, 1000, 4242, 4242, 2**32 - 2, 2**32 - 1, 2**40, -1])
TIMES = st.sampled_from([0.0, 1.7e9, 1.7e9, 86400.0, -1.0, 2.0**40, -(2.0**40), math.inf, math.nan])


@dataclass
class Member:
    kind: bytes
    name: str
    target: str
    mode: int
    uid: int
    gid: int
    mtime: float
    data: bytes
    xattrs: dict[str, bytes]


def members(
    kinds: list[bytes], names: st.SearchStrategy[str], ids: st.SearchStrategy[int]
) -> st.SearchStrategy[Member]:
    return st.builds(
        Member,
        kind=st.sampled_from(kinds),
        name=names,
        target=TARGETS,
        mode=st.sampled_from([0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o777, 0o555, 0o000, 0o7777]),
        uid=ids,
        gid=ids,
        mtime=TIMES,
        data=st.sampled_from([b"", b"x", b"hello\n", bytes(range(256)), bytes(LIMIT_BYTES // 2)]),
        xattrs=st.sampled_from(
            [{}, {}, {"user.a": b"1"}, {"trusted.b": b"\xff\x00"}, {"security.c": b"x" * 16, "user.d": b""}]
        ),
    )


# Entries a layer may hold and still unpack (most of them), and entries that end a layer (rarer).
BENIGN = members(
    [k for k in KINDS if k != b"Z"],
    st.builds(
        lambda lead, parts: lead + "/".join(parts),
        st.sampled_from(["", "", "./"]),
        st.lists(BENIGN_COMPONENTS, min_size=1, max_size=5),
    ),
    st.sampled_from([0, 1000, 4242]),
)
NASTY = members(KINDS, NAMES, IDS)


@st.composite
def planted(draw: st.DrawFn) -> list[Member]:
    """Finding 1's recipe with random parts: a directory, entries below it (metadata the unpacker
    defers), then a symlink in its place aimed at the sentinel (absolute, relative or climbing), then
    entries through it."""
    top = draw(st.sampled_from(["a", "a", "x/a"]))
    depth = top.count("/") + 1
    escape = draw(st.sampled_from([SENTINEL, "../" * depth + "sentinel", "../" * 12 + SENTINEL]))
    meta: dict[str, Any] = {"mode": 0o777, "uid": 4242, "gid": 4242, "mtime": 86400.0, "data": b"x"}
    meta["xattrs"] = {"user.pwned": b"1", "trusted.pwned": b"1"}

    def entry(kind: bytes, name: str, target: str = "", **fields: Any) -> Member:
        return Member(kind, name, target, **{**meta, **fields})

    before = [entry(tarfile.REGTYPE, "real"), entry(tarfile.DIRTYPE, top, mode=0o755)]
    below = ["victim", "victim/deep", "file", "pipe"]
    before += [
        entry(tarfile.DIRTYPE, f"{top}/{b}") for b in draw(st.lists(st.sampled_from(below), max_size=3))
    ]
    if draw(st.booleans()):
        before.append(entry(tarfile.LNKTYPE, f"{top}/h", "real"))
    after = [
        entry(kind, f"{top}/{b}", "victim")
        for kind, b in draw(
            st.lists(
                st.tuples(
                    st.sampled_from([tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.FIFOTYPE, tarfile.SYMTYPE]),
                    st.sampled_from([*below, "new"]),
                ),
                max_size=3,
            )
        )
    ]
    if draw(st.booleans()):
        after.append(entry(tarfile.REGTYPE, f"{top}/.wh.{draw(st.sampled_from(below))}"))
    return [*before, entry(tarfile.SYMTYPE, top, escape), *after]


def tar_bytes(members: list[Member], sentinel: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.mode = m.mode
            pax: dict[str, str] = {}
            for key, value in (("uid", m.uid), ("gid", m.gid)):
                if 0 <= value < 8**7:
                    setattr(info, key, value)
                else:
                    pax[key] = str(value)
            if math.isfinite(m.mtime) and 0 <= m.mtime < 8**11:
                info.mtime = m.mtime
            else:
                pax["mtime"] = str(m.mtime)
            info.linkname = m.target.replace(SENTINEL, str(sentinel))
            for key, raw in m.xattrs.items():
                pax[f"SCHILY.xattr.{key}"] = raw.decode("utf-8", "surrogateescape")
            info.pax_headers = pax
            if m.kind == tarfile.REGTYPE:
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        return c.compress(data) + c.flush()
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        return {
            n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)
        }
    except OSError:
        return {}


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    stack = [root]
    while stack:
        p = stack.pop()
        s = p.lstat()
        extra: Any = None
        if stat.S_ISDIR(s.st_mode):
            extra = sorted(os.listdir(p))
            stack.extend(p / c for c in extra)
        elif stat.S_ISREG(s.st_mode):
            extra = p.read_bytes()
        elif stat.S_ISLNK(s.st_mode):
            extra = os.readlink(p)
        out[str(p.relative_to(root))] = (
            s.st_mode,
            s.st_uid,
            s.st_gid,
            s.st_nlink,
            s.st_mtime_ns,
            extra,
            _xattrs(p),
        )
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def world() -> Iterator[tuple[Path, Path]]:
    """<tmp>/tree (what is unpacked into) next to <tmp>/sentinel (what hostile entries aim at)."""
    top = Path(
        tempfile.mkdtemp(prefix="bencher-runner-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    try:
        tree, sentinel = top / "tree", top / "sentinel"
        tree.mkdir()
        (sentinel / "victim" / "deep").mkdir(parents=True)
        (sentinel / "file").write_text("precious")
        (sentinel / "victim" / "deep" / "keep").write_text("precious too")
        os.mkfifo(sentinel / "pipe")
        (sentinel / "link").symlink_to("/etc/passwd")
        before, listing, rss = snapshot(sentinel), sorted(os.listdir(top)), _rss()
        yield tree, sentinel
        assert snapshot(sentinel) == before, "the sentinel next to the tree changed"
        assert sorted(os.listdir(top)) == listing, "something was created next to the tree"
        assert _rss() - rss < 256 * 2**20, "memory grew by more than 256 MiB in one example"
    finally:
        shutil.rmtree(top)


def check_error(err: BaseException) -> None:
    assert isinstance(err, RunnerError), f"{type(err).__name__} escaped: {err!r}"
    text = str(err)
    text.encode("utf-8")
    assert text and len(text.splitlines()) == 1 and "\n" not in text, text


def tree_usage(tree: Path) -> tuple[int, int]:
    size = inodes = 0
    for p in tree.rglob("*"):
        s = p.lstat()
        inodes += 1
        if stat.S_ISREG(s.st_mode):
            size += s.st_size
    return size, inodes


def unpack(blobs: list[bytes], tree: Path) -> None:
    budget = ByteBudget(LIMIT_BYTES, inode_limit=LIMIT_INODES, disk_mib=1)
    try:
        for i, blob in enumerate(blobs, 1):
            unpack_layer_stream(
                io.BytesIO(blob),
                "application/vnd.oci.image.layer.v1.tar",
                tree,
                name=f"layer {i}",
                budget=budget,
            )
    except BaseException as err:  # which ones may escape is the point
        check_error(err)
        event(f"refused: {type(err).__name__}: {str(err).split(':')[-1].split(';')[0].strip()[:40]}")
    else:
        event("unpacked")
    size, inodes = tree_usage(tree)
    assert size <= LIMIT_BYTES and inodes <= LIMIT_INODES + 8, (size, inodes)


def probe(tree: Path, paths: list[str]) -> None:
    """What the job does next with the tree: never blocks, never leaves it, only RunnerErrors."""
    for path in paths:
        for call in (read_image_file, resolve_in_tree, ensure_directory):
            try:
                found = call(tree, path)
            except BaseException as err:
                check_error(err)
                continue
            if isinstance(found, Path):
                assert found == tree or tree in found.parents, found


LAYER = st.builds(
    lambda a, b, c, d: a + b + c + d,
    st.lists(BENIGN, max_size=8),
    planted() | st.just([]),
    st.lists(BENIGN, max_size=8),
    st.lists(NASTY, max_size=1) | st.just([]),
)


@FUZZ
@given(
    layers=st.lists(LAYER, min_size=1, max_size=3),
    compression=st.sampled_from(["none", "gzip", "zstd"]),
    probes=st.lists(NAMES, max_size=3),
)
def test_random_layers_stay_inside_the_tree(
    layers: list[list[Member]], compression: str, probes: list[str]
) -> None:
    t0 = time.monotonic()
    with world() as (tree, sentinel):
        unpack([compress(tar_bytes(layer, sentinel), compression) for layer in layers], tree)
        probe(tree, ["/etc/passwd", *probes])
    assert time.monotonic() - t0 < 10


@FUZZ
@given(
    entries=st.lists(BENIGN | NASTY, min_size=1, max_size=8),
    compression=st.sampled_from(["none", "gzip", "zstd"]),
    cut=st.integers(0, 4096),
    flips=st.lists(st.tuples(st.integers(0, 8191), st.integers(1, 255)), max_size=8),
    raw=st.binary(max_size=2048),
    use_raw=st.booleans(),
)
def test_mutated_and_random_bytes_fail_cleanly(
    entries: list[Member], compression: str, cut: int, flips: list[tuple[int, int]], raw: bytes, use_raw: bool
) -> None:
    with world() as (tree, sentinel):
        if use_raw:
            blob = {"none": raw, "gzip": b"\x1f\x8b" + raw, "zstd": b"\x28\xb5\x2f\xfd" + raw}[compression]
        else:
            data = bytearray(compress(tar_bytes(entries, sentinel), compression))
            for at, xor in flips:
                if data:
                    data[at % len(data)] ^= xor
            blob = bytes(data[: max(0, len(data) - cut)] if cut < len(data) else data)
        unpack([blob], tree)
