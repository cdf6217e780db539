"""Job benchmarks: the runner's own overhead around a VM, and where a job's time goes.

    .venv/bin/python -m bench.job [--repeat N] [--json OUT]

1. warm job: `runner run` wall time on the example image (template and KVM probe cached) against a
   hand-written `qemu-system-x86_64 -M microvm` command booting the same kernel (the uncompressed
   vmlinux the runner boots), initramfs (agent + modules + the same job config), a copy of the same
   root disk and an output disk. Goal <= 1.02.
2. boot to command: the guest agent's timestamp of the command's start (guest clock since the
   kernel started), on the accel this host gives (TCG here).
3. job phases of a cold and a warm job of the realistic image pulled from a loopback registry
   (`runner run --json` timings: pull, unpack, mkfs, disk copy, boot, command, collect), for the plot.
Medians over --repeat; this machine is noisy.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bencher_runner.oci.layout import open_layout
from bencher_runner.paths import cache_dir
from bencher_runner.rootfs import TemplateCache, template_key
from bencher_runner.sandbox.agent import find_agent
from bencher_runner.sandbox.agentconfig import AgentConfig, encode_agent_config
from bencher_runner.sandbox.initramfs import base_initramfs, write_job_initramfs
from bencher_runner.sandbox.kernel import KernelBundle, load_cloud_bundle, load_lean_bundle
from bencher_runner.sandbox.outputdisk import create_output_disk, read_output_disk
from bencher_runner.sandbox.qemu import qemu_argv
from bencher_runner.sandbox.vm import VmSpec, guest_cmdline, read_host_tsc_khz
from bencher_runner.sandbox.vmlinux import extract_vmlinux

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples/hello/oci"
RUNNER = [sys.executable, "-m", "bencher_runner", "run", "--image", f"{IMAGE}:latest", "--accel", "tcg", "-q"]


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - t0


def hand_qemu(tmp: Path, bundle: KernelBundle) -> float:
    """The reference: QEMU started by hand with everything prepared beforehand (not timed)."""
    cache = cache_dir()
    image = open_layout(f"{IMAGE}:latest")
    template = TemplateCache(cache).get(template_key(image.manifest_digest, 1024))
    assert template is not None, "run `runner run` on the example once first"
    base = base_initramfs(cache, find_agent(), bundle.modules)
    cfg = AgentConfig(
        argv=("/bench/bench.sh",), env=(("PATH", "/bin"), ("HOME", "/bench")), cwd="/bench",
        uid=1000, gid=1000, groups=(), max_output=25 << 20,
    )  # fmt: skip
    initrd, rootfs, out = tmp / "initrd.cpio", tmp / "rootfs.ext4", tmp / "out.img"
    write_job_initramfs(base, encode_agent_config(cfg), initrd)
    shutil.copyfile(template.disk, rootfs)
    create_output_disk(out, 54 << 20)
    vmlinux = extract_vmlinux(bundle.kernel, bundle.kernel.parent / "vmlinux")  # what the runner boots
    spec = VmSpec(
        kernel=vmlinux, initrd=initrd, rootfs=rootfs, output_disk=out, serial_log=tmp / "serial.log",
        vcpus=1, memory_mib=512, accel="tcg",
        cmdline=guest_cmdline("tcg", read_host_tsc_khz(), lean=bundle.kind == "lean"),  # the runner's line
        acpi=bundle.acpi,  # the lean kernel has no ACPI: QEMU names its devices on the command line
    )  # fmt: skip
    elapsed = timed(qemu_argv(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", spec))
    report = read_output_disk(out, max_output=1 << 20, requested=())
    assert report.exit is not None and report.exit.exit_code == 0, report
    return elapsed


PHASE_KEYS = ("pull_s", "unpack_s", "mkfs_s", "disk_copy_s", "boot_to_command_s", "command_s", "collect_s")


def job_phases(timings: dict[str, float]) -> dict[str, float]:
    """A result's timings as the plot's phases; `vm other` is QEMU start, shutdown and result writing,
    `other` everything else of ours (tuning, initramfs, work dir)."""
    phases = {k.removesuffix("_s"): timings.get(k, 0.0) for k in PHASE_KEYS}
    phases["vm other"] = max(0.0, timings.get("vm_s", 0.0) - phases["boot_to_command"] - phases["command"])
    phases["other"] = max(0.0, timings.get("total_s", 0.0) - sum(phases.values()))
    phases["total"] = timings.get("total_s", 0.0)
    return phases


def realistic_phases(repeat: int) -> dict[str, dict[str, float]]:
    """Cold (empty blob cache, no template) and warm jobs of the realistic image from a registry."""
    from bench.images import loopback_registry, push, realistic_layout

    cold: list[dict[str, float]] = []
    warm: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp_name:
        tmp = Path(tmp_name)
        with loopback_registry(tmp) as reg:
            digest = push(realistic_layout(), reg, "proj", "v1")
            ref = f"{reg.host}/proj@{digest}"
            for i in range(repeat):
                cache = tmp / f"cache-{i}"
                for sub in ("kernel", "initramfs"):
                    (cache / sub).parent.mkdir(parents=True, exist_ok=True)
                    (cache / sub).symlink_to(cache_dir() / sub)  # the vmlinux stays the prepared one
                shutil.copy(cache_dir() / "accel.json", cache / "accel.json")
                argv = [
                    sys.executable, "-m", "bencher_runner", "run", "--image", ref, "--insecure-registry",
                    "--cache-dir", str(cache), "--accel", "tcg", "--json", "-q",
                ]  # fmt: skip
                for runs in (cold, warm):
                    doc = json.loads(subprocess.run(argv, check=True, capture_output=True).stdout)
                    assert doc["status"] == "completed", doc
                    runs.append(job_phases(doc["timings"]))
                shutil.rmtree(cache)
    return {
        "cold": {k: statistics.median(r[k] for r in cold) for k in cold[0]},
        "warm": {k: statistics.median(r[k] for r in warm) for k in warm[0]},
    }


def kernels() -> list[tuple[str, list[str], KernelBundle]]:
    """(name, `runner run` flags, bundle) of the cloud kernel and, when one is built, the lean one."""
    cache = cache_dir()
    cloud = load_cloud_bundle(cache)
    found = [
        (
            "cloud",
            ["--kernel", str(cloud.kernel), "--kernel-modules", str(cloud.kernel.parent / "modules")],
            cloud,
        )
    ]
    lean = load_lean_bundle(cache)
    if lean is not None:
        found.append(("lean", ["--kernel", str(lean.kernel)], lean))
    return found


def warm_job(repeat: int, flags: list[str], bundle: KernelBundle) -> dict[str, float]:
    """`runner run` of the warm example against the hand-written QEMU, both booting ``bundle``."""
    argv = [*RUNNER, *flags]
    subprocess.run(argv, check=True, capture_output=True)  # warm: template, probe, initramfs
    ours, reference, boot = [], [], []
    for _ in range(repeat):
        ours.append(timed(argv))
        doc = json.loads(subprocess.run([*argv, "--json"], check=True, capture_output=True).stdout)
        boot.append(doc["timings"]["boot_to_command_s"])
        with tempfile.TemporaryDirectory() as tmp:
            reference.append(hand_qemu(Path(tmp), bundle))
    runner_s, hand_s = statistics.median(ours), statistics.median(reference)
    return {
        "runner_s": runner_s,
        "hand_qemu_s": hand_s,
        "ratio": runner_s / hand_s,
        "boot": statistics.median(boot),
    }


def run(repeat: int = 3) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The figures, and the phases of a cold and a warm realistic job (for the plot). The warm job
    against the hand-written QEMU: with the cloud kernel (``warm_job_*``: the goal's figure) and, when
    built, the lean one (``warm_job_lean_*``)."""
    results: dict[str, float] = {}
    for name, flags, bundle in kernels():
        r = warm_job(repeat, flags, bundle)
        prefix = "warm_job" if name == "cloud" else f"warm_job_{name}"
        results[f"{prefix}_runner_s"] = r["runner_s"]
        results[f"{prefix}_hand_qemu_s"] = r["hand_qemu_s"]
        results[f"{prefix}_ratio"] = r["ratio"]
        results["boot_to_command_s" if name == "cloud" else f"boot_to_command_{name}_s"] = r["boot"]
        print(
            f"warm job, {bundle.describe()}: runner run {r['runner_s']:.2f} s / hand-written QEMU "
            f"{r['hand_qemu_s']:.2f} s = {r['ratio']:.3f} (goal <= 1.02); "
            f"boot to command (guest clock, tcg) {r['boot']:.2f} s",
            flush=True,
        )

    phases = realistic_phases(repeat)
    for kind, values in phases.items():
        shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items() if k != "total" and v >= 0.005)
        print(f"{kind} realistic-image job: {values['total']:.2f} s ({shown}) s")
        for k, v in values.items():
            results[f"job_{kind}_{k.replace(' ', '_')}_s"] = v
    return results, phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results, _ = run(args.repeat)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
