"""Unit conversions between the protocol's bytes and the VM's MiB.

Jobs give memory and disk in bytes; VMs and disk images are sized in MiB. Rounding is always up, so a
job never gets less than it asked for (512 MiB + 1 B is 513 MiB). Sizes end up as C integers (file
sizes, QEMU's -m), so anything past the largest file size Linux has (2**63 - 1 bytes, off_t), in
whole MiB, is a SpecError here, never an OverflowError deep in the pipeline.
"""

from bencher_runner.spec.errors import SpecError

MIB = 1024 * 1024
MAX_SIZE_MIB = 2**43 - 1  # the largest whole MiB a C off_t (2**63 - 1 bytes) holds
MAX_SIZE_BYTES = MAX_SIZE_MIB * MIB


def bytes_to_mib(n: int) -> int:
    """Bytes to MiB, rounded up; 0 stays 0. Negative sizes are a caller bug."""
    if n < 0:
        raise ValueError(f"negative size: {n}")
    if n > MAX_SIZE_BYTES:
        raise SpecError(
            f"a size of {n} bytes is larger than any disk or memory can be (at most {MAX_SIZE_BYTES} bytes)"
        )
    return -(-n // MIB)


def mib_to_bytes(mib: int) -> int:
    """MiB to bytes."""
    if mib < 0:
        raise ValueError(f"negative size: {mib}")
    if mib > MAX_SIZE_MIB:
        raise SpecError(
            f"a size of {mib} MiB is larger than any disk or memory can be (at most {MAX_SIZE_MIB} MiB)"
        )
    return mib * MIB
