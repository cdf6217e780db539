"""Unit conversions between the protocol's bytes and the VM's MiB.

Jobs give memory and disk in bytes; VMs and disk images are sized in MiB. Rounding is always up, so a
job never gets less than it asked for (512 MiB + 1 B is 513 MiB).
"""

MIB = 1024 * 1024


def bytes_to_mib(n: int) -> int:
    """Bytes to MiB, rounded up; 0 stays 0. Negative sizes are a caller bug."""
    if n < 0:
        raise ValueError(f"negative size: {n}")
    return -(-n // MIB)


def mib_to_bytes(mib: int) -> int:
    """MiB to bytes."""
    if mib < 0:
        raise ValueError(f"negative size: {mib}")
    return mib * MIB
