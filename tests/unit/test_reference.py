import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from bencher_runner.oci.credentials import Credentials
from bencher_runner.oci.reference import ImageReference, parse_reference
from bencher_runner.oci.registry import parse_challenge
from bencher_runner.oci.source import is_local_layout
from bencher_runner.spec.errors import ImageError, SpecError
from bencher_runner.spec.registry import parse_registry_url
from tests.support.oci_builder import build_layout, file

D = "sha256:" + "ab" * 32
JOB_UUID = "550e8400-e29b-41d4-a716-446655440000"


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
    assert credentials_for(cfg.job) == Credentials(token="t0k", username="u", password="pw")
    assert credentials_for(make_run_config(image="h.io/p").job) == Credentials()


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


# --- a job's image comes from a registry only: never a local directory -------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://registry.bencher.dev", ("registry.bencher.dev", False)),
        ("https://registry.bencher.dev/", ("registry.bencher.dev", False)),
        (" https://registry.bencher.dev ", ("registry.bencher.dev", False)),
        ("http://127.0.0.1:5000", ("127.0.0.1:5000", True)),
        ("http://127.0.0.1:5000/", ("127.0.0.1:5000", True)),
        ("127.0.0.1:5000", ("127.0.0.1:5000", False)),
        ("localhost:5000", ("localhost:5000", False)),
        ("http://[::1]:5000", ("[::1]:5000", True)),
        ("registry.io", ("registry.io", False)),
    ],
)
def test_registry_url_forms(url: str, expected: tuple[str, bool]) -> None:
    assert parse_registry_url(url) == expected


BAD_REGISTRIES = [
    "/tmp/layout",
    "/",
    "./layout",
    "../layout",
    "layout",  # a bare word could be a relative directory: not a host[:port] the runner accepts
    "~/layout",
    "file:///tmp/layout",
    "https://host/path",
    "host/path",
    "host.io:5000/p",
    "ftp://host",
    "",
    "   ",
    "https://",
    "http:///tmp/layout",
    "user:pw@host",
    "https://user@host",
    "https://host?x=1",
    "https://host#frag",
    "host:port",
    "host:99999",
    "ho st",
    "https://host\n",
    "\\\\server\\share",
]


@pytest.mark.parametrize("url", BAD_REGISTRIES)
def test_registry_url_refused(url: str) -> None:
    with pytest.raises(SpecError, match=r"is not a registry \(expected http\(s\)://HOST\[:PORT\] or HOST"):
        parse_registry_url(url)


@pytest.mark.parametrize("url", BAD_REGISTRIES)
def test_a_job_whose_registry_is_not_a_host_is_refused(url: str) -> None:
    from bencher_runner.fakeserver import default_config, default_spec
    from bencher_runner.spec.config import HostSettings
    from bencher_runner.spec.jobspec import build_config_from_job, parse_job

    message = {
        "uuid": JOB_UUID,
        "spec": default_spec(),
        "config": default_config(registry=url),
        "timeout": 60,
    }
    with pytest.raises(
        SpecError, match=r"config\.registry=.*a job's image comes from a registry only"
    ) as err:
        build_config_from_job(parse_job(message), HostSettings(allow_no_sandbox=True))
    assert "\n" not in str(err.value)


def test_a_job_names_an_existing_layout_in_vain(tmp_path: Path) -> None:
    """The daemon opened `{registry}/{project}@{digest}` as a layout when that path existed."""
    from bencher_runner.fakeserver import default_config, default_spec
    from bencher_runner.spec.config import HostSettings
    from bencher_runner.spec.jobspec import build_config_from_job, parse_job

    config = default_config(registry=str(tmp_path))
    build_layout(tmp_path / f"{config['project']}@{config['digest']}", [[file("a")]], {"Cmd": ["/a"]})
    message = {"uuid": JOB_UUID, "spec": default_spec(), "config": config, "timeout": 60}
    with pytest.raises(SpecError, match=r"config\.registry="):
        build_config_from_job(parse_job(message), HostSettings(allow_no_sandbox=True))


def test_a_job_config_never_allows_a_local_layout() -> None:
    from bencher_runner.fakeserver import default_config, default_spec
    from bencher_runner.spec.config import HostSettings, make_run_config
    from bencher_runner.spec.jobspec import build_config_from_job, parse_job

    for registry in ("https://registry.bencher.dev", "http://127.0.0.1:5000", "127.0.0.1:5000"):
        config = default_config(registry=registry)
        message = {"uuid": JOB_UUID, "spec": default_spec(), "config": config, "timeout": 60}
        cfg = build_config_from_job(parse_job(message), HostSettings(allow_no_sandbox=True))
        assert cfg.job.allow_local_image is False
        assert cfg.job.image == f"{registry.split('://')[-1]}/{config['project']}@{config['digest']}"
    assert make_run_config(image="x").job.allow_local_image is True  # `runner run` opens layouts


@contextlib.contextmanager
def no_filesystem() -> Iterator[None]:
    """Any stat/open through os or pathlib inside the block fails the test."""

    def boom(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError(f"the filesystem was touched: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("stat", "lstat", "open", "listdir", "scandir"):
            mp.setattr(os, name, boom)
        for name in ("exists", "is_dir", "is_file", "stat", "open"):
            mp.setattr(Path, name, boom)
        yield


@pytest.mark.parametrize("suffix", ["", ":latest", ":v1"])
def test_open_image_registry_only_never_opens_a_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    from bencher_runner.oci import source
    from bencher_runner.oci.source import open_image

    layout = tmp_path / "img"
    build_layout(layout, [[file("a")]], {"Cmd": ["/a"]}, tag="v1")
    monkeypatch.setattr(source, "open_layout", lambda *a, **k: pytest.fail("open_layout was called"))
    with no_filesystem(), pytest.raises(ImageError) as err:
        open_image(f"{layout}{suffix}", cache_dir=tmp_path / "cache", allow_local=False)
    text = str(err.value)
    assert "does not start with a registry host" in text and "comes from a registry only" in text, text
    assert "DIR[:TAG]" not in text  # no advice to pass a layout where none is allowed


def test_open_image_registry_only_pulls_even_when_a_directory_has_the_reference_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bencher_runner.oci import pull, source
    from bencher_runner.oci.source import open_image

    ref = f"127.0.0.1:5000/p@{D}"
    monkeypatch.chdir(tmp_path)
    build_layout(tmp_path / ref, [[file("a")]], {"Cmd": ["/a"]})  # a relative path that exists
    assert is_local_layout(ref)
    pulled: list[str] = []
    monkeypatch.setattr(source, "open_layout", lambda *a, **k: pytest.fail("open_layout was called"))
    monkeypatch.setattr(pull, "pull_image", lambda r, **k: pulled.append(str(r)))
    with no_filesystem():
        open_image(ref, cache_dir=tmp_path / "cache", allow_local=False)
    assert pulled == [ref]


def test_a_job_with_allow_local_image_false_fails_on_a_layout(tmp_path: Path) -> None:
    from bencher_runner.job import run_job
    from bencher_runner.spec.config import make_run_config

    layout = tmp_path / "img"
    build_layout(layout, [[file("a")]], {"Cmd": ["/a"]})
    cfg = make_run_config(image=str(layout), allow_local_image=False, backend="none")
    result = run_job(cfg, cache=tmp_path / "cache")
    assert result.status == "failed" and isinstance(result.failure, ImageError)
    assert "comes from a registry only" in (result.error or "")


# --- plain HTTP to another host is the user's choice, but it is said --------------------------------


@pytest.mark.parametrize(
    ("registry", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("localhost:5000", True),
        ("[::1]:5000", True),
        ("[::1]", True),
        ("10.0.0.5:5000", False),
        ("registry.example.com", False),
        ("localhost.example.com:5000", False),
        ("[2001:db8::1]:5000", False),
    ],
)
def test_is_loopback(registry: str, loopback: bool) -> None:
    from bencher_runner.oci.source import is_loopback

    assert is_loopback(registry) is loopback


def test_plain_http_to_a_non_loopback_host_warns_once_per_pull_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bencher_runner.oci import pull, source

    warned: list[str] = []
    calls: list[str] = []
    monkeypatch.setattr(pull, "pull_image", lambda ref, **kw: calls.append(str(ref)))  # no traffic at all
    for image in ("registry.example.com/p:v1", "10.0.0.5:5000/p:v1"):  # --insecure-registry
        source.open_image(image, cache_dir=tmp_path, insecure=True, warn=warned.append)
    source.open_image(f"http://registry.example.com/q@{D}", cache_dir=tmp_path, warn=warned.append)  # a job's
    for image in ("127.0.0.1:5000/p", "localhost:5000/p", "[::1]:5000/p", "127.1.2.3/p"):
        source.open_image(f"http://{image}", cache_dir=tmp_path, warn=warned.append)
    source.open_image("registry.example.com/p", cache_dir=tmp_path, warn=warned.append)  # TLS
    assert len(calls) == 8
    assert len(warned) == 3, warned
    assert [w.split()[2] for w in warned] == ["registry.example.com", "10.0.0.5:5000", "registry.example.com"]
    assert all("over plain HTTP" in w and "unencrypted" in w for w in warned)


def test_a_job_reports_the_plain_http_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bencher_runner.job import Reporter, run_job
    from bencher_runner.oci import pull
    from bencher_runner.spec.config import make_run_config

    def no_pull(ref: object, **kw: object) -> NoReturn:
        raise ImageError("stop here")

    warnings: list[str] = []

    class Record(Reporter):
        def warn(self, text: str) -> None:
            warnings.append(text)

    monkeypatch.setattr(pull, "pull_image", no_pull)
    cfg = make_run_config(image="registry.example.com/p:v1", insecure_registry=True, backend="none")
    result = run_job(cfg, cache=tmp_path, reporter=Record())
    assert result.error == "stop here"
    assert any("registry.example.com over plain HTTP" in w for w in warnings), warnings


# --- HTTPS -> HTTP fallback: only literal loopback addresses and exactly `localhost` -----------------


@pytest.mark.parametrize(
    "registry",
    [
        "127.0.0.1",
        "127.0.0.1:5000",
        "127.255.255.254:80",
        "127.1.2.3",
        "localhost",
        "localhost:5000",
        "[::1]",
        "[::1]:5000",
        "[0:0:0:0:0:0:0:1]:5000",
    ],
)
def test_a_loopback_registry_may_fall_back_to_http(registry: str) -> None:
    from bencher_runner.oci.reference import may_fall_back_to_http

    assert may_fall_back_to_http(registry) is True


@pytest.mark.parametrize(
    "registry",
    [
        "example.com",
        "registry.example.com:443",
        "10.0.0.1:5000",
        "192.168.1.1",
        "127.0.0.1.example.com",
        "127.0.0.1.example.com:5000",
        "localhost.evil",
        "localhost.evil:5000",
        "evil.localhost",
        "localhost.",
        "LOCALHOST",
        "localhost:5000:1",
        "0x7f.1",
        "0x7f.0.0.1",
        "127.1",
        "127.0.1",
        "2130706433",
        "0177.0.0.1",
        "127.000.000.001",
        "::1",
        "[::1",
        "[::1]x",
        "[::2]",
        "[::1%lo]",
        "[::ffff:127.0.0.1]",
        "[2001:db8::1]:5000",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        "127.0.0.1:+80",
        "127.0.0.1 ",
        " localhost",
        "",
    ],
)
def test_no_other_registry_ever_falls_back_to_http(registry: str) -> None:
    from bencher_runner.oci.reference import may_fall_back_to_http

    assert may_fall_back_to_http(registry) is False
