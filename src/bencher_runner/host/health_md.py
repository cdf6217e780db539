"""md RAID arrays as the kernel shows them in `/sys/block/md*/md/`, for the host health probe.

A benchmark during a RAID check, resync, rebuild or reshape measures the array's background I/O (and
its CPU time), so an array with a sync in progress is a reason to pause claiming. The kernel's own
files are read (no `mdadm`, no `/proc/mdstat` parsing): `array_state`, `degraded`, `sync_action`,
`sync_completed` ("done / total" sectors, "none" or "delayed") and `sync_speed` (KiB/s or "none").
A level without redundancy (raid0, linear) has no `sync_action` or `degraded` file: it never syncs.
"""

from dataclasses import dataclass
from pathlib import Path

# `sync_action` values that mean the array reads (and maybe writes) its disks in the background.
SYNC_ACTIONS = frozenset({"resync", "recover", "check", "repair", "reshape"})
# Array states in which md does not run a resync (a pending one starts on the first write).
READ_ONLY_STATES = frozenset({"readonly", "read-auto"})


@dataclass(frozen=True)
class MdArray:
    """One md array. ``action`` is the kernel's `sync_action` ("idle" when the level has none)."""

    name: str
    array_state: str
    level: str = ""
    degraded: int = 0
    raid_disks: int | None = None
    action: str = "idle"
    done: int | None = None  # sectors, from sync_completed
    total: int | None = None
    speed: int | None = None  # KiB/s, from sync_speed
    delayed: bool = False  # sync_completed says "delayed": waits for another array on the same disks

    @property
    def syncing(self) -> bool:
        """A sync that runs (or is about to): the pause condition.

        A resync that md holds back because the array is read-only is not running, and would hold
        the host paused until someone writes to the array, so it is not a pause.
        """
        if self.action not in SYNC_ACTIONS:
            return False
        running = self.done is not None or self.delayed
        return running or self.array_state not in READ_ONLY_STATES

    @property
    def progress(self) -> str:
        if self.done is not None and self.total:
            return f"{100 * self.done / self.total:.1f}% ({self.done} / {self.total} sectors)"
        return "delayed" if self.delayed else "progress unknown"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:  # the array went away, or the level has no such file
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def _sync_completed(text: str | None) -> tuple[int | None, int | None, bool]:
    """ "123 / 456" -> (123, 456, False); "delayed" -> (None, None, True); "none"/other -> Nones."""
    if text is None:
        return None, None, False
    if text == "delayed":
        return None, None, True
    done, sep, total = text.partition("/")
    if not sep:
        return None, None, False
    return _int(done.strip()), _int(total.strip()), False


def read_array(block: Path) -> MdArray | None:
    """The array at ``block`` (`/sys/block/mdN`), or None when it is not an assembled array."""
    md = block / "md"
    state = _read(md / "array_state")
    if state is None or state == "clear":  # a device node with no array behind it
        return None
    done, total, delayed = _sync_completed(_read(md / "sync_completed"))
    return MdArray(
        name=block.name,
        array_state=state,
        level=_read(md / "level") or "",
        degraded=_int(_read(md / "degraded")) or 0,
        raid_disks=_int(_read(md / "raid_disks")),
        action=_read(md / "sync_action") or "idle",
        done=done,
        total=total,
        speed=_int(_read(md / "sync_speed")),
        delayed=delayed,
    )


def read_arrays(sys: Path) -> tuple[MdArray, ...]:
    """Every assembled md array under ``sys`` (`/sys`), sorted by name."""
    block = sys / "block"
    try:
        entries = sorted(p for p in block.iterdir() if p.name.startswith("md"))
    except OSError:
        return ()
    arrays = (read_array(entry) for entry in entries)
    return tuple(a for a in arrays if a is not None)
