import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bencher_runner.fakeserver import default_config, default_spec
from bencher_runner.oci.reference import ImageReference, parse_reference
from bencher_runner.spec.config import HostSettings, JobRequest
from bencher_runner.spec.errors import SpecError
from bencher_runner.spec.jobspec import JobConfig, build_config_from_job, image_reference, parse_job
from bencher_runner.spec.units import MIB

UUID = "550e8400-e29b-41d4-a716-446655440000"


def job(spec: dict[str, Any] | None = None, **config: Any) -> dict[str, Any]:
    return {
        "event": "job",
        "uuid": UUID,
        "spec": spec or default_spec(),
        "config": default_config(**config),
        "oci_token": "a.b.c",
        "timeout": 60,
        "surprise": True,
    }


def build(msg: dict[str, Any], **options: Any) -> JobRequest:
    """The job request a job message maps to (the host settings are the given ones)."""
    return build_config_from_job(parse_job(msg), HostSettings(**options)).job


def test_full_mapping() -> None:
    spec = default_spec(cpu=4, memory=512 * MIB + 1, disk=2048 * MIB, network=True)
    cfg = build(
        job(
            spec,
            registry="https://registry.bencher.dev/",
            entrypoint=["/bin/sh", "-c"],
            cmd=["bench"],
            env={"A": "1"},
            file_paths=["/out.json"],
            iter=3,
            allow_failure=True,
            timeout=120,
        )
    )
    assert cfg.image == f"registry.bencher.dev/{default_config()['project']}@sha256:{'a' * 64}"
    assert not cfg.insecure_registry
    assert (cfg.vcpus, cfg.memory_mib, cfg.disk_mib, cfg.network) == (4, 513, 2048, True)
    assert cfg.entrypoint == ("/bin/sh", "-c") and cfg.cmd == ("bench",) and cfg.env == {"A": "1"}
    assert cfg.output_paths == ("/out.json",) and cfg.iterations == 3 and cfg.allow_failure
    assert cfg.timeout_s == 120
    assert cfg.token is not None and cfg.token.get_secret_value() == "a.b.c"


def test_http_registry_and_legacy_layout() -> None:
    cfg = build(job(registry="http://127.0.0.1:5000/"), image_layout="legacy")
    assert cfg.insecure_registry
    assert cfg.image.startswith("127.0.0.1:5000/11111111-2222-3333-4444-555555555555/images@sha256:")


def test_defaults_and_iter_zero() -> None:
    assert build(job()).iterations == 1
    assert build(job(iter=0)).iterations == 0


@pytest.mark.parametrize(
    ("spec", "config", "text"),
    [
        ({"cpu": 0}, {}, "at least 1 CPU"),
        ({"memory": 0}, {}, "memory"),
        ({"sandbox": "gvisor"}, {}, "not supported"),
        ({"sandbox": None}, {}, "--danger-allow-no-sandbox"),
        ({}, {"entrypoint": ["x"] * 65}, "at most 64"),
        ({}, {"cmd": ["x"] * 65}, "at most 64"),
        ({}, {"env": {f"V{i}": "" for i in range(256)}}, "at most 255"),
        ({}, {"file_paths": [f"/f{i}" for i in range(256)]}, "at most 255"),
        ({}, {"digest": "sha256:short"}, "config.digest"),
    ],
)
def test_invalid(spec: dict[str, Any], config: dict[str, Any], text: str) -> None:
    with pytest.raises(SpecError, match=text.replace("-", "\\-")):
        build(job(default_spec(**spec), **config))


def test_no_sandbox_allowed_with_flag() -> None:
    assert build(job(default_spec(sandbox=None)), allow_no_sandbox=True).vcpus == 1


def test_missing_fields() -> None:
    with pytest.raises(SpecError, match="spec"):
        parse_job({"event": "job", "uuid": UUID, "config": default_config()})


@given(st.integers(min_value=64 * MIB, max_value=2**40), st.integers(min_value=64 * MIB, max_value=2**40))
def test_bytes_to_mib_through_the_job(memory: int, disk: int) -> None:
    cfg = build(job(default_spec(memory=memory, disk=disk)))
    assert cfg.memory_mib * MIB >= memory > (cfg.memory_mib - 1) * MIB
    assert cfg.disk_mib * MIB >= disk > (cfg.disk_mib - 1) * MIB


def test_no_sandbox_job_runs_without_a_sandbox_only_when_allowed() -> None:
    from bencher_runner.spec.config import HostSettings
    from bencher_runner.spec.jobspec import build_config_from_job, parse_job

    message = {
        "event": "job",
        "uuid": "550e8400-e29b-41d4-a716-446655440000",
        "spec": {"cpu": 1, "memory": 2**29, "disk": 2**30, "network": False, "sandbox": None},
        "config": {
            "registry": "http://127.0.0.1:5000",
            "project": "550e8400-e29b-41d4-a716-446655440001",
            "digest": "sha256:" + "a" * 64,
            "timeout": 60,
        },
        "oci_token": "x.y.z",
        "timeout": 60,
    }
    config = build_config_from_job(parse_job(message), HostSettings(allow_no_sandbox=True))
    assert config.backend == "none"
    message["spec"]["sandbox"] = "firecracker"  # type: ignore[index]
    assert (
        build_config_from_job(parse_job(message), HostSettings(backend="firecracker")).backend
        == "firecracker"
    )
    assert build_config_from_job(parse_job(message), HostSettings()).backend == "qemu"


@pytest.mark.parametrize(
    "uuid",
    [
        "",
        "not-a-uuid",
        "../../outbox/evil",
        "550e8400-e29b-41d4-a716-44665544000",  # one digit short
        "550e8400-e29b-41d4-a716-4466554400000",  # one digit long
        "550e8400e29b41d4a716446655440000",  # valid for uuid.UUID(), not the wire form
        "{550e8400-e29b-41d4-a716-446655440000}",
        "urn:uuid:550e8400-e29b-41d4-a716-446655440000",
        "550e8400-e29b-41d4-a716-446655440000\n",
        "550e8400-e29b-41d4-a716-44665544000g",
        "x" * 100_000,
        5,
        None,
        ["550e8400-e29b-41d4-a716-446655440000"],
    ],
)
def test_job_uuid_must_be_a_uuid(uuid: Any) -> None:
    message = job()
    message["uuid"] = uuid
    with pytest.raises(SpecError, match=r"^invalid job message: uuid: ") as err:
        parse_job(message)
    assert len(str(err.value)) < 300  # a hostile value is not echoed in full
    assert "\n" not in str(err.value)


def test_job_uuid_any_case_is_kept_as_sent() -> None:
    upper = UUID.upper()
    message = job()
    message["uuid"] = upper
    assert parse_job(message).uuid == upper  # acks and outbox entries use the server's spelling


@pytest.mark.parametrize("uuid", ["../spec", "", "spec one", 7])
def test_spec_uuid_when_present_must_be_a_uuid(uuid: Any) -> None:
    with pytest.raises(SpecError, match=r"spec\.uuid: "):
        parse_job(job(default_spec(uuid=uuid)))


def test_spec_uuid_may_be_absent_or_null() -> None:
    spec = default_spec()
    del spec["uuid"]
    assert parse_job(job(spec)).spec.uuid is None
    assert parse_job(job(default_spec(uuid=None))).spec.uuid is None


@given(
    st.one_of(
        st.text(max_size=64),
        st.uuids().map(str),
        st.integers(),
        st.none(),
        st.lists(st.text(max_size=4), max_size=2),
        st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    )
)
def test_any_uuid_value_gives_a_claimed_job_or_a_spec_error(uuid: Any) -> None:
    message = job()
    message["uuid"] = uuid
    try:
        claimed = parse_job(message)
    except SpecError:
        return
    assert re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", claimed.uuid)


def test_the_job_deadline_counts_from_started_at_else_from_now() -> None:
    from bencher_runner.spec.config import make_run_config

    assert make_run_config(image="x", timeout_s=20).job.deadline(now=100.0) == 120.0
    assert make_run_config(image="x", timeout_s=20, started_at=90.0).job.deadline(now=100.0) == 110.0
    assert make_run_config(image="x", timeout_s=20, started_at=50.0).job.deadline(now=100.0) == 70.0


def test_build_time_and_file_size_are_mapped() -> None:
    cfg = build(job(build_time=True, file_size=True, file_paths=["/out/app"]))
    assert cfg.build_time and cfg.file_size and cfg.output_paths == ("/out/app",)
    plain = build(job())
    assert not plain.build_time and not plain.file_size
    assert not build(job(build_time=None, file_size=False)).build_time


@pytest.mark.parametrize(
    ("config", "name"),
    [
        ({"entrypoint": ["/bin/sh", "-c"], "cmd": ["cargo build"]}, "/bin/sh -c cargo build"),
        ({"cmd": ["make", "-j4"]}, "make -j4"),
        ({"entrypoint": ["./build.sh"]}, "./build.sh"),
        (
            {"entrypoint": [], "cmd": [], "image": "registry.bencher.dev/p/app:v1"},
            "registry.bencher.dev/p/app:v1",
        ),
        ({"image": "registry.bencher.dev/p/app:v1"}, "registry.bencher.dev/p/app:v1"),
        ({}, f"11111111-2222-3333-4444-555555555555@sha256:{'a' * 64}"),
        ({"image": ""}, f"11111111-2222-3333-4444-555555555555@sha256:{'a' * 64}"),
    ],
)
def test_the_build_time_benchmark_is_named_like_bencher_names_it(config: dict[str, Any], name: str) -> None:
    assert build(job(build_time=True, **config)).build_time_name() == name


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"entrypoint": ("/bin/sh", "-c"), "cmd": ("make",)}, "/bin/sh -c make"),
        ({"cmd": ("make",)}, "make"),
        ({}, "examples/hello/oci:latest"),
    ],
)
def test_runner_run_names_the_build_time_benchmark_by_its_command_else_image(
    fields: dict[str, Any], name: str
) -> None:
    from bencher_runner.spec.config import make_run_config

    assert make_run_config(image="examples/hello/oci:latest", **fields).job.build_time_name() == name


@pytest.mark.parametrize("path", ["", "a\x00b", "\ud800", "/out/\udcff"])
def test_output_paths_the_guest_cannot_take_are_a_spec_error(path: str) -> None:
    """Regression: a lone surrogate from a job's JSON crashed the agent config encoder."""
    msg = {"event": "job", "uuid": "550e8400-e29b-41d4-a716-446655440000", "spec": default_spec(),
           "config": default_config(file_paths=[path])}  # fmt: skip
    with pytest.raises(SpecError) as err:
        build_config_from_job(parse_job(msg), HostSettings())
    str(err.value).encode("utf-8")


def _config(**fields: Any) -> JobConfig:
    return parse_job(job(**fields)).config


def test_image_reference_is_what_the_pull_parses() -> None:
    """The one builder of a job's image (the removed reference_for_job's cases, issue 14)."""
    digest = f"sha256:{'a' * 64}"
    image, insecure = image_reference(_config(registry="https://registry.bencher.dev", project=UUID))
    assert (image, insecure) == (f"registry.bencher.dev/{UUID}@{digest}", False)
    assert parse_reference(image, insecure=insecure) == ImageReference(
        "registry.bencher.dev", UUID, None, digest, insecure=False
    )
    for registry, scheme in (("http://127.0.0.1:5000/", "http"), ("127.0.0.1:5000", "https")):
        image, insecure = image_reference(_config(registry=registry, project=UUID))
        ref = parse_reference(image, insecure=insecure)
        assert (ref.scheme, ref.registry, ref.repository) == (scheme, "127.0.0.1:5000", UUID)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"registry": "ftp://x"}, "is not a registry "),
        ({"registry": "https://host/path"}, "is not a registry "),
        ({"registry": ""}, "is not a registry "),
        ({"digest": "latest"}, "config.digest='latest': expected sha256:"),
        ({"digest": f"sha256:{'A' * 64}"}, "expected sha256:<64 hex>"),
        ({"project": "../x"}, "expected the project UUID"),
        ({"project": ""}, "expected the project UUID"),
    ],
)
def test_image_reference_refuses(fields: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        image_reference(_config(**fields))
