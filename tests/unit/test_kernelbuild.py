"""The lean kernel's pure parts (config checks, make argv, progress) and its place in the cache."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bencher_runner.sandbox import kernelbuild
from bencher_runner.sandbox.initramfs import MODULES_DIR, base_entries
from bencher_runner.sandbox.kernel import (
    CLOUD_MEMORY_FLOOR_MIB,
    LEAN_MEMORY_FLOOR_MIB,
    KernelBundle,
    bundle_from,
    check_memory_floor,
    load_cached_bundle,
    resolve_bundle,
)
from bencher_runner.sandbox.kernelbuild import (
    REQUIRED_OPTIONS,
    BuildDisplay,
    BuildProgress,
    config_problems,
    config_sha256,
    install_lean,
    make_argv,
    parse_config,
    pinned_config,
    run_make,
)
from bencher_runner.sandbox.qemu import MACHINE, qemu_argv
from bencher_runner.sandbox.vm import VmSpec
from bencher_runner.sandbox.vmlinux import ensure_vmlinux
from bencher_runner.spec.errors import KernelBundleError, SpecError


def test_pinned_config_has_every_required_option() -> None:
    assert config_problems(pinned_config()) == []


def test_pinned_config_has_no_modules_and_no_initrd_decompressors() -> None:
    options = parse_config(pinned_config())
    assert options.get("CONFIG_MODULES", "n") == "n"
    assert all(options.get(f"CONFIG_RD_{c}", "n") == "n" for c in ("GZIP", "XZ", "ZSTD", "LZ4", "BZIP2"))


def test_parse_config_reads_set_unset_and_strings() -> None:
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\n# a comment\nCONFIG_D=64\n'
    assert parse_config(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x y"', "CONFIG_D": "64"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("# CONFIG_VIRTIO_BLK is not set\n", "CONFIG_VIRTIO_BLK=n (needs y)"),
        ("CONFIG_VIRTIO_BLK=m\n", "CONFIG_VIRTIO_BLK=m (needs y)"),
        ("", "CONFIG_VIRTIO_BLK=n (needs y)"),  # absent reads as not set
        ("CONFIG_MODULES=y\n", "CONFIG_MODULES=y (needs n)"),
    ],
)
def test_config_problems_name_each_wrong_option(text: str, problem: str) -> None:
    full = "\n".join(f"CONFIG_{n[7:]}={v}" if v != "n" else "" for n, v in REQUIRED_OPTIONS.items())
    name = problem.split("=")[0]
    kept = "\n".join(line for line in full.splitlines() if not line.startswith(name + "="))
    assert config_problems(kept + "\n" + text) == [problem]


def test_config_hash_changes_with_the_text() -> None:
    assert config_sha256("CONFIG_A=y\n") != config_sha256("CONFIG_A=n\n")
    assert len(config_sha256(pinned_config())) == 64


def test_make_argv() -> None:
    assert make_argv(Path("/b/linux"), 3) == ["make", "-C", "/b/linux", "-j3", "vmlinux"]


def test_progress_counts_compiled_objects_and_names_the_current_step() -> None:
    state = BuildProgress(total=10)
    lines = [
        "  SYNC    include/config/auto.conf\n",
        "  CC      kernel/fork.o\n",
        "make[2]: Entering directory '/x'\n",
        "  AS      arch/x86/entry/entry_64.o\n",
        "  AR      kernel/built-in.a\n",
        "kernel/fork.c:12: warning: unused variable\n",
    ]
    named = [state.feed(line) for line in lines]
    assert named == [True, True, False, True, True, False]
    assert state.compiled == 2
    assert state.current == "AR kernel/built-in.a"
    assert state.describe() == "2/~10 objects: AR kernel/built-in.a"


def test_plain_display_prints_phases_and_every_n_objects() -> None:
    lines: list[str] = []
    display = BuildDisplay(terminal=False, echo=lines.append)
    state = BuildProgress(total=1000)
    with display:
        display.phase("building")
        for i in range(450):
            state.feed(f"  CC      f{i}.o\n")
            display.progress(state)
    assert lines[0] == "building"
    assert [line.split(" ")[0] for line in lines[1:]] == ["200/~1000", "400/~1000"]


def test_failed_make_saves_its_last_lines_and_names_the_file(tmp_path: Path) -> None:
    script = "import sys; [print(f'  CC      f{i}.o') for i in range(100)]; print('fatal: boom'); sys.exit(2)"
    argv = [sys.executable, "-c", script]
    with pytest.raises(KernelBundleError) as caught:
        run_make(argv, tmp_path / "build.log")
    failed = tmp_path / "build-failed.log"
    assert str(failed) in str(caught.value) and "exit 2" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert failed.read_text().splitlines()[-1] == "fatal: boom"
    assert len(failed.read_text().splitlines()) == kernelbuild.FAILURE_TAIL
    assert "f0.o" in (tmp_path / "build.log").read_text()


def test_missing_tools_name_their_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kernelbuild, "LIBELF_HEADER", tmp_path / "gelf.h")
    missing = kernelbuild.missing_build_tools(lambda tool: None if tool in ("flex", "xz") else "/bin/" + tool)
    assert missing == ["flex", "xz-utils", "libelf-dev"]


def test_too_little_disk_space_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(KernelBundleError, match=r"not enough disk space .* MiB free, .* needed"):
        kernelbuild._check_space(tmp_path, need=1 << 60)


def fake_cloud(cache: Path) -> None:
    base = cache / "kernel"
    base.mkdir(parents=True)
    (base / "vmlinuz").write_bytes(b"MZ")
    (base / "modules").mkdir()
    (base / "modules" / "virtio_mmio.ko").write_bytes(b"")
    doc = {"release": "6.1.0-cloud", "kernel": "vmlinuz", "modules": ["modules/virtio_mmio.ko"]}
    (base / "bundle.json").write_text(json.dumps(doc))  # as fetched before bundles had a kind


def fake_lean(cache: Path) -> Path:
    built = cache / "src-vmlinux"
    built.write_bytes(b"\x7fELF lean")
    return install_lean(
        cache, built, "6.1.192-bencher-lean", "CONFIG_X=y\n", "ab" * 32, LEAN_MEMORY_FLOOR_MIB
    )


def test_cloud_bundle_is_the_default_without_a_lean_one(tmp_path: Path) -> None:
    fake_cloud(tmp_path)
    bundle = load_cached_bundle(tmp_path)
    assert (bundle.kind, bundle.release, bundle.memory_floor_mib) == (
        "cloud",
        "6.1.0-cloud",
        CLOUD_MEMORY_FLOOR_MIB,
    )
    assert bundle.modules


def test_built_lean_kernel_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCHER_RUNNER_KERNEL", raising=False)
    fake_cloud(tmp_path)
    kernel = fake_lean(tmp_path)
    bundle = resolve_bundle(tmp_path, None, None)
    assert bundle.kind == "lean" and bundle.kernel == kernel and bundle.modules == ()
    assert bundle.config_sha256 == "ab" * 32 and bundle.memory_floor_mib == LEAN_MEMORY_FLOOR_MIB
    assert "lean kernel 6.1.192-bencher-lean, config sha256 abababababab" in bundle.describe()
    doc = json.loads((kernel.parent / "bundle.json").read_text())
    assert doc["kind"] == "lean" and doc["modules"] == [] and doc["built_at"].endswith("Z")
    assert (kernel.parent / "config").read_text() == "CONFIG_X=y\n"


def test_kernel_flag_overrides_the_lean_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCHER_RUNNER_KERNEL", raising=False)
    fake_lean(tmp_path)
    own = tmp_path / "my-vmlinux"
    own.write_bytes(b"\x7fELF")
    bundle = resolve_bundle(tmp_path, own, None)
    assert (bundle.kernel, bundle.kind, bundle.memory_floor_mib) == (own, "custom", None)


def test_lean_kernel_with_its_file_gone_says_what_to_do(tmp_path: Path) -> None:
    kernel = fake_lean(tmp_path)
    kernel.unlink()
    with pytest.raises(KernelBundleError, match="runner kernel build` again, or remove"):
        load_cached_bundle(tmp_path)


def test_rebuild_replaces_the_lean_kernel(tmp_path: Path) -> None:
    fake_lean(tmp_path)
    built = tmp_path / "second"
    built.write_bytes(b"\x7fELF second")
    kernel = install_lean(tmp_path, built, "6.1.192-b", "C\n", "cd" * 32, 50)
    assert kernel.read_bytes() == b"\x7fELF second"
    assert load_cached_bundle(tmp_path).config_sha256 == "cd" * 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel-lean", "second", "src-vmlinux"]


def bundle(kind: str, floor: int | None) -> KernelBundle:
    return KernelBundle(Path("/k"), (), "6.1.x", kind=kind, memory_floor_mib=floor)


FLOORS = [("lean", LEAN_MEMORY_FLOOR_MIB), ("cloud", CLOUD_MEMORY_FLOOR_MIB)]


@pytest.mark.parametrize(("kind", "floor"), FLOORS)
def test_memory_below_the_floor_is_refused_with_the_numbers(kind: str, floor: int) -> None:
    with pytest.raises(SpecError) as caught:
        check_memory_floor(bundle(kind, floor), floor - 1)
    text = str(caught.value)
    assert f"--memory {floor - 1} MiB" in text and f"({floor} MiB)" in text and kind in text
    assert f"the guest kernel needs {floor} MiB to boot" in text


FLOORS = [("lean", LEAN_MEMORY_FLOOR_MIB), ("cloud", CLOUD_MEMORY_FLOOR_MIB)]


@pytest.mark.parametrize(("kind", "floor"), FLOORS)
def test_memory_at_the_floor_is_accepted(kind: str, floor: int) -> None:
    check_memory_floor(bundle(kind, floor), floor)
    check_memory_floor(bundle(kind, floor), floor + 512)


def test_own_kernel_has_no_floor() -> None:
    check_memory_floor(bundle("custom", None), 1)


def test_floors_are_measured_values() -> None:
    # the issue: --memory 64 panics the cloud kernel; the lean one must run the example in 64 MiB
    assert 0 < LEAN_MEMORY_FLOOR_MIB <= 64 < CLOUD_MEMORY_FLOOR_MIB


def test_initramfs_has_no_module_dir_without_modules(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    agent.write_bytes(b"agent")
    names = [e.name for e in base_entries(agent, [])]
    assert MODULES_DIR not in names and "init" in names
    module = tmp_path / "virtio.ko"
    module.write_bytes(b"ko")
    assert MODULES_DIR in [e.name for e in base_entries(agent, [module])]


def test_an_elf_kernel_is_booted_as_it_is(tmp_path: Path) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\x7fELF" + b"\0" * 60)
    assert ensure_vmlinux(vmlinux, vmlinux) == vmlinux
    assert vmlinux.read_bytes().startswith(b"\x7fELF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmlinux"]  # no stamp, no copy


def test_the_config_is_in_the_installed_package() -> None:
    code = "from bencher_runner.sandbox.kernelbuild import pinned_config; print(len(pinned_config()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(out.stdout) > 1000


def test_lean_kernel_named_with_kernel_flag_keeps_its_metadata(tmp_path: Path) -> None:
    """`--kernel .../kernel-lean/vmlinux` is the lean kernel: its floor and its ACPI-less boot hold."""
    kernel = fake_lean(tmp_path)
    named = bundle_from(kernel, None)
    assert (named.kind, named.acpi, named.memory_floor_mib) == ("lean", False, LEAN_MEMORY_FLOOR_MIB)
    other = tmp_path / "kernel-lean" / "other-vmlinux"
    other.write_bytes(b"\x7fELF")
    assert bundle_from(other, None).kind == "custom"  # another file beside it is the user's own


def test_cloud_and_own_kernels_boot_with_acpi(tmp_path: Path) -> None:
    fake_cloud(tmp_path)
    assert load_cached_bundle(tmp_path).acpi
    own = tmp_path / "mine"
    own.write_bytes(b"\x7fELF")
    assert bundle_from(own, None).acpi


def test_qemu_turns_acpi_off_only_for_a_kernel_without_it() -> None:
    files = (Path("/k"), Path("/i"), Path("/r"), Path("/o"), Path("/s"))
    assert qemu_argv("qemu", VmSpec(*files, 1, 64, "tcg"))[2] == MACHINE
    machine = qemu_argv("qemu", VmSpec(*files, 1, 64, "tcg", acpi=False))[2]
    assert machine.startswith("microvm,") and machine.endswith(",acpi=off")


def test_fetched_cloud_kernel_named_with_kernel_flag_keeps_its_floor(tmp_path: Path) -> None:
    fake_cloud(tmp_path)
    for name in ("vmlinuz", "vmlinux"):
        (tmp_path / "kernel" / name).write_bytes(b"k")
        named = bundle_from(tmp_path / "kernel" / name, None)
        assert (named.kind, named.memory_floor_mib, named.acpi) == ("cloud", CLOUD_MEMORY_FLOOR_MIB, True)
        assert named.kernel == tmp_path / "kernel" / name
