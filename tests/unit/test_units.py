import pytest
from hypothesis import given
from hypothesis import strategies as st

from bencher_runner.spec.errors import SpecError
from bencher_runner.spec.units import MAX_SIZE_BYTES, MAX_SIZE_MIB, MIB, bytes_to_mib, mib_to_bytes


def test_examples() -> None:
    assert bytes_to_mib(0) == 0
    assert bytes_to_mib(1) == 1
    assert bytes_to_mib(MIB) == 1
    assert bytes_to_mib(MIB + 1) == 2
    assert bytes_to_mib(512 * MIB + 1) == 513
    assert mib_to_bytes(513) == 513 * MIB


@given(st.integers(min_value=0, max_value=MAX_SIZE_BYTES))
def test_rounds_up_never_gives_less(n: int) -> None:
    mib = bytes_to_mib(n)
    assert mib_to_bytes(mib) >= n
    assert mib == 0 or mib_to_bytes(mib - 1) < n


@given(st.integers(min_value=0, max_value=2**40))
def test_round_trip(mib: int) -> None:
    assert bytes_to_mib(mib_to_bytes(mib)) == mib


@pytest.mark.parametrize("n", [10**30, 2**63, MAX_SIZE_BYTES + 1, 2**64])
def test_sizes_no_file_can_have_are_a_spec_error(n: int) -> None:
    """spec.disk of 10**30 bytes: one clear error, not an OverflowError at a C boundary (issue 12)."""
    with pytest.raises(SpecError, match="larger than any disk or memory"):
        bytes_to_mib(n)
    with pytest.raises(SpecError, match="larger than any disk or memory"):
        mib_to_bytes(n)


def test_the_largest_sizes_still_convert() -> None:
    assert bytes_to_mib(MAX_SIZE_BYTES) == MAX_SIZE_MIB
    assert mib_to_bytes(MAX_SIZE_MIB) == MAX_SIZE_BYTES < 2**63
    with open("/dev/null", "rb") as f:  # a C off_t takes it
        f.seek(mib_to_bytes(MAX_SIZE_MIB))
