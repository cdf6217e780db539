import dataclasses

import pytest

from bencher_runner.sandbox.agentconfig import AgentConfig, encode_agent_config
from bencher_runner.spec.errors import SpecError

BASE = AgentConfig(
    argv=("/bin/sh", "-c", "echo hi"),
    env=(("PATH", "/usr/bin:/bin"), ("HOME", "/root")),
    cwd="/work",
    uid=1000,
    gid=100,
    groups=(4, 27),
    max_output=1 << 20,
)


def entries(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data.endswith(b"\0")
    return [tuple(entry.split(b"=", 1)) for entry in data[:-1].split(b"\0")]  # type: ignore[misc]


def test_encodes_every_field_in_order() -> None:
    cfg = dataclasses.replace(BASE, outputs=("result.json", "/abs/out"))
    assert encode_agent_config(cfg) == (
        b"version=1\0arg=/bin/sh\0arg=-c\0arg=echo hi\0"
        b"env=PATH=/usr/bin:/bin\0env=HOME=/root\0cwd=/work\0uid=1000\0gid=100\0groups=4,27\0"
        b"max_output=1048576\0output=result.json\0output=/abs/out\0"
    )


def test_values_keep_equals_spaces_quotes_and_empty_strings() -> None:
    cfg = dataclasses.replace(BASE, argv=("printf", "a b", "", '"q"', "k=v"), env=(("X", "a=b=c"),))
    got = entries(encode_agent_config(cfg))
    assert [v for k, v in got if k == b"arg"] == [b"printf", b"a b", b"", b'"q"', b"k=v"]
    assert [v for k, v in got if k == b"env"] == [b"X=a=b=c"]


def test_empty_groups_and_no_outputs() -> None:
    got = entries(encode_agent_config(dataclasses.replace(BASE, groups=())))
    assert (b"groups", b"") in got
    assert all(k != b"output" for k, _ in got)


def test_non_utf8_round_trips_through_surrogateescape() -> None:
    arg = b"caf\xe9".decode("utf-8", errors="surrogateescape")
    got = entries(encode_agent_config(dataclasses.replace(BASE, argv=(arg,))))
    assert (b"arg", b"caf\xe9") in got
    assert (b"arg", "é".encode()) in entries(encode_agent_config(dataclasses.replace(BASE, argv=("é",))))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"argv": ()}, "command is empty"),
        ({"argv": ("a\0b",)}, "'a\\x00b'"),
        ({"env": (("A", "x\0"),)}, "NUL"),
        ({"env": (("", "x"),)}, "''"),
        ({"env": (("A=B", "x"),)}, "'A=B'"),
        ({"cwd": "work"}, "'work'"),
        ({"cwd": "/w\0"}, "NUL"),
        ({"uid": -1}, "uid -1"),
        ({"gid": -2}, "gid -2"),
        ({"groups": (1, -3)}, "group -3"),
        ({"uid": 2**32}, "uid 4294967296"),
        ({"max_output": -1}, "max_output -1"),
        ({"outputs": ("a\0",)}, "output path"),
    ],
)
def test_rejects_values_the_guest_cannot_take(change: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as info:
        encode_agent_config(dataclasses.replace(BASE, **change))  # type: ignore[arg-type]
    assert message in str(info.value)


def test_zero_ids_and_zero_cap_are_valid() -> None:
    data = encode_agent_config(dataclasses.replace(BASE, uid=0, gid=0, max_output=0))
    assert b"\0uid=0\0gid=0\0" in data
    assert b"\0max_output=0\0" in data


def test_rejects_output_paths_longer_than_the_guest_path_max() -> None:
    encode_agent_config(dataclasses.replace(BASE, outputs=("a" * 4095,)))
    with pytest.raises(SpecError, match="too long"):
        encode_agent_config(dataclasses.replace(BASE, outputs=("a" * 4096,)))
