from hypothesis import given
from hypothesis import strategies as st

from bencher_runner.spec.units import MIB, bytes_to_mib, mib_to_bytes


def test_examples() -> None:
    assert bytes_to_mib(0) == 0
    assert bytes_to_mib(1) == 1
    assert bytes_to_mib(MIB) == 1
    assert bytes_to_mib(MIB + 1) == 2
    assert bytes_to_mib(512 * MIB + 1) == 513
    assert mib_to_bytes(513) == 513 * MIB


@given(st.integers(min_value=0, max_value=2**63))
def test_rounds_up_never_gives_less(n: int) -> None:
    mib = bytes_to_mib(n)
    assert mib_to_bytes(mib) >= n
    assert mib == 0 or mib_to_bytes(mib - 1) < n


@given(st.integers(min_value=0, max_value=2**40))
def test_round_trip(mib: int) -> None:
    assert bytes_to_mib(mib_to_bytes(mib)) == mib
