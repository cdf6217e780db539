"""Incremental root disks: an image whose lower layers were prepared before costs only its new layers.

A benchmark CI run builds a new image per commit: a new manifest digest, so the template cache
(rootfs.py) misses, but usually the same lower layers with one small changed layer on top. This
module keeps, per chain of lower layers, the ext4 disk those layers make (a *chain base*), and builds
a new image's disk from the longest cached chain that is a prefix of its own: a copy of the base's
data extents, the new layers applied onto it with the same hardened unpacker, and the same disk
budget, as a full unpack.

Key: OCI's ChainID construction over the layers' *blob* digests (``chain_1 = digest_1``, ``chain_n =
sha256(chain_{n-1} + " " + digest_n)``), not over the config's diff_ids. The blob digests are what
the runner verified; a diff_id is the config's unverified claim about the uncompressed stream, and a
hostile image claiming a popular base's diff_ids must never be able to plant its own tree under
them. Equal blob chains are byte-equal layer streams, so the key is exact. The disk size (the ext4
geometry and the unpack budget) and the unpack/mkfs version are part of the key.

Mechanism, chosen by measurement here (realistic image: 116 MiB gzip layer, 261 MiB unpacked; plus
a layer adding 1 MiB; 1024 MiB disk; 2 loaded cores; medians of 3-5):

- full cold build (unpack into tmpfs + ``mkfs.ext4 -d``): 4.47 s.
- (a) a cached unpacked tree per chain: ``cp -a`` (no reflink on this ext4) to tmpfs, the new layer
  on top, ``mkfs.ext4 -d``: 1.86 s (0.65 s of it the copy; mkfs of the whole tree stays the floor).
- (b) a cached ext4 per chain, copied (copy_file_range of its 309 MiB of data extents), loop-mounted,
  the new layer unpacked into the mount, unmounted: 0.39 s with ``mount -o loop``. Of that, 0.15 s
  is the loop driver writing the copy's dirty pages back: LOOP_CONFIGURE and every flush request
  (ext4 sends them at mount) fsync the backing file. Attaching the loop device to the still *empty*
  file, copying afterwards, then LOOP_SET_CAPACITY, and mounting with ``barrier=0`` (nothing to
  flush for: a crash loses the job's work directory anyway): 0.19 s (copy 0.165, mount 0.004,
  unpack 0.011, umount 0.006). A sparse copy of the base for the new template stays the floor.
  ``debugfs`` could write into the image without a mount, but only through a second, hand-written
  implementation of whiteouts, hard links, xattrs and the path checks; the loop mount lets the one
  hardened unpacker (dir fds, no symlink followed, the disk budget) do it.

So (b). The mount lives in a private mount namespace of one short-lived thread (unshare(CLONE_NEWNS)
is per thread; "/" made private so nothing propagates back): no other process sees it, nothing
under the work directory is a mount point for cleanup to trip over, and if the runner dies the
namespace, the mount and (LO_FLAGS_AUTOCLEAR) the loop device go with it. It is mounted nosuid,
nodev, noexec. The base disk was built by this runner from a tree (never touched by a guest: jobs
get copies), so the host kernel only ever mounts ext4 images that mkfs.ext4 made. When the host
cannot do it (not root, no loop devices, no namespaces), or the disk fills up during the apply, the
job builds the disk in full instead, which gives the same errors a cold job gives.

Which chains get a base: every disk built whose WorkingDir already existed is a base for its own
full chain (a hard link to the template: no space of its own). A cold build of an image with
several layers whose top layer is small (<= TOP_LAYER_SHARE of the compressed size) first makes a
base of the layers below it (mkfs of those), then applies the top layer: the next commit, which
changes only the top layer, is incremental. The bases are bounded: at most MAX_CHAINS entries and
MAX_CHAIN_BYTES of allocated disk, least recently used first, never one used in the last
RECENT_USE_S (a job may be copying it); `runner cache prune` covers them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from bencher_runner.oci.layout import LayerRef
from bencher_runner.oci.unpack import (
    ByteBudget,
    UnpackStats,
    ensure_directory,
    read_image_file,
    resolve_in_tree,
    unpack_layers,
)
from bencher_runner.rootfs import RECENT_USE_S, TEMPLATE_VERSION, copy_extents
from bencher_runner.spec.errors import ImageError, RootfsError

CHAIN_VERSION = 1
MAX_CHAINS = 16
MAX_CHAIN_BYTES = 4 * 2**30  # allocated bytes of the bases (a base shared with a template counts here)
TOP_LAYER_SHARE = 0.25  # a cold build bases the layers below a top layer this small (of compressed)

# linux/loop.h, linux/mount.h, linux/sched.h
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_NOATIME = 2, 4, 8, 1024
MS_REC, MS_PRIVATE = 16384, 1 << 18
MNT_DETACH = 2
MOUNT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME
MOUNT_DATA = b"barrier=0"  # no flush requests: each would fsync the whole backing file


class IncrementalUnavailable(RootfsError):
    """This host cannot apply layers onto a cached disk; the job builds the disk in full instead."""


def chain_ids(layers: Sequence[LayerRef]) -> list[str]:
    """The chain id of every prefix of ``layers``: ``[chain(l1), chain(l1, l2), ...]``."""
    ids: list[str] = []
    for layer in layers:
        if not ids:
            ids.append(layer.digest)
        else:
            ids.append("sha256:" + hashlib.sha256(f"{ids[-1]} {layer.digest}".encode()).hexdigest())
    return ids


def base_depth(layers: Sequence[LayerRef]) -> int:
    """How many lower layers a cold build turns into a base before applying the rest: all of them,
    or all but a top layer that is small next to the image (the one a new commit usually changes)."""
    total = sum(layer.size for layer in layers)
    if len(layers) >= 2 and layers[-1].size <= TOP_LAYER_SHARE * total:
        return len(layers) - 1
    return len(layers)


def incremental_supported() -> str | None:
    """None when this process may loop-mount disks (root, /dev/loop-control); else why not."""
    if os.geteuid() != 0:
        return "the runner is not root"
    if not os.path.exists("/dev/loop-control"):
        return "the host has no loop devices (/dev/loop-control)"
    return None


# --- the cache of chain bases --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainBase:
    """A cached disk holding the tree of an image's first ``depth`` layers, and the unpack budget's
    state after them (what a full unpack would have charged by then)."""

    chain_id: str
    depth: int
    disk_mib: int
    disk: Path
    used_bytes: int
    used_inodes: int
    skipped_devices: tuple[str, ...] = ()
    top_layer: str = ""
    last_used: datetime = field(default_factory=lambda: datetime.now(tz=UTC))
    allocated: int = 0


@dataclass(frozen=True)
class ChainPrune:
    removed: tuple[ChainBase, ...]
    freed_bytes: int
    kept_bytes: int
    kept_count: int


def chain_cache_dir(cache: Path) -> Path:
    return cache / "chains"


class ChainCache:
    def __init__(self, cache: Path) -> None:
        self.root = chain_cache_dir(cache)

    @staticmethod
    def name(chain_id: str, disk_mib: int) -> str:
        algorithm, _, hexpart = chain_id.partition(":")
        return f"{algorithm}-{hexpart}-{disk_mib}M-v{TEMPLATE_VERSION}.{CHAIN_VERSION}"

    def get(self, chain_id: str, disk_mib: int, *, touch: bool = True) -> ChainBase | None:
        name = self.name(chain_id, disk_mib)
        base = self._read(self.root / f"{name}.json")
        if base is None or base.chain_id != chain_id or base.disk_mib != disk_mib:
            return None
        if touch:
            with contextlib.suppress(OSError):
                os.utime(self.root / f"{name}.json")  # LRU by the metadata: the disk may be a template's link
        return base

    def longest(self, layers: Sequence[LayerRef], disk_mib: int) -> ChainBase | None:
        """The cached base of the longest prefix of ``layers`` (at most all of them), touched."""
        ids = chain_ids(layers)
        for depth in range(len(ids), 0, -1):
            base = self.get(ids[depth - 1], disk_mib)
            if base is not None and base.depth == depth:
                return base
        return None

    def put(
        self,
        layers: Sequence[LayerRef],
        disk_mib: int,
        disk: Path,
        *,
        link: bool,
        used_bytes: int,
        used_inodes: int,
        skipped_devices: Sequence[str] = (),
    ) -> ChainBase | None:
        """Cache ``disk`` (sparse, never to be written again) as the base of ``layers``: moved into
        the cache, or with ``link`` hard-linked (it stays a template too). The metadata lands last,
        so a reader sees a base only when it is whole. None when it could not be stored (the job goes
        on without it); an existing base is kept."""
        if not layers:
            return None
        chain_id = chain_ids(layers)[-1]
        name = self.name(chain_id, disk_mib)
        final, meta = self.root / f"{name}.ext4", self.root / f"{name}.json"
        existing = self.get(chain_id, disk_mib)
        if existing is not None:
            return existing
        tmp_disk = self.root / f".{name}.{os.getpid()}.{threading.get_native_id()}.ext4"
        tmp_meta = tmp_disk.with_suffix(".json")
        doc = {
            "chain_id": chain_id,
            "depth": len(layers),
            "disk_mib": disk_mib,
            "used_bytes": used_bytes,
            "used_inodes": used_inodes,
            "skipped_devices": list(skipped_devices),
            "top_layer": layers[-1].digest,
        }
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if link:
                os.link(disk, tmp_disk)
            else:
                os.replace(disk, tmp_disk)
            tmp_meta.write_text(json.dumps(doc))
            os.replace(tmp_disk, final)
            os.replace(tmp_meta, meta)
        except OSError:
            tmp_disk.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
            return None
        self.prune()
        return self.get(chain_id, disk_mib, touch=False)

    def _read(self, meta: Path) -> ChainBase | None:
        try:
            doc = json.loads(meta.read_text())
            disk = meta.with_suffix(".ext4")
            st = os.lstat(disk)
            last_used = os.stat(meta).st_mtime
            if not stat.S_ISREG(st.st_mode):
                return None
            return ChainBase(
                chain_id=str(doc["chain_id"]),
                depth=int(doc["depth"]),
                disk_mib=int(doc["disk_mib"]),
                disk=disk,
                used_bytes=int(doc["used_bytes"]),
                used_inodes=int(doc["used_inodes"]),
                skipped_devices=tuple(str(d) for d in doc.get("skipped_devices", ())),
                top_layer=str(doc.get("top_layer", "")),
                last_used=datetime.fromtimestamp(last_used, tz=UTC),
                allocated=st.st_blocks * 512,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def entries(self) -> list[ChainBase]:
        """Every cached base, least recently used first."""
        if not self.root.is_dir():
            return []
        found = [self._read(meta) for meta in self.root.glob("*.json") if not meta.name.startswith(".")]
        return sorted((b for b in found if b is not None), key=lambda b: (b.last_used, b.chain_id))

    def prune(
        self,
        max_bytes: int | None = MAX_CHAIN_BYTES,
        max_count: int | None = MAX_CHAINS,
        *,
        min_age: float = RECENT_USE_S,
    ) -> ChainPrune:
        """Remove the least recently used bases until at most ``max_bytes`` (allocated) and
        ``max_count`` remain (None: no bound; both None: remove every one not used in ``min_age`` s).
        A base used in the last ``min_age`` seconds is kept (a job may be copying it), as are the
        leftovers of crashed writers younger than an hour."""
        self._remove_stale_temps()
        entries = self.entries()
        total, count = sum(b.allocated for b in entries), len(entries)
        everything = max_bytes is None and max_count is None
        removed: list[ChainBase] = []
        now = time.time()
        for base in entries:
            within = (max_bytes is None or total <= max_bytes) and (max_count is None or count <= max_count)
            if within and not everything:
                break
            if now - base.last_used.timestamp() < min_age:
                continue
            base.disk.with_suffix(".json").unlink(missing_ok=True)  # first: no reader takes it from now on
            base.disk.unlink(missing_ok=True)
            removed.append(base)
            total -= base.allocated
            count -= 1
        return ChainPrune(tuple(removed), sum(b.allocated for b in removed), total, count)

    def _remove_stale_temps(self) -> None:
        if not self.root.is_dir():
            return
        cutoff = time.time() - 3600
        for path in self.root.glob(".*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()


# --- applying layers onto a copy of a base ----------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """What :func:`apply_layers` made: the unpack stats of the new layers, the image's passwd and group,
    and whether the disk holds exactly the layers' tree (its WorkingDir existed: a base for the chain)."""

    stats: UnpackStats
    passwd: str | None
    group: str | None
    pristine: bool


def apply_layers(
    base: Path,
    dest: Path,
    mount_point: Path,
    layers: Sequence[LayerRef],
    *,
    budget: ByteBudget,
    first: int,
    total: int,
    working_dir: str,
) -> Applied:
    """Write ``dest``: a sparse copy of the disk ``base`` with ``layers`` (numbers ``first``.. of
    ``total``) unpacked onto it and ``working_dir`` created, exactly as a full unpack would have done
    after the base's layers (``budget`` carries on from the base's state).

    ImageError: the layers are bad (the full path says the same). IncrementalUnavailable: this host
    cannot do it, or the disk filled up (the full path gives the canonical error). ``dest`` is
    removed on any failure. ``mount_point``: an empty directory (the mount is seen by nobody else).
    """
    try:
        return in_private_mounts(
            lambda: _apply(base, dest, mount_point, layers, budget, first, total, working_dir)
        )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


_T = TypeVar("_T")


def in_private_mounts(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in a new thread with a mount namespace of its own (made private: nothing it mounts
    propagates anywhere); the namespace, and any mount left in it, ends with the thread."""
    out: list[_T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNS) != 0:
                raise _unavailable("unshare(CLONE_NEWNS)", ctypes.get_errno())
            if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                raise _unavailable("making / private in the new mount namespace", ctypes.get_errno())
            out.append(fn())
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    thread = threading.Thread(target=body, name="rootfs-incremental")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return out[0]


def _unavailable(what: str, err: int) -> IncrementalUnavailable:
    return IncrementalUnavailable(f"{what} failed: {os.strerror(err)}")


def _apply(
    base: Path,
    dest: Path,
    mount_point: Path,
    layers: Sequence[LayerRef],
    budget: ByteBudget,
    first: int,
    total: int,
    working_dir: str,
) -> Applied:
    libc = ctypes.CDLL(None, use_errno=True)
    target = os.fsencode(os.path.abspath(mount_point))
    _mount_copy(libc, base, dest, target)
    try:
        stats = unpack_layers(layers, mount_point, budget=budget, first=first, total=total)
        pristine = has_dir(mount_point, working_dir)
        ensure_directory(mount_point, working_dir)
        passwd = read_image_file(mount_point, "etc/passwd")
        group = read_image_file(mount_point, "etc/group")
    except ImageError as err:
        libc.umount2(target, MNT_DETACH)
        if _out_of_space(err):
            raise IncrementalUnavailable(
                f"the disk filled up while the new layers were applied: {err}"
            ) from None
        raise
    except BaseException:
        libc.umount2(target, MNT_DETACH)
        raise
    if libc.umount2(target, 0) != 0:  # writes everything back into dest
        code = ctypes.get_errno()
        libc.umount2(target, MNT_DETACH)
        raise _unavailable(f"unmounting the new root disk {dest}", code)
    return Applied(stats, passwd, group, pristine)


def _mount_copy(libc: ctypes.CDLL, base: Path, dest: Path, target: bytes) -> None:
    """Create ``dest`` as a copy of ``base`` and mount it at ``target``. The loop device is attached
    while ``dest`` is still empty and the data copied afterwards: attached to a file with dirty pages,
    LOOP_CONFIGURE would write them all back first (0.15 s for the realistic image)."""
    try:
        fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise IncrementalUnavailable(f"cannot create {dest}: {err.strerror}") from None
    try:
        dev, number = _attach_loop(fd, dest)
        try:
            try:
                with base.open("rb") as src:
                    size = os.fstat(src.fileno()).st_size
                    copy_extents(src.fileno(), fd, size)
                os.ftruncate(fd, size)
                fcntl.ioctl(dev, LOOP_SET_CAPACITY)
            except OSError as err:
                raise IncrementalUnavailable(f"cannot copy the cached disk {base}: {err.strerror}") from None
            source = f"/dev/loop{number}".encode()
            if libc.mount(source, target, b"ext4", MOUNT_FLAGS, MOUNT_DATA) != 0:
                raise _unavailable(f"mounting {dest} (/dev/loop{number})", ctypes.get_errno())
        finally:
            os.close(dev)  # the mount holds the device now; AUTOCLEAR detaches it at unmount
    finally:
        os.close(fd)


def _loop_config(fd: int, name: str) -> bytes:
    """struct loop_config: fd, block_size, struct loop_info64 (lo_flags and lo_file_name set), reserved."""
    file_name = os.fsencode(name)[-63:]
    info = struct.pack(
        "=5Q4I64s64s32s2Q", 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR, file_name, b"", b"", 0, 0
    )
    return struct.pack("=II", fd, 0) + info + bytes(64)


def _attach_loop(fd: int, dest: Path) -> tuple[int, int]:
    """A free loop device attached to ``fd`` (autoclear): (its fd, its number)."""
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise IncrementalUnavailable(f"no loop devices: /dev/loop-control: {err.strerror}") from None
    try:
        for _ in range(32):  # another process may take the free device first: EBUSY, ask again
            try:
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                dev = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
            except OSError as err:
                raise IncrementalUnavailable(f"no free loop device: {err.strerror}") from None
            try:
                fcntl.ioctl(dev, LOOP_CONFIGURE, _loop_config(fd, str(dest)))
                return dev, number
            except OSError as err:
                os.close(dev)
                if err.errno != errno.EBUSY:
                    raise IncrementalUnavailable(f"LOOP_CONFIGURE failed: {err.strerror}") from None
        raise IncrementalUnavailable("every free loop device was taken by another process")
    finally:
        os.close(ctl)


def has_dir(tree: Path, path: str) -> bool:
    """``path`` (absolute in the image, resolved inside ``tree``) is a directory already: creating the
    WorkingDir there changes nothing."""
    try:
        found = resolve_in_tree(tree, path)
    except ImageError:
        return False
    return found is not None and stat.S_ISDIR(os.lstat(found).st_mode)


def _out_of_space(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
