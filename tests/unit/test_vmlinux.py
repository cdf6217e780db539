"""extract_vmlinux: synthetic bzImage-like blobs for every compressor, and the real bundle kernel."""

import bz2
import ctypes
import ctypes.util
import gzip
import lzma
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bencher_runner.sandbox.vmlinux import (
    XEN_ELFNOTE_PHYS32_ENTRY,
    decompress_vmlinux,
    elf_problem,
    extract_vmlinux,
)
from bencher_runner.spec.errors import KernelBundleError

REAL_KERNEL = Path.home() / ".cache" / "bencher-runner" / "kernel" / "vmlinuz"


def fake_elf(*, machine: int = 62, pvh: bool = True, entry: int = 0x1000000, size: int = 96 * 1024) -> bytes:
    """A minimal ELF64 kernel: a PT_LOAD over the whole file and a PT_NOTE with Xen's PVH entry note."""
    note_type = XEN_ELFNOTE_PHYS32_ENTRY if pvh else 17
    note = struct.pack("<III", 4, 8, note_type) + b"Xen\0" + struct.pack("<Q", 0x1000040)
    phoff, phnum = 64, 2
    note_off = phoff + 56 * phnum
    body_len = size - note_off - len(note)
    rng = random.Random(7)
    body = bytes(rng.choice(b"kernel text \x00\x90\xc3") for _ in range(body_len))  # compressible
    header = (
        b"\x7fELF"
        + bytes([2, 1, 1, 0])
        + bytes(8)
        + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    )
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x1000000, 0x1000000, size, size, 0x1000)
    pt_note = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    blob = header + load + pt_note + note + body
    assert len(blob) == size
    return blob


def _lz4_lib() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("lz4")
    if not name:
        return None
    lib = ctypes.CDLL(name)
    lib.LZ4_compress_default.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.LZ4_compress_default.restype = ctypes.c_int
    return lib


def lz4_legacy(data: bytes, block: int = 32 * 1024) -> bytes:
    """An LZ4 legacy frame (as `lz4 -l`), with small blocks so several are exercised."""
    lib = _lz4_lib()
    if lib is None:
        pytest.skip("liblz4 is not installed: cannot build an LZ4 test payload")
    out = bytearray(b"\x02\x21\x4c\x18")
    for start in range(0, len(data), block):
        chunk = data[start : start + block]
        dst = ctypes.create_string_buffer(len(chunk) * 2 + 64)
        n = lib.LZ4_compress_default(chunk, dst, len(chunk), len(dst))
        assert n > 0
        out += struct.pack("<I", n) + dst.raw[:n]
    return bytes(out)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, 9),
    "xz": lambda d: lzma.compress(d, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "bzip2": lambda d: bz2.compress(d, 9),
    "lzma": lambda d: lzma.compress(d, lzma.FORMAT_ALONE),
    "zstd": lambda d: zstandard.ZstdCompressor(level=19).compress(d),
    "lz4": lz4_legacy,
}


def bzimage(payload: bytes, uncompressed_len: int) -> bytes:
    """Setup code, decoy magics, the payload, the appended size, then more code (like a bzImage)."""
    junk = b"MZ\x00\x00HdrS" + bytes(range(256)) * 8
    decoys = (
        b"\x1f\x8b\x08\x00bogus" + b"\xfd7zXZ\x00broken" + b"\x28\xb5\x2f\xfd??" + b"\x02\x21\x4c\x18\xff\xff"
    )
    return junk + decoys + payload + struct.pack("<I", uncompressed_len) + b"\xcc" * 4096


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_each_compressor(name: str, tmp_path: Path) -> None:
    elf = fake_elf()
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(COMPRESSORS[name](elf), len(elf)))
    out = extract_vmlinux(image, tmp_path / "cache" / "vmlinux")
    assert out.read_bytes() == elf


def test_result_is_cached_until_the_source_changes(tmp_path: Path) -> None:
    elf = fake_elf()
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(gzip.compress(elf), len(elf)))
    dest = tmp_path / "vmlinux"
    extract_vmlinux(image, dest)
    first = dest.stat().st_ino
    extract_vmlinux(image, dest)
    assert dest.stat().st_ino == first  # reused, not rewritten
    other = fake_elf(entry=0x2000000)
    image.write_bytes(bzimage(gzip.compress(other), len(other)))
    os.utime(image, ns=(1, 1))
    assert extract_vmlinux(image, dest).read_bytes() == other


def test_elf_input_is_taken_as_is() -> None:
    elf = fake_elf()
    assert decompress_vmlinux(elf) == elf


def test_no_pvh_note_is_refused() -> None:
    elf = fake_elf(pvh=False)
    assert "PVH" in (elf_problem(elf) or "")
    assert elf_problem(elf, require_pvh=False) is None
    with pytest.raises(KernelBundleError, match="CONFIG_PVH"):
        decompress_vmlinux(bzimage(gzip.compress(elf), len(elf)))


def test_wrong_machine_is_refused() -> None:
    elf = fake_elf(machine=183)  # aarch64
    assert "x86-64" in (elf_problem(elf) or "")
    with pytest.raises(KernelBundleError, match="x86-64"):
        decompress_vmlinux(bzimage(zstandard.ZstdCompressor().compress(elf), len(elf)))


def test_truncated_payload_is_refused() -> None:
    elf = fake_elf()
    assert "truncated" in (elf_problem(elf[: len(elf) // 2]) or "")


def test_no_payload() -> None:
    with pytest.raises(KernelBundleError, match="no compressed kernel found"):
        decompress_vmlinux(b"MZ" + bytes(10000))


def test_non_elf_payload_is_skipped() -> None:
    elf = fake_elf()
    image = bzimage(gzip.compress(b"not a kernel" * 100), 1200) + bzimage(lzma.compress(elf), len(elf))
    assert decompress_vmlinux(image) == elf


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(KernelBundleError, match="cannot be read"):
        extract_vmlinux(tmp_path / "nope", tmp_path / "vmlinux")


@pytest.mark.skipif(not REAL_KERNEL.is_file(), reason=f"{REAL_KERNEL} is absent (run `make setup`)")
def test_real_bundle_kernel(tmp_path: Path) -> None:
    out = extract_vmlinux(REAL_KERNEL, tmp_path / "vmlinux")
    data = out.read_bytes()
    assert elf_problem(data) is None  # x86-64, entry point, PVH note, complete segments
    assert len(data) > REAL_KERNEL.stat().st_size
    assert b"Linux version" in data


def test_qemu_boots_the_bundles_vmlinux_but_a_given_kernel_as_it_is(tmp_path: Path) -> None:
    """The fetched bundle's kernel is booted uncompressed (no decompression at each boot); a kernel
    given with --kernel is booted as given, and nothing is written next to it."""
    import threading

    from bencher_runner.sandbox.backend import JobContext
    from bencher_runner.sandbox.kernel import KernelBundle
    from bencher_runner.sandbox.qemu_backend import QemuBackend
    from bencher_runner.spec.config import make_run_config

    def qemu(warn: Callable[[str], None] = lambda text: None, **fields: Any) -> QemuBackend:
        config = make_run_config(image="x:latest", **fields)
        return QemuBackend(
            JobContext(config, tmp_path, threading.Event(), warn=warn, phase=lambda text: None)
        )

    elf = fake_elf()
    image = tmp_path / "kernel" / "vmlinuz"
    image.parent.mkdir()
    image.write_bytes(bzimage(gzip.compress(elf), len(elf)))
    bundle = KernelBundle(kernel=image, modules=(), release="test")
    assert qemu()._boot_kernel(bundle).read_bytes() == elf
    (tmp_path / "kernel" / "vmlinux").unlink()
    assert qemu(kernel=image)._boot_kernel(bundle) == image
    assert not (tmp_path / "kernel" / "vmlinux").exists()

    warnings: list[str] = []

    image.write_bytes(b"not a kernel")
    assert qemu(warnings.append)._boot_kernel(bundle) == image  # falls back to what QEMU can still boot
    assert warnings and "compressed kernel" in warnings[0]
