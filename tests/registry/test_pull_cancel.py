"""A cancel reaches a pull wherever it waits: in a retry backoff, before a request, on a blob lock.

The registry's retry backoff slept with time.sleep (0.5 + 1 + 2 + 4 s with the default four retries),
so a cancel during a 503 storm took about 7.6 s to end the job. These tests cancel 0.5 s into such a
pull and require it to return within 1 s of the cancel (the default retries and backoff are used, so
an uncancellable sleep cannot hide). Everything runs against loopback only.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bencher_runner.oci.pull import pull_image
from bencher_runner.oci.reference import parse_reference
from bencher_runner.oci.source import open_image
from bencher_runner.spec.errors import CanceledError
from tests.registry.conftest import FakeRegistry, Stall
from tests.support.oci_builder import build_layout, file, manifest_of

CANCEL_AFTER_S = 0.5
RETURN_WITHIN_S = 1.0


def busy(fake: FakeRegistry, path: str, status: int = 503, **headers: str) -> None:
    body = b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}'
    fake.routes[path] = (status, headers, body)


def serve(fake: FakeRegistry, tmp_path: Path, layers: int = 1) -> dict[str, Any]:
    layout = tmp_path / "img"
    entries = [[file(f"a{i}", "x" * 1000 * (i + 1))] for i in range(layers)]
    build_layout(layout, entries, {"Cmd": ["/a"]}, tag="v1", arch="amd64")
    fake.load_layout(layout, "hostile", "v1")
    return manifest_of(layout, "v1")[1]


class _StampedTimer(threading.Timer):
    """A Timer that notes when it fired: the test measures from the cancel, not from the pull's start."""

    started_at = 0.0

    def run(self) -> None:
        self.finished.wait(self.interval)
        if not self.finished.is_set():
            self.started_at = time.monotonic()
            self.function(*self.args, **self.kwargs)
        self.finished.set()


def run_cancel(pull: Callable[[threading.Event], object]) -> tuple[BaseException | None, float]:
    """Run ``pull(cancel)`` and set ``cancel`` after CANCEL_AFTER_S: (what it raised, seconds from the
    cancel to its return)."""
    cancel = threading.Event()
    timer = _StampedTimer(CANCEL_AFTER_S, cancel.set)
    timer.start()
    error: BaseException | None = None
    try:
        pull(cancel)
    except BaseException as e:
        error = e
    timer.cancel()
    done = time.monotonic()
    assert cancel.is_set(), "the pull ended before the cancel: the test proves nothing"
    return error, done - timer.started_at


def pull_with(fake: FakeRegistry, tmp_path: Path, ref: str = "v1") -> Callable[[threading.Event], object]:
    def go(cancel: threading.Event) -> object:
        return pull_image(
            parse_reference(f"{fake.host}/hostile:{ref}", insecure=True),
            cache_dir=tmp_path / "cache",
            cancel=cancel,
        )

    return go


def test_a_503_storm_on_the_manifest_ends_within_a_second_of_the_cancel(
    fake_registry: FakeRegistry, tmp_path: Path
) -> None:
    busy(fake_registry, "/v2/hostile/manifests/v1")
    error, after = run_cancel(pull_with(fake_registry, tmp_path))
    assert isinstance(error, CanceledError), repr(error)
    assert after < RETURN_WITHIN_S, f"returned {after:.2f} s after the cancel"
    assert str(error) == "the job was canceled while its image was pulled"


def test_a_429_with_a_long_retry_after_on_a_blob(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    manifest = serve(fake_registry, tmp_path)
    busy(fake_registry, f"/v2/hostile/blobs/{manifest['layers'][0]['digest']}", 429, **{"Retry-After": "30"})
    error, after = run_cancel(pull_with(fake_registry, tmp_path))
    assert isinstance(error, CanceledError), repr(error)
    assert after < RETURN_WITHIN_S, f"returned {after:.2f} s after the cancel"


def test_a_token_service_that_is_down(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    realm = f'Bearer realm="http://{fake_registry.host}/token",service="svc"'
    fake_registry.routes["/v2/hostile/manifests/v1"] = (401, {"WWW-Authenticate": realm}, b"")
    busy(fake_registry, "/token", 502)
    error, after = run_cancel(pull_with(fake_registry, tmp_path))
    assert isinstance(error, CanceledError), repr(error)
    assert after < RETURN_WITHIN_S, f"returned {after:.2f} s after the cancel"


def test_a_registry_that_refuses_connections(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def go(cancel: threading.Event) -> object:
        return open_image(f"http://127.0.0.1:{port}/p:v1", cache_dir=tmp_path / "cache", cancel=cancel)

    error, after = run_cancel(go)
    assert isinstance(error, CanceledError), repr(error)
    assert after < RETURN_WITHIN_S, f"returned {after:.2f} s after the cancel"


def test_a_cancel_before_the_pull_sends_nothing(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    serve(fake_registry, tmp_path)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CanceledError):
        pull_with(fake_registry, tmp_path)(cancel)
    assert fake_registry.log == []


def test_a_job_canceled_during_retries_fails_as_canceled_at_once(
    fake_registry: FakeRegistry, tmp_path: Path
) -> None:
    from bencher_runner.job import run_job
    from bencher_runner.spec.config import make_run_config

    busy(fake_registry, "/v2/hostile/manifests/v1")
    config = make_run_config(image=f"http://{fake_registry.host}/hostile:v1", backend="none", cmd=("true",))
    results: list[Any] = []
    error, after = run_cancel(lambda cancel: results.append(run_job(config, cache=tmp_path, cancel=cancel)))
    assert error is None
    assert after < RETURN_WITHIN_S, f"returned {after:.2f} s after the cancel"
    (result,) = results
    assert result.status == "failed" and isinstance(result.failure, CanceledError), result.error


# --- a registry that stops answering: the read is broken off, not waited out ---------------------------


def test_a_registry_that_never_answers_the_manifest(fake_registry: FakeRegistry, tmp_path: Path) -> None:
    fake_registry.routes["/v2/hostile/manifests/v1"] = fake_registry.stall
    error, after = run_cancel(pull_with(fake_registry, tmp_path))
    assert isinstance(error, CanceledError), repr(error)
    assert after < RETURN_WITHIN_S, f"returned {after:.2f} s after the cancel"


@pytest.mark.parametrize("parallel", [1, 3])
def test_a_registry_that_hangs_mid_blob(fake_registry: FakeRegistry, tmp_path: Path, parallel: int) -> None:
    manifest = serve(fake_registry, tmp_path, layers=3)
    for layer in manifest["layers"]:
        path = f"/v2/hostile/blobs/{layer['digest']}"
        _, _, body = fake_registry.routes[path]  # type: ignore[misc]
        fake_registry.stalls[path] = Stall(body[: len(body) // 2], len(body))

    def go(cancel: threading.Event) -> object:
        return pull_image(
            parse_reference(f"{fake_registry.host}/hostile:v1", insecure=True),
            cache_dir=tmp_path / "cache",
            cancel=cancel,
            parallel=parallel,
        )

    error, after = run_cancel(go)
    assert isinstance(error, CanceledError), repr(error)
    assert after < RETURN_WITHIN_S, f"returned {after:.2f} s after the cancel"
    assert not list((tmp_path / "cache" / "blobs" / "sha256").glob(".tmp-*"))  # the partial blob is gone
