"""Benchmarks: ratios against references measured in the same run (medians; this machine is noisy).

    .venv/bin/python bench/run.py [--repeat N] [--json OUT]

1. warm job: `runner run` wall time on the example image (template and KVM probe cached) against a
   hand-written `qemu-system-x86_64 -M microvm` command booting the same kernel, initramfs (agent +
   modules + the same job config), a copy of the same root disk and an output disk. Goal <= 1.05.
2. image prep: a cold prep (unpack + mkfs + the job's disk copy, template cache emptied for this image)
   against a warm one (template lookup + the job's disk copy). Goal warm / cold <= 0.05.
Not measured yet (see the issues): registry pulls against skopeo + umoci + mkfs, daemon heartbeats
under load, cancel latency, RSS.
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
from bencher_runner.sandbox.kernel import resolve_bundle
from bencher_runner.sandbox.outputdisk import create_output_disk, read_output_disk
from bencher_runner.sandbox.qemu import qemu_argv
from bencher_runner.sandbox.vm import VmSpec, guest_cmdline, read_host_tsc_khz

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples/hello/oci"
RUNNER = [sys.executable, "-m", "bencher_runner", "run", "--image", f"{IMAGE}:latest", "--accel", "tcg", "-q"]


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - t0


def hand_qemu(tmp: Path) -> float:
    """The reference: QEMU started by hand with everything prepared beforehand (not timed)."""
    cache = cache_dir()
    image = open_layout(f"{IMAGE}:latest")
    template = TemplateCache(cache).get(template_key(image.manifest_digest, 1024))
    assert template is not None, "run `runner run` on the example once first"
    bundle = resolve_bundle(cache, None, None)
    base = base_initramfs(cache, find_agent(), bundle.modules)
    cfg = AgentConfig(
        argv=("/bench/bench.sh",), env=(("PATH", "/bin"), ("HOME", "/bench")), cwd="/bench",
        uid=1000, gid=1000, groups=(), max_output=25 << 20,
    )  # fmt: skip
    initrd, rootfs, out = tmp / "initrd.cpio", tmp / "rootfs.ext4", tmp / "out.img"
    write_job_initramfs(base, encode_agent_config(cfg), initrd)
    shutil.copyfile(template.disk, rootfs)
    create_output_disk(out, 54 << 20)
    spec = VmSpec(
        kernel=bundle.kernel, initrd=initrd, rootfs=rootfs, output_disk=out, serial_log=tmp / "serial.log",
        vcpus=1, memory_mib=512, accel="tcg", cmdline=guest_cmdline("tcg", read_host_tsc_khz()),
    )  # fmt: skip
    elapsed = timed(qemu_argv(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", spec))
    report = read_output_disk(out, max_output=1 << 20)
    assert report.exit is not None and report.exit.exit_code == 0, report
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    subprocess.run(RUNNER, check=True, capture_output=True)  # warm: template, probe, initramfs
    results: dict[str, float] = {}

    ours, reference = [], []
    for _ in range(args.repeat):
        ours.append(timed(RUNNER))
        with tempfile.TemporaryDirectory() as tmp:
            reference.append(hand_qemu(Path(tmp)))
    results["warm_job_runner_s"] = statistics.median(ours)
    results["warm_job_hand_qemu_s"] = statistics.median(reference)
    results["warm_job_ratio"] = results["warm_job_runner_s"] / results["warm_job_hand_qemu_s"]

    image = open_layout(f"{IMAGE}:latest")
    key = template_key(image.manifest_digest, 1024)
    cold, warm = [], []
    for _ in range(args.repeat):
        for suffix in (".ext4", ".json"):
            (cache_dir() / "rootfs" / f"{key}{suffix}").unlink(missing_ok=True)
        doc = json.loads(subprocess.run([*RUNNER, "--json"], check=True, capture_output=True).stdout)
        cold.append(doc["timings"]["rootfs_s"] + doc["timings"]["disk_copy_s"])
        doc = json.loads(subprocess.run([*RUNNER, "--json"], check=True, capture_output=True).stdout)
        warm.append(doc["timings"]["rootfs_s"] + doc["timings"]["disk_copy_s"])
    results["prep_cold_s"] = statistics.median(cold)
    results["prep_warm_s"] = statistics.median(warm)
    results["prep_warm_over_cold"] = results["prep_warm_s"] / results["prep_cold_s"]

    print(
        f"warm job: runner run {results['warm_job_runner_s']:.2f} s / hand-written QEMU "
        f"{results['warm_job_hand_qemu_s']:.2f} s = {results['warm_job_ratio']:.3f} (goal <= 1.05)"
    )
    print(
        f"image prep (example image, 1024 MiB disk): warm {results['prep_warm_s'] * 1000:.1f} ms / cold "
        f"{results['prep_cold_s'] * 1000:.1f} ms = {results['prep_warm_over_cold']:.3f} (goal <= 0.05)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
