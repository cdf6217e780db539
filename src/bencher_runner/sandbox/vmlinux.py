"""Extracting the uncompressed ELF kernel (vmlinux) from a bzImage, for Firecracker.

Firecracker on x86_64 boots only an ELF vmlinux, while distributions ship a compressed bzImage
(Debian's cloud kernel is LZ4). Like the kernel's own ``scripts/extract-vmlinux``, this scans the
bzImage for the magic bytes of every compressor the kernel supports, decompresses from each offset in
turn and keeps the first result that is a complete x86-64 ELF. The result must carry a PVH entry
note (``XEN_ELFNOTE_PHYS32_ENTRY``) so that it boots the same way under QEMU and Firecracker.

LZ4 uses the ``lz4`` Python package when installed, else the system's liblz4 through ctypes (it is
not on PyPI's list of this project's dependencies and Debian always has liblz4); LZO is not supported.
"""

import bz2
import contextlib
import ctypes
import ctypes.util
import io
import json
import lzma
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import zstandard

from bencher_runner.atomicfile import write_atomic
from bencher_runner.spec.errors import KernelBundleError

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
XEN_ELFNOTE_PHYS32_ENTRY = 18
MAX_VMLINUX_BYTES = 1 << 30  # a decompression bomb stops here; real kernels are < 100 MiB
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK = 8 << 20  # every block of the legacy frame decompresses to at most 8 MiB

Decompressor = Callable[[bytes], bytes]


def _gzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, MAX_VMLINUX_BYTES)


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data, MAX_VMLINUX_BYTES)


def _lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data, MAX_VMLINUX_BYTES)


def _bzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data, MAX_VMLINUX_BYTES)


def _zstd(data: bytes) -> bytes:
    # The kernel compresses with --ultra -22 (large windows); trailing bytes after the frame are ignored.
    reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(io.BytesIO(data))
    with reader:
        return reader.read(MAX_VMLINUX_BYTES)


class _Lz4Block:
    """LZ4 block decompression: the ``lz4`` package if installed, else the system's liblz4."""

    def __init__(self) -> None:
        self._py: Callable[[bytes, int], bytes] | None = None
        self._lib: ctypes.CDLL | None = None
        try:
            import lz4.block  # type: ignore[import-not-found,unused-ignore]

            def py(block: bytes, capacity: int) -> bytes:
                return bytes(lz4.block.decompress(block, uncompressed_size=capacity, return_bytearray=False))

            self._py = py
        except ImportError:
            name = ctypes.util.find_library("lz4") or "liblz4.so.1"
            with contextlib.suppress(OSError):
                lib = ctypes.CDLL(name)
                lib.LZ4_decompress_safe.argtypes = [
                    ctypes.c_char_p,
                    ctypes.c_char_p,
                    ctypes.c_int,
                    ctypes.c_int,
                ]
                lib.LZ4_decompress_safe.restype = ctypes.c_int
                self._lib = lib

    @property
    def available(self) -> bool:
        return self._py is not None or self._lib is not None

    def decompress(self, block: bytes, capacity: int) -> bytes:
        """The block's bytes; ValueError when it is not valid LZ4."""
        if self._py is not None:
            try:
                return self._py(block, capacity)
            except Exception as err:  # lz4.block raises LZ4BlockError (a RuntimeError)
                raise ValueError(str(err)) from err
        assert self._lib is not None
        out = ctypes.create_string_buffer(capacity)
        n = self._lib.LZ4_decompress_safe(block, out, len(block), capacity)
        if n < 0:
            raise ValueError("invalid LZ4 block")
        return out.raw[:n]


_LZ4: _Lz4Block | None = None


def _lz4_block() -> _Lz4Block:
    global _LZ4
    if _LZ4 is None:
        _LZ4 = _Lz4Block()
    return _LZ4


def lz4_legacy(data: bytes) -> bytes:
    """Decompress an LZ4 legacy frame (what the kernel's ``lz4 -l`` writes), ignoring trailing bytes.

    The frame is the magic, then blocks of (LE u32 compressed size, data). It has no end marker: the
    kernel's build appends the uncompressed size, so decoding stops at the first size that cannot be
    a block or a block that does not decompress.
    """
    lz4 = _lz4_block()
    if not lz4.available:
        raise KernelBundleError(
            "the kernel image is LZ4-compressed and LZ4 support is missing: install liblz4 "
            "(`apt-get install liblz4-1`) or the `lz4` Python package, or pass an uncompressed vmlinux"
        )
    if not data.startswith(LZ4_LEGACY_MAGIC):
        raise ValueError("not an LZ4 legacy frame")
    bound = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16  # LZ4_compressBound(8 MiB)
    out = bytearray()
    pos = len(LZ4_LEGACY_MAGIC)
    while pos + 4 <= len(data) and len(out) < MAX_VMLINUX_BYTES:
        (size,) = struct.unpack_from("<I", data, pos)
        if data[pos : pos + 4] == LZ4_LEGACY_MAGIC:  # concatenated frames
            pos += 4
            continue
        if size == 0 or size > bound or pos + 4 + size > len(data):
            break
        try:
            out += lz4.decompress(data[pos + 4 : pos + 4 + size], LZ4_LEGACY_BLOCK)
        except ValueError:
            if not out:
                raise
            break
        pos += 4 + size
    return bytes(out)


# Magic bytes -> (name, decompressor); the same list as the kernel's scripts/extract-vmlinux.
COMPRESSORS: dict[bytes, tuple[str, Decompressor]] = {
    b"\x1f\x8b\x08": ("gzip", _gzip),
    b"\xfd7zXZ\x00": ("xz", _xz),
    b"BZh": ("bzip2", _bzip2),
    b"\x5d\x00\x00": ("lzma", _lzma),
    LZ4_LEGACY_MAGIC: ("lz4", lz4_legacy),
    b"\x28\xb5\x2f\xfd": ("zstd", _zstd),
}


def elf_problem(data: bytes, *, require_pvh: bool = True) -> str | None:
    """None when ``data`` is a complete x86-64 ELF kernel (with a PVH note if required), else why not."""
    if not data.startswith(ELF_MAGIC):
        return "not an ELF file"
    if len(data) < 64 or data[4] != 2 or data[5] != 1:
        return "not a 64-bit little-endian ELF file"
    from elftools.common.exceptions import ELFError  # pyelftools: only when a kernel is checked
    from elftools.elf.elffile import ELFFile
    from elftools.elf.segments import NoteSegment

    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] != "EM_X86_64":
            return f"ELF machine is {elf['e_machine']}, not x86-64"
        if elf["e_entry"] == 0:
            return "ELF entry point is 0"
        has_pvh = False
        for segment in elf.iter_segments():
            if segment["p_offset"] + segment["p_filesz"] > len(data):
                return "ELF file is truncated (a segment ends past the end of the data)"
            if isinstance(segment, NoteSegment):
                for note in segment.iter_notes():
                    has_pvh = has_pvh or (
                        note["n_name"] == "Xen" and _note_type(note["n_type"]) == XEN_ELFNOTE_PHYS32_ENTRY
                    )
        if elf.num_segments() == 0:
            return "ELF file has no program headers"
    except (ELFError, struct.error, ValueError, KeyError) as err:
        return f"ELF file is malformed ({err})"
    if require_pvh and not has_pvh:
        return (
            "ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build the kernel with CONFIG_PVH=y"
        )
    return None


def _note_type(value: object) -> int | None:
    if isinstance(value, int):
        return value
    return None  # pyelftools names only the note types it knows, none of them Xen's


def find_payloads(image: bytes) -> list[tuple[int, str]]:
    """(offset, compressor) for every compressor magic in ``image``, in file order."""
    found = []
    for magic, (name, _) in COMPRESSORS.items():
        at = image.find(magic)
        while at >= 0:
            found.append((at, name))
            at = image.find(magic, at + 1)
    return sorted(found)


def decompress_vmlinux(image: bytes, *, require_pvh: bool = True) -> bytes:
    """The ELF kernel inside ``image`` (a bzImage, or already an ELF vmlinux)."""
    if image.startswith(ELF_MAGIC):
        problem = elf_problem(image, require_pvh=require_pvh)
        if problem:
            raise KernelBundleError(f"the kernel is an ELF file but cannot be booted: {problem}")
        return image
    decompressors = {name: fn for name, fn in COMPRESSORS.values()}
    tried: dict[str, str] = {}
    lz4_missing: KernelBundleError | None = None
    for offset, name in find_payloads(image):
        try:
            data = decompressors[name](image[offset:])
        except KernelBundleError as err:  # LZ4 support missing
            lz4_missing = err
            continue
        except (OSError, EOFError, ValueError, LookupError, zlib.error, lzma.LZMAError, zstandard.ZstdError):
            continue
        problem = elf_problem(data, require_pvh=require_pvh)
        if problem is None:
            return data
        if data.startswith(ELF_MAGIC):
            tried[name] = problem
    if tried:
        name, problem = next(iter(tried.items()))
        raise KernelBundleError(f"the kernel's {name} payload is not a bootable vmlinux: {problem}")
    if lz4_missing is not None:
        raise lz4_missing
    raise KernelBundleError(
        "no compressed kernel found in the image (looked for gzip, xz, bzip2, lzma, lz4 and zstd "
        "payloads); is it a bzImage? LZO-compressed kernels are not supported"
    )


def _stamp(source: Path) -> dict[str, object]:
    st = source.stat()
    return {"source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _source_stamp(bzimage: Path) -> dict[str, object]:
    try:
        return _stamp(bzimage)
    except OSError as err:
        raise KernelBundleError(
            f"kernel image {bzimage} cannot be read ({err.strerror}); "
            "check --kernel or run `runner kernel fetch`"
        ) from None


def _is_elf(path: Path) -> bool:
    with contextlib.suppress(OSError), path.open("rb") as f:
        return f.read(4) == ELF_MAGIC
    return False


def _is_fresh(dest: Path, stamp: dict[str, object]) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return dest.is_file() and json.loads(dest.with_name(dest.name + ".json").read_text()) == stamp
    return False


def ensure_vmlinux(bzimage: Path, dest: Path) -> Path:
    """:func:`extract_vmlinux`, run in a child process when the cached copy is stale: decompressing
    a kernel briefly holds about 150 MB, which a long-lived daemon should not keep as its peak RSS."""
    if _is_fresh(dest, _source_stamp(bzimage)):
        return dest
    if _is_elf(bzimage):  # already a vmlinux (the lean kernel, a --kernel vmlinux): boot it as it is
        return bzimage
    proc = subprocess.run(
        [sys.executable, "-m", "bencher_runner.sandbox.vmlinux", str(bzimage), str(dest)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise KernelBundleError(lines[-1] if lines else f"extracting vmlinux from {bzimage} failed")
    return dest


def extract_vmlinux(bzimage: Path, dest: Path) -> Path:
    """Write the ELF kernel inside ``bzimage`` to ``dest`` (reused while ``bzimage`` is unchanged).

    ``dest`` is a cache file next to the kernel bundle; a sibling ``.json`` stamp records which
    bzImage it came from. Written atomically, so concurrent jobs never see half a file.
    """
    stamp_path = dest.with_name(dest.name + ".json")
    stamp = _source_stamp(bzimage)
    if _is_fresh(dest, stamp):
        return dest
    try:
        image = bzimage.read_bytes()
    except OSError as err:
        raise KernelBundleError(f"kernel image {bzimage} cannot be read ({err.strerror})") from None
    try:
        vmlinux = decompress_vmlinux(image)
    except KernelBundleError as err:
        raise KernelBundleError(f"cannot extract vmlinux from {bzimage}: {err}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, vmlinux, mode=0o644)
    write_atomic(stamp_path, json.dumps(stamp))  # the stamp lands last: a fresh stamp means a whole file
    return dest


if __name__ == "__main__":  # ensure_vmlinux's child: `python -m bencher_runner.sandbox.vmlinux SRC DEST`
    try:
        extract_vmlinux(Path(sys.argv[1]), Path(sys.argv[2]))
    except KernelBundleError as error:
        sys.exit(str(error))
