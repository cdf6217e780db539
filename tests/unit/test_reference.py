from pathlib import Path

import pytest

from bencher_runner.oci.credentials import Credentials
from bencher_runner.oci.reference import ImageReference, parse_reference, reference_for_job
from bencher_runner.oci.registry import parse_challenge
from bencher_runner.oci.source import is_local_layout
from bencher_runner.spec.errors import ImageError

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("registry.example.com/team/bench:v1", ImageReference("registry.example.com", "team/bench", "v1")),
        ("127.0.0.1:5000/p1", ImageReference("127.0.0.1:5000", "p1")),
        (f"127.0.0.1:5000/p1@{D}", ImageReference("127.0.0.1:5000", "p1", None, D)),
        (f"host.io/a/b/c:tag-1.2_x@{D}", ImageReference("host.io", "a/b/c", "tag-1.2_x", D)),
        ("localhost/x", ImageReference("localhost", "x")),
        ("localhost:5000/a__b/c-d.e", ImageReference("localhost:5000", "a__b/c-d.e")),
        ("[::1]:5000/p", ImageReference("[::1]:5000", "p")),
        ("http://127.0.0.1:5000/p:v", ImageReference("127.0.0.1:5000", "p", "v", insecure=True)),
        ("https://host.io/p", ImageReference("host.io", "p")),
    ],
)
def test_parse_valid(text: str, expected: ImageReference) -> None:
    assert parse_reference(text) == expected


def test_scheme_str_and_reference() -> None:
    ref = parse_reference(f"host.io:443/team/bench:v1@{D}")
    assert (ref.scheme, ref.base_url) == ("https", "https://host.io:443")
    assert ref.reference == D and str(ref) == f"host.io:443/team/bench:v1@{D}"
    insecure = parse_reference("host.io/p", insecure=True)
    assert (insecure.scheme, insecure.reference) == ("http", "latest")
    assert parse_reference("docker.io/library/alpine:3").base_url == "https://registry-1.docker.io"
    for r in (ref, insecure):
        assert parse_reference(r.pull_spec) == r
    assert insecure.pull_spec == "http://host.io/p"


def test_credentials_for_run_config() -> None:
    from bencher_runner.oci.source import credentials_for
    from bencher_runner.spec.config import make_run_config

    cfg = make_run_config(image="h.io/p", token="t0k", registry_username="u", registry_password="pw")
    assert credentials_for(cfg) == Credentials(token="t0k", username="u", password="pw")
    assert credentials_for(make_run_config(image="h.io/p")) == Credentials()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("alpine:3", "does not start with a registry host"),
        ("library/alpine", "does not start with a registry host"),
        ("host.io/Team/bench", "component 'Team'"),
        ("host.io/team//bench", "component ''"),
        ("host.io/a--b_", "component 'a--b_'"),
        ("host.io/p:-bad", "tag '-bad'"),
        ("host.io/p:" + "t" * 129, "tag"),
        ("host.io/p@sha256:abc", "is not a digest"),
        ("host.io/p@md5:" + "a" * 32, "is not a digest"),
        ("ho_st.io/p", "not a valid host"),
        ("host.io:port/p", "not a valid host"),
        ("host.io/p q", "spaces"),
        ("host.io/" + "a" * 300, "longer than 255"),
    ],
)
def test_parse_invalid(text: str, fragment: str) -> None:
    with pytest.raises(ImageError, match="invalid image reference") as err:
        parse_reference(text)
    assert fragment in str(err.value)
    assert "HOST[:PORT]/REPOSITORY" in str(err.value)


def test_reference_for_job() -> None:
    project = "3f2504E0-4f89-11d3-9a0c-0305e82c3301"
    ref = reference_for_job("https://registry.bencher.dev", project, D)
    assert ref == ImageReference("registry.bencher.dev", project.lower(), None, D, insecure=False)
    assert str(ref) == f"registry.bencher.dev/{project.lower()}@{D}"
    assert reference_for_job("http://127.0.0.1:5000/", "p", D).scheme == "http"
    assert reference_for_job("127.0.0.1:5000", "p", D).scheme == "https"
    with pytest.raises(ImageError, match="is not a registry URL"):
        reference_for_job("ftp://x", "p", D)
    with pytest.raises(ImageError, match="is not a registry URL"):
        reference_for_job("https://host/path", "p", D)
    with pytest.raises(ImageError, match="not a valid digest"):
        reference_for_job("https://host", "p", "latest")


def test_parse_challenge() -> None:
    ch = parse_challenge(
        'Bearer realm="https://auth.io/token",service="registry.io",scope="repository:p:pull"'
    )
    assert ch is not None and ch.scheme == "bearer"
    assert ch.params == {
        "realm": "https://auth.io/token",
        "service": "registry.io",
        "scope": "repository:p:pull",
    }
    ch = parse_challenge('Bearer realm="a\\"b", error=invalid_token')
    assert ch is not None and ch.params == {"realm": 'a"b', "error": "invalid_token"}
    basic = parse_challenge('Basic realm="Registry Realm"')
    assert basic is not None and basic.scheme == "basic"
    assert parse_challenge("") is None


def test_credentials_never_show_secrets() -> None:
    creds = Credentials(token="tok-SECRET", username="u", password="pw-SECRET")
    assert "SECRET" not in repr(creds) and "SECRET" not in str(creds)


def test_is_local_layout(tmp_path: Path) -> None:
    base = tmp_path
    (base / "img").mkdir()
    assert is_local_layout(str(base / "img"))
    assert is_local_layout(f"{base / 'img'}:v1")
    assert not is_local_layout(f"{base / 'nope'}:v1")
    assert not is_local_layout("127.0.0.1:5000/p:v1")
