from pathlib import Path

import pytest

from bencher_runner.sandbox import kernel
from bencher_runner.sandbox.kernel import (
    bundle_from,
    load_cached_bundle,
    load_cloud_bundle,
    load_order,
    resolve_bundle,
)
from bencher_runner.spec.errors import KernelBundleError

DEPENDS = {
    "virtio_ring": "",
    "virtio": "virtio_ring",
    "virtio_mmio": "virtio,virtio_ring",
    "virtio_blk": "virtio,virtio_ring",
    "virtio_net": "virtio_ring,virtio,net_failover",
    "net_failover": "failover",
    "failover": "",
}


@pytest.fixture
def fake_modinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "modinfo", lambda path: {"depends": DEPENDS[path.stem]})


def available(names: list[str]) -> dict[str, Path]:
    return {n: Path(f"/m/{n}.ko") for n in names}


def test_dependencies_come_first(fake_modinfo: None) -> None:
    order = load_order(["virtio_mmio", "virtio_blk", "virtio_net"], available(list(DEPENDS)))
    assert order == [
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
    ]
    for name in order:
        for dep in filter(None, DEPENDS[name].split(",")):
            assert order.index(dep) < order.index(name)


def test_builtin_drivers_are_skipped(fake_modinfo: None) -> None:
    assert load_order(["virtio_mmio", "virtio_blk"], {}) == []


def test_missing_dependency_is_a_clear_error(fake_modinfo: None) -> None:
    with pytest.raises(KernelBundleError, match="virtio_blk needs virtio"):
        load_order(["virtio_blk"], available(["virtio_blk", "virtio_ring"]))


def test_cached_bundle_missing_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(KernelBundleError, match="runner kernel fetch"):
        load_cached_bundle(tmp_path)


def test_user_kernel_must_exist(tmp_path: Path) -> None:
    with pytest.raises(KernelBundleError, match="does not exist"):
        bundle_from(tmp_path / "nope", None)


def test_modules_without_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCHER_RUNNER_KERNEL", raising=False)
    with pytest.raises(KernelBundleError, match="needs --kernel"):
        resolve_bundle(tmp_path, None, tmp_path)


def test_user_kernel_with_real_module_tree(tmp_path: Path) -> None:
    """Reads .modinfo from real modules when the fetched bundle is there (it is after `make setup`)."""
    from bencher_runner.paths import cache_dir

    try:
        fetched = load_cloud_bundle(cache_dir())  # the lean kernel, when built, has no modules
    except KernelBundleError:
        pytest.skip("no fetched kernel bundle (run `make setup`)")
    bundle = bundle_from(fetched.kernel, fetched.modules[0].parent)
    names = [m.stem for m in bundle.modules]
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_blk")
    assert "virtio_mmio" in names
