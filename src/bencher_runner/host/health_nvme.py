"""NVMe controllers and their SMART / health log, for the host health probe.

Controllers come from `/sys/class/nvme/nvme*/` (model and serial from its files). The health log
(log page 0x02) is read with the NVMe admin Get Log Page command through the kernel's
`NVME_IOCTL_ADMIN_CMD` ioctl on `/dev/nvmeN`, which needs root (CAP_SYS_ADMIN) but no package:
nvme-cli's `nvme smart-log` sends the same command. When the ioctl is not permitted or not supported
the reader raises `SmartLogError` with a one-line reason and the fix, and the probe reports the log
as unreadable instead of guessing. The reader is a plain function `(device path) -> 512 bytes`, so
tests feed recorded pages. The page layout is the NVMe base specification's (figure "SMART / Health
Information Log Page"): byte 0 critical warning, 1-2 composite temperature (kelvin), 3 available
spare (%), 4 available spare threshold (%), 5 percentage used, 160-175 media and data integrity
errors (u128, little endian).
"""

import errno
import fcntl
import os
import struct
from collections.abc import Callable
from ctypes import addressof, create_string_buffer
from dataclasses import dataclass
from pathlib import Path

LOG_PAGE_SIZE = 512
SMART_LOG_ID = 0x02
ADMIN_GET_LOG_PAGE = 0x02
NSID_ALL = 0xFFFFFFFF
# struct nvme_passthru_cmd (linux/nvme_ioctl.h): 72 bytes, no padding in this field order.
_PASSTHRU = struct.Struct("<BBHIIIQQIIIIIIIIII")
# _IOWR('N', 0x41, struct nvme_admin_cmd)
NVME_IOCTL_ADMIN_CMD = (3 << 30) | (_PASSTHRU.size << 16) | (ord("N") << 8) | 0x41

# Critical warning bits (byte 0), named as in the NVMe base specification.
CRITICAL_WARNING_BITS = (
    (0x01, "available spare below threshold"),
    (0x02, "temperature outside its thresholds"),
    (0x04, "reliability degraded by media or internal errors"),
    (0x08, "media placed in read-only mode"),
    (0x10, "volatile memory backup failed"),
    (0x20, "persistent memory region read-only"),
)
TEMPERATURE_BIT = 0x02


class SmartLogError(Exception):
    """The health log could not be read; the message says why and what to do."""


@dataclass(frozen=True)
class SmartLog:
    critical_warning: int
    temperature: int  # kelvin; 0 when the controller does not report it
    available_spare: int
    available_spare_threshold: int
    percentage_used: int
    media_errors: int

    @classmethod
    def parse(cls, page: bytes) -> "SmartLog":
        if len(page) < LOG_PAGE_SIZE:
            raise SmartLogError(f"the health log is {len(page)} bytes, expected {LOG_PAGE_SIZE}")
        warning, temperature, spare, threshold, used = struct.unpack_from("<BHBBB", page, 0)
        low, high = struct.unpack_from("<QQ", page, 160)
        return cls(warning, temperature, spare, threshold, used, low | high << 64)

    @property
    def warnings(self) -> list[str]:
        return [text for bit, text in CRITICAL_WARNING_BITS if self.critical_warning & bit]

    @property
    def celsius(self) -> int | None:
        return self.temperature - 273 if self.temperature else None


@dataclass(frozen=True)
class NvmeController:
    name: str  # nvme0
    model: str | None
    serial: str | None


SmartReader = Callable[[Path], bytes]


def read_smart_log_ioctl(device: Path) -> bytes:
    """The 512-byte health log of the controller at ``device`` (`/dev/nvmeN`), via Get Log Page."""
    buffer = create_string_buffer(LOG_PAGE_SIZE)
    numd = LOG_PAGE_SIZE // 4 - 1  # dwords, zero-based
    command = bytearray(
        _PASSTHRU.pack(
            ADMIN_GET_LOG_PAGE, 0, 0, NSID_ALL, 0, 0, 0, addressof(buffer), 0, LOG_PAGE_SIZE,
            SMART_LOG_ID | (numd & 0xFFFF) << 16, numd >> 16, 0, 0, 0, 0, 0, 0,
        )
    )  # fmt: skip
    try:
        fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise SmartLogError(f"cannot open {device}: {err.strerror}; run the runner as root") from err
    try:
        status = fcntl.ioctl(fd, NVME_IOCTL_ADMIN_CMD, command, True)
    except OSError as err:
        if err.errno in (errno.EPERM, errno.EACCES):
            fix = "the NVMe admin ioctl needs CAP_SYS_ADMIN: run the runner as root"
        elif err.errno in (errno.ENOTTY, errno.EINVAL):
            fix = f"{device} is not an NVMe controller device"
        else:
            fix = "check the device with `nvme smart-log` (nvme-cli)"
        raise SmartLogError(f"Get Log Page on {device} failed: {err.strerror}; {fix}") from err
    finally:
        os.close(fd)
    if status != 0:
        raise SmartLogError(f"Get Log Page on {device} returned NVMe status {status:#x}")
    return buffer.raw


def _attr(path: Path) -> str | None:
    try:
        value = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return value or None


def _is_controller(name: str) -> bool:
    return name.startswith("nvme") and name[4:].isdigit()


def list_controllers(sys: Path) -> tuple[NvmeController, ...]:
    """NVMe controllers under ``sys`` (`/sys/class/nvme/nvmeN`), sorted by number."""
    try:
        entries = [p for p in (sys / "class/nvme").iterdir() if _is_controller(p.name)]
    except OSError:
        return ()
    entries.sort(key=lambda p: int(p.name[4:]))
    return tuple(NvmeController(p.name, _attr(p / "model"), _attr(p / "serial")) for p in entries)
