"""The fake's parsing rules are serde's for the server types (`lib/bencher_json/src/runner/`): which
frames parse decides whether an idle connection survives, so each rule is pinned here."""

from typing import Any

import pytest

from bencher_runner.fakeserver import default_config
from bencher_runner.fakeserver.wire import (
    Canceled,
    Completed,
    Failed,
    Heartbeat,
    Ready,
    RunnerMetadata,
    Running,
    WireError,
    bearer_token,
    config_error,
    parse_runner_message,
    stored_config,
    valid_key,
)

J = "550e8400-e29b-41d4-a716-446655440000"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ('{"event":"ready"}', Ready()),
        ('{"event":"ready","poll_timeout":null,"runner":null}', Ready()),
        ('{"event":"ready","poll_timeout":900,"extra":1}', Ready(900)),
        (
            '{"event":"ready","poll_timeout":55,"runner":{"os":"linux","arch":"aarch64","version":"0.6.12",'
            '"channel":"canary","checksum":"' + "a" * 64 + '"}}',
            Ready(55, RunnerMetadata("linux", "aarch64", "0.6.12", "canary", "a" * 64)),
        ),
        ('{"event":"running","job":"ignored"}', Running()),
        ('{"event":"heartbeat"}', Heartbeat()),
        ('{"event":"completed","job":"' + J.upper() + '","results":[]}', Completed(J, [])),
        (
            '{"event":"completed","job":"' + J + '","results":[{"exit_code":-1,"stdout":null,"x":1,'
            '"output":{"/b":"2","/a":"1"}}]}',
            Completed(J, [{"exit_code": -1, "output": {"/a": "1", "/b": "2"}}]),
        ),
        ('{"event":"failed","job":"' + J + '","results":[],"error":""}', Failed(J, [], "")),
        ('{"event":"canceled","job":"' + J.replace("-", "") + '"}', Canceled(J)),
    ],
)
def test_messages_that_parse(text: str, parsed: Any) -> None:
    assert parse_runner_message(text) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        '{"event":"Ready"}',
        '{"event":"paused","reasons":[{"kind":"maintenance","marker":true,"lock":false}]}',
        '{"event":"ready","poll_timeout":0}',
        '{"event":"ready","poll_timeout":901}',
        '{"event":"ready","poll_timeout":1.5}',
        '{"event":"ready","poll_timeout":false}',
        '{"event":"ready","runner":{"os":"linux","arch":"x86_64"}}',
        '{"event":"ready","runner":{"os":"Linux","arch":"x86_64","version":"1"}}',
        '{"event":"ready","runner":{"os":"linux","arch":"x86_64","version":"1","channel":"beta"}}',
        '{"event":"completed","job":"' + J + '"}',
        '{"event":"completed","job":"' + J + '","results":null}',
        '{"event":"completed","job":"' + J + '","results":[{"exit_code":2147483648}]}',
        '{"event":"completed","job":"' + J + '","results":[{"exit_code":true}]}',
        '{"event":"completed","job":"' + J + '","results":[{"exit_code":0,"output":{"/a":1}}]}',
        '{"event":"completed","job":"' + J + '","results":[{"exit_code":NaN}]}',
        '{"event":"failed","job":"' + J + '","results":[]}',
        '{"event":"failed","job":"' + J + '","results":[],"error":null}',
        '{"event":"canceled","job":"550e8400"}',
        '{"event":"canceled","job":42}',
    ],
)
def test_messages_that_do_not_parse(text: str) -> None:
    with pytest.raises(WireError):
        parse_runner_message(text)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bEaReR  abc ", "abc"),
        ("Bearer ", None),
        ("Bearer   ", None),
        ("Bearerabc", None),
        ("Basic abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    """`strip_bearer_token`: split at the first space, scheme case-insensitive, token trimmed."""
    assert bearer_token(header) == token


def test_key_format() -> None:
    assert valid_key("bencher_runner_" + "aZ09" * 7 + "ab")
    for body in ("a" * 29, "a" * 31, "a" * 29 + "_"):
        assert not valid_key("bencher_runner_" + body)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (default_config(), None),
        (default_config(digest="sha512:" + "f" * 128, iter=0, cmd=["x"] * 64, env={"A": "1"}), None),
        ({"registry": "https://registry.bencher.dev"}, "config.project is missing"),
        (default_config(registry="registry.bencher.dev"), "is not a URL"),
        (default_config(project="p"), "not a UUID"),
        (default_config(digest="sha256:" + "A" * 64), "sha256:<64 hex>"),
        (default_config(timeout=0), "1..=2147483647"),
        (default_config(timeout=2**31), "1..=2147483647"),
        (default_config(entrypoint=["x"] * 65), "more than 64"),
        (default_config(file_paths=["/x"] * 256), "more than 255"),
        (default_config(env={str(i): "" for i in range(256)}), "more than 255"),
        (default_config(iter=-1), "non-negative"),
        (default_config(build_time="yes"), "not a bool"),
    ],
)
def test_stored_config_rules(config: dict[str, Any], problem: str | None) -> None:
    """`JsonJobConfig`: a stored config that fails these is never sent in a `job` message."""
    found = config_error(config)
    assert found is None if problem is None else problem in (found or "")


def test_stored_config_is_re_serialized() -> None:
    config = default_config(registry="http://127.0.0.1:5000", project="11111111-2222-3333-4444-55555555555A")
    config.update(image=None, unknown=1, cmd=["a"])
    assert stored_config(config) == {
        "registry": "http://127.0.0.1:5000/",
        "project": "11111111-2222-3333-4444-55555555555a",
        "digest": "sha256:" + "a" * 64,
        "cmd": ["a"],
        "timeout": 60,
    }
    assert list(stored_config(config)) == ["registry", "project", "digest", "cmd", "timeout"]
