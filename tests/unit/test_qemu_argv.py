from pathlib import Path

import pytest

from bencher_runner.sandbox.accel import choose_accel
from bencher_runner.sandbox.qemu import qemu_argv
from bencher_runner.sandbox.vm import GUEST_CMDLINE, VmSpec, guest_cmdline, host_tsc_khz
from bencher_runner.spec.errors import SandboxError


def spec(accel: str = "tcg", **kw: object) -> VmSpec:
    base: dict[str, object] = dict(
        kernel=Path("/k"), initrd=Path("/i"), rootfs=Path("/r.ext4"), output_disk=Path("/o.img"),
        serial_log=Path("/s.log"), vcpus=2, memory_mib=768, accel=accel,
    )  # fmt: skip
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def test_resources_and_no_network() -> None:
    argv = qemu_argv("qemu", spec())
    assert argv[argv.index("-smp") + 1] == "2"
    assert argv[argv.index("-m") + 1] == "768"
    assert argv[argv.index("-nic") + 1] == "none"
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert not any("netdev" in a or "virtio-net" in a for a in argv)


def test_accel_flags() -> None:
    assert "tcg" in qemu_argv("q", spec("tcg"))
    kvm = qemu_argv("q", spec("kvm"))
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"


def test_both_disks_and_cmdline() -> None:
    argv = qemu_argv("q", spec())
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert any("file=/r.ext4" in d for d in drives) and any("file=/o.img" in d for d in drives)
    cmdline = argv[argv.index("-append") + 1]
    for word in ("norandmaps", "nokaslr", "transparent_hugepage=never", "console=ttyS0"):
        assert word in cmdline.split()


def test_comma_in_path_is_refused() -> None:
    with pytest.raises(SandboxError, match="comma"):
        qemu_argv("q", spec(rootfs=Path("/a,b/r.ext4")))


def test_choose_accel() -> None:
    def never() -> str | None:
        raise AssertionError("tcg must not probe")

    assert choose_accel("tcg", never).accel == "tcg"
    auto_ok = choose_accel("auto", lambda: None)
    assert auto_ok.accel == "kvm" and auto_ok.warning is None
    fallback = choose_accel("auto", lambda: "nested KVM hangs")
    assert fallback.accel == "tcg"
    assert fallback.warning is not None and "nested KVM hangs" in fallback.warning


CPUINFO = "processor\t: 0\ncpu MHz\t\t: 2599.998\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n"


def test_host_tsc_khz() -> None:
    assert host_tsc_khz(CPUINFO) == 2599998
    assert host_tsc_khz(CPUINFO.replace("constant_tsc ", "")) is None
    assert host_tsc_khz("nothing") is None


def test_tcg_gets_the_tsc_frequency_kvm_does_not() -> None:
    assert "tsc_early_khz=2600000" in guest_cmdline("tcg", 2600000)
    assert "tsc_early_khz" not in guest_cmdline("kvm", 2600000)
    assert "tsc_early_khz" not in guest_cmdline("tcg", None)


def test_only_the_lean_kernel_under_tcg_skips_the_timer_checks() -> None:
    line = guest_cmdline("tcg", 2600000, lean=True)
    assert line.endswith(" tsc_early_khz=2600000 no_timer_check noapictimer")
    assert "noapictimer" not in guest_cmdline("tcg", 2600000)  # the cloud kernel's line is unchanged
    assert "noapictimer" not in guest_cmdline("kvm", 2600000, lean=True)  # KVM: TSC deadline, no check
    assert guest_cmdline("kvm", None, lean=True) == GUEST_CMDLINE


def test_network_adds_one_virtio_nic() -> None:
    from bencher_runner.sandbox.network import user_nat

    argv = qemu_argv("q", spec(network=user_nat()))
    assert "-nic" not in argv
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices.count("virtio-net-device,netdev=net0") == 1


def test_qemu_names_its_vcpu_threads_so_that_pinning_finds_them() -> None:
    """Without debug-threads every QEMU thread is "qemu-system-x86" and no vCPU is pinned on its own."""
    from bencher_runner.host.cpus import vcpu_assignment

    argv = qemu_argv("qemu-system-x86_64", spec())
    assert argv[argv.index("-name") + 1].split(",")[1] == "debug-threads=on"
    comms = {10: "qemu-system-x86", 11: "CPU 0/KVM", 12: "CPU 1/KVM", 13: "worker"}
    assert vcpu_assignment(comms, (2, 3)) == {10: 3, 11: 2, 12: 3, 13: 3}
