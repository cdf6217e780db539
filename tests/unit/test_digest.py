import hashlib
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bencher_runner.oci.digest import (
    Digest,
    digest_bytes,
    hash_stream,
    is_digest,
    parse_digest,
    verify_bytes,
    verify_stream,
)
from bencher_runner.spec.errors import DigestMismatchError, ImageError

HEX64 = "ab" * 32
HEX128 = "cd" * 64


def test_parse_sha256_and_sha512() -> None:
    assert parse_digest(f"sha256:{HEX64}") == Digest("sha256", HEX64)
    assert parse_digest(f"sha512:{HEX128}") == Digest("sha512", HEX128)
    assert str(parse_digest(f"sha256:{HEX64}")) == f"sha256:{HEX64}"


@pytest.mark.parametrize(
    "value",
    [
        "",
        HEX64,
        f"sha256:{HEX64.upper()}",
        f"sha256:{HEX64[:-1]}",
        f"sha256:{HEX64}0",
        f"sha512:{HEX64}",
        f"sha256:{HEX128}",
        f"md5:{HEX64[:32]}",
        "sha256:../../../../etc/passwd",
        f"sha256:{HEX64[:-2]}/x",
        f"sha256:{HEX64}\n",
        f" sha256:{HEX64}",
    ],
)
def test_invalid_digests_are_refused(value: str) -> None:
    assert not is_digest(value)
    with pytest.raises(ImageError) as err:
        parse_digest(value, what="layer digest")
    assert "layer digest" in str(err.value) and "not a valid digest" in str(err.value)


def test_digest_bytes_matches_hashlib() -> None:
    assert digest_bytes(b"hello") == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert digest_bytes(b"hello", "sha512") == "sha512:" + hashlib.sha512(b"hello").hexdigest()


@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=700))
def test_hash_stream_any_chunk_size(data: bytes, chunk: int) -> None:
    digest, size = hash_stream(io.BytesIO(data), chunk_size=chunk)
    assert digest == digest_bytes(data) and size == len(data)


def test_verify_stream_ok_and_mismatch_names_both_digests() -> None:
    data = b"x" * 3_000_000
    good = digest_bytes(data)
    assert verify_stream(io.BytesIO(data), good, what="layer") == len(data)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatchError) as err:
        verify_stream(io.BytesIO(data), wrong, what="layer")
    assert wrong in str(err.value) and good in str(err.value)
    assert err.value.expected == wrong and err.value.actual == good


def test_verify_bytes_sha512() -> None:
    verify_bytes(b"abc", digest_bytes(b"abc", "sha512"), what="config")
    with pytest.raises(DigestMismatchError):
        verify_bytes(b"abd", digest_bytes(b"abc", "sha512"), what="config")
