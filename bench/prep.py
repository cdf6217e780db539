"""Image-prep benchmarks (issues #3, #8): registry pull + unpack + root disk, against skopeo + umoci + mkfs.

    .venv/bin/python -m bench.prep [--repeat N] [--json OUT] [--profile OUT_PREFIX]

All figures are medians over ``--repeat`` runs on the same image in the same run (this host is noisy),
quoted as ratios against a reference measured alongside, as shared/design/BENCHMARKS.md asks:

1. cold image prep: what a cold ``runner run`` job does before boot with an empty blob cache and no
   root-disk template (pull from a loopback docker-registry, unpack, ``mkfs.ext4 -d`` of a 1024 MiB
   disk, the job's disk copy), against ``skopeo copy`` + ``umoci unpack`` + ``mkfs.ext4 -d`` on a
   1024 MiB file. Goal <= 0.40. Each phase of both is reported.
2. warm image prep (blobs and template cached: manifest read from the cache, template lookup, the
   iteration's disk) against the cold prep, with the spare disk the daemon copied while idle (goal
   <= 0.01) and with a copy of the template instead (a job's later iterations, or no idle time).
   Ours names the image by digest, as Bencher jobs do.
3. incremental image prep (issue #16): a second image, the realistic one plus a layer adding
   1 MiB, prepared on the cache the cold run left (its lower layer's root disk cached: pull of the
   manifest and the new layer, a copy of the cached disk with the new layer applied, the job's disk
   copy), against the cold prep of that same image on an empty cache. Goal <= 0.15.
4. peak RSS of a fresh process pulling (and, separately, pulling + unpacking) a 512 MiB layer.
   Goal <= 120 MiB.

"Ours" calls the same library functions, in the same order, as ``job.py`` does (``Job._run``,
``Job._unpack``, ``Job._run_in``, ``Job._iterations``), so it measures the runner without a VM.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import json
import os
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tests.support.oci_builder import (
    OCI_CONFIG,
    OCI_LAYER_TYPES,
    OCI_MANIFEST,
    REF_NAME,
    directory,
    file,
    layer_bytes,
    read_json_blob,
    sha256,
    write_blob,
    write_index,
    write_json_blob,
)

from bench.images import big_layer_layout, layer_sizes, loopback_registry, push, realistic_layout
from bencher_runner.job import Job
from bencher_runner.oci.blobcache import image_cache_dir
from bencher_runner.oci.source import open_image
from bencher_runner.rootfs import TemplateCache, copy_disk, template_key
from bencher_runner.sparedisk import SpareDisks
from bencher_runner.spec.config import make_run_config

DISK_MIB = 1024
MKFS_REFERENCE = ["mkfs.ext4", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
GOAL_COLD = 0.40
GOAL_WARM = 0.01
GOAL_INCREMENTAL = 0.15
NEW_LAYER_MIB = 1
GOAL_RSS_MIB = 120
BIG_LAYER_MIB = 512

Phases = dict[str, float]


class Stopwatch:
    """``mark(name)`` adds the time since the previous mark to ``phases[name]``."""

    def __init__(self) -> None:
        self.phases: Phases = {}
        self._last = time.monotonic()

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now

    def done(self) -> Phases:
        return {**self.phases, "total": sum(self.phases.values())}


# --- ours ---------------------------------------------------------------------------------------------


def ours_cold(ref: str, cache: Path, work: Path, *, built: str = "full") -> Phases:
    """A job's prep without a cached template, as job.py does it: pull, the template
    (Job._build_template: unpack in memory when it fits + mkfs, or from a cached base of the image's
    lower layers when there is one: ``built`` says which is expected), the iteration's copy."""
    watch = Stopwatch()
    mark = watch.mark
    image = open_image(ref, cache_dir=image_cache_dir(cache), insecure=True)
    mark("pull")
    templates = TemplateCache(cache)
    key = template_key(image.manifest_digest, DISK_MIB)
    assert templates.get(key) is None, "the template cache must not hold this image"
    job = Job(make_run_config(image=ref, disk_mib=DISK_MIB), cache=cache)
    template = job.disks.build_template(work, image, templates, key)
    root_disk = job.ctx.metadata["root_disk"]
    assert isinstance(root_disk, dict) and root_disk["built"] == built, root_disk
    mark("rootfs")
    timings = job.ctx.timings
    rootfs = watch.phases.pop("rootfs")
    for name in ("unpack", "mkfs", "incremental"):
        if f"{name}_s" in timings:
            watch.phases[name] = timings[f"{name}_s"]
            rootfs -= timings[f"{name}_s"]
    watch.phases["put"] = rootfs  # template and layer-chain caches, removing the tree
    disk = work / "iter-1" / "rootfs.ext4"
    disk.parent.mkdir()
    copy_disk(template.disk, disk)
    mark("copy")
    disk.unlink()  # job.py frees it after the VM; not timed
    return watch.done()


def plus_layer_layout(realistic: Path, dest: Path) -> Path:
    """The realistic image plus a layer adding NEW_LAYER_MIB MiB (seeded random data: a new commit's
    build output), as an OCI layout tagged ``latest``; the realistic blobs are hard-linked."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in (realistic / "blobs" / "sha256").iterdir():
        try:
            os.link(blob, blobs / blob.name)
        except OSError:
            shutil.copyfile(blob, blobs / blob.name)
    shutil.copyfile(realistic / "oci-layout", dest / "oci-layout")
    index = json.loads((realistic / "index.json").read_text())
    manifest = read_json_blob(dest, index["manifests"][0]["digest"])
    config = read_json_blob(dest, manifest["config"]["digest"])
    data = random.Random(16).randbytes(NEW_LAYER_MIB << 20)
    entries = [directory("app"), file("app/build.bin", data), file("app/main.py", "print('v2')\n")]
    new_layer = layer_bytes(entries)
    config["rootfs"]["diff_ids"].append(sha256(gzip.decompress(new_layer)))
    config["history"].append({"created_by": "bench/prep.py: a new commit's layer"})
    manifest["config"] = write_json_blob(dest, config, OCI_CONFIG)
    manifest["layers"].append(write_blob(dest, new_layer, OCI_LAYER_TYPES["gzip"]))
    top = write_json_blob(dest, manifest, OCI_MANIFEST, annotations={REF_NAME: "latest"})
    write_index(dest, [top])
    return dest


def ours_warm(ref: str, cache: Path, work: Path, *, spare: bool) -> Phases:
    """A second job on the same image and disk size: manifest check (blobs cached), template, and the
    iteration's disk: with ``spare``, the one the daemon copied while idle after the previous job
    (sparedisk.py; that copy is not timed: no job waits for it), else a copy of the template (what an
    iteration without a spare, e.g. a job's second one, does)."""
    templates = TemplateCache(cache)
    spares = SpareDisks(cache)
    if spare:  # the daemon's idle time after the cold job
        image = open_image(ref, cache_dir=image_cache_dir(cache), insecure=True)
        known = templates.get(template_key(image.manifest_digest, DISK_MIB))
        assert known is not None, "the template must be cached by the cold run"
        spares.want(known, 1)
        assert spares.refill() == 1
    watch = Stopwatch()
    mark = watch.mark
    image = open_image(ref, cache_dir=image_cache_dir(cache), insecure=True)
    mark("pull")
    template = templates.get(template_key(image.manifest_digest, DISK_MIB))
    assert template is not None, "the template must be cached by the cold run"
    mark("template")
    disk = work / f"iter-warm-{'spare' if spare else 'copy'}" / "rootfs.ext4"
    disk.parent.mkdir()
    if spare:
        assert spares.take(template.key, disk), "the spare disk must be there"
    else:
        copy_disk(template.disk, disk)
    mark("spare" if spare else "copy")
    disk.unlink()
    return watch.done()


# --- the reference --------------------------------------------------------------------------------------


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def reference(host_ref: str, work: Path) -> Phases:
    """What a user would script: skopeo copy, umoci unpack, mkfs.ext4 -d on a 1024 MiB file."""
    layout, bundle, img = work / "oci", work / "bundle", work / "rootfs.ext4"
    watch = Stopwatch()
    mark = watch.mark
    _run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{host_ref}",
            f"oci:{layout}:latest",
        ]
    )
    mark("skopeo")
    _run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)])
    mark("umoci")
    _run(["fallocate", "-l", f"{DISK_MIB}M", str(img)])
    _run([*MKFS_REFERENCE, "-d", str(bundle / "rootfs"), str(img)])
    mark("mkfs")
    return watch.done()


# --- peak RSS in a fresh process ------------------------------------------------------------------------

RSS_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from bencher_runner.oci.pull import pull_image
    from bencher_runner.oci.reference import parse_reference
    from bencher_runner.oci.registry import RegistryClient
    from bencher_runner.oci.unpack import unpack_layers

    def status_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def rss_kib():
        return status_kib("VmRSS")

    mode, ref, cache, tree = sys.argv[1:5]
    after_imports = rss_kib()
    RegistryClient(parse_reference(ref, insecure=True)).close()  # lazy imports (ssl, certifi) done
    baseline = rss_kib()
    image = pull_image(parse_reference(ref, insecure=True), cache_dir=Path(cache))
    if mode == "pull+unpack":
        Path(tree).mkdir()
        unpack_layers(image.layers, Path(tree))
    peak = status_kib("VmHWM")  # this process's own high-water mark (see rss_of)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    doc = {"after_imports_kib": after_imports, "baseline_kib": baseline}
    print(json.dumps({**doc, "peak_kib": peak, "maxrss_kib": maxrss}))
    """
)


def rss_of(mode: str, ref: str, work: Path) -> dict[str, int]:
    """Peak RSS of a fresh process doing ``mode``: VmHWM, because ru_maxrss survives execve and so
    reports the forking parent's RSS (this benchmark's, about 65 MiB) when that is higher."""
    argv = [sys.executable, "-c", RSS_CHILD, mode, ref, str(work / "cache"), str(work / "tree")]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    doc: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


# --- driver ---------------------------------------------------------------------------------------------


def _median(runs: list[Phases]) -> Phases:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _fmt(phases: Phases) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in phases.items() if k != "total")


def _scratch(base: Path, name: str) -> Path:
    path = base / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run(repeat: int = 3, profile: Path | None = None) -> dict[str, float]:
    """Run every image-prep figure ``repeat`` times; prints and returns the medians."""
    realistic = realistic_layout()
    big = big_layer_layout(BIG_LAYER_MIB)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp_name:
        tmp = Path(tmp_name)
        with loopback_registry(tmp) as reg:
            digest = push(realistic, reg, "proj", "v1")
            plus = plus_layer_layout(realistic, tmp / "plus-layer")
            digest2 = push(plus, reg, "proj", "v2")
            push(big, reg, "big", "latest")
            host_ref = f"{reg.host}/proj:v1"
            ref = f"http://{reg.host}/proj@{digest}"  # by digest, as Bencher jobs name images
            ref2 = f"http://{reg.host}/proj@{digest2}"
            gz_bytes, _ = layer_sizes(realistic)

            cold, warm, warm_copy, refs, incremental, cold2 = [], [], [], [], [], []
            for i in range(repeat):
                work = _scratch(tmp, "reference")
                os.sync()  # both start with no dirty pages of the other's run to write back
                refs.append(reference(host_ref, work))
                shutil.rmtree(work)
                cache, work = _scratch(tmp, "cache"), _scratch(tmp, "work")
                os.sync()
                cold.append(ours_cold(ref, cache, work))
                warm_copy.append(ours_warm(ref, cache, work, spare=False))
                warm.append(ours_warm(ref, cache, work, spare=True))
                work = _scratch(tmp, "work")
                os.sync()
                incremental.append(ours_cold(ref2, cache, work, built="incremental"))  # v1's disk cached
                cache, work = _scratch(tmp, "cache"), _scratch(tmp, "work")
                os.sync()
                cold2.append(ours_cold(ref2, cache, work))
                print(
                    f"  run {i + 1}/{repeat}: reference {refs[-1]['total']:.2f} s ({_fmt(refs[-1])}); "
                    f"ours cold {cold[-1]['total']:.2f} s ({_fmt(cold[-1])}); "
                    f"warm {warm[-1]['total']:.3f} s (with a copy {warm_copy[-1]['total']:.3f} s); "
                    f"+{NEW_LAYER_MIB} MiB layer: incremental {incremental[-1]['total']:.3f} s "
                    f"({_fmt(incremental[-1])}), cold {cold2[-1]['total']:.2f} s",
                    flush=True,
                )
            if profile is not None:
                cache, work = _scratch(tmp, "cache"), _scratch(tmp, "work")
                profiler = cProfile.Profile()
                profiler.runcall(ours_cold, ref, cache, work)
                profiler.dump_stats(f"{profile}.prof")
                with open(f"{profile}.txt", "w") as out:
                    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
                    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
            shutil.rmtree(tmp / "cache", ignore_errors=True)
            shutil.rmtree(tmp / "work", ignore_errors=True)

            rss: dict[str, list[dict[str, int]]] = {"pull": [], "pull+unpack": []}
            for _ in range(repeat):
                for mode in rss:
                    work = _scratch(tmp, "rss")
                    rss[mode].append(rss_of(mode, f"http://{reg.host}/big:latest", work))
                    shutil.rmtree(work)

    ref_m, cold_m, warm_m, warm_copy_m = _median(refs), _median(cold), _median(warm), _median(warm_copy)
    incr_m, cold2_m = _median(incremental), _median(cold2)
    named = (("reference", ref_m), ("cold", cold_m), ("warm", warm_m), ("warm_copy", warm_copy_m))
    for name, phases in (*named, ("incremental", incr_m), ("cold_plus_layer", cold2_m)):
        for k, v in phases.items():
            results[f"prep_{name}_{k}_s"] = v
    results["prep_incremental_over_cold"] = statistics.median(
        n["total"] / c["total"] for n, c in zip(incremental, cold2, strict=True)
    )
    results["prep_incremental_over_cold_base_image"] = statistics.median(
        n["total"] / c["total"] for n, c in zip(incremental, cold, strict=True)
    )
    results["prep_cold_over_reference"] = statistics.median(
        c["total"] / r["total"] for c, r in zip(cold, refs, strict=True)
    )
    results["prep_warm_over_cold"] = statistics.median(
        w["total"] / c["total"] for w, c in zip(warm, cold, strict=True)
    )
    results["prep_warm_copy_over_cold"] = statistics.median(
        w["total"] / c["total"] for w, c in zip(warm_copy, cold, strict=True)
    )
    for mode, runs in rss.items():
        key = mode.replace("+", "_")
        results[f"rss_{key}_peak_mib"] = statistics.median(r["peak_kib"] for r in runs) / 1024
        results[f"rss_{key}_baseline_mib"] = statistics.median(r["baseline_kib"] for r in runs) / 1024
        results[f"rss_{key}_after_imports_mib"] = (
            statistics.median(r["after_imports_kib"] for r in runs) / 1024
        )
        results[f"rss_{key}_ru_maxrss_mib"] = statistics.median(r["maxrss_kib"] for r in runs) / 1024

    print(f"realistic image: {gz_bytes / 2**20:.0f} MiB gzip layer; medians of {repeat}")
    print(
        f"cold image prep: ours {cold_m['total']:.2f} s / skopeo+umoci+mkfs {ref_m['total']:.2f} s = "
        f"{results['prep_cold_over_reference']:.3f} (goal <= {GOAL_COLD})"
    )
    print(f"  ours:      {_fmt(cold_m)} s")
    print(f"  reference: {_fmt(ref_m)} s")
    print(
        f"warm image prep: {warm_m['total'] * 1000:.0f} ms / cold {cold_m['total'] * 1000:.0f} ms = "
        f"{results['prep_warm_over_cold']:.3f} (goal <= {GOAL_WARM}), with the spare disk copied while "
        f"idle; with a copy of the template instead: {warm_copy_m['total'] * 1000:.0f} ms = "
        f"{results['prep_warm_copy_over_cold']:.3f}"
    )
    for label, phases in (("warm", warm_m), ("with a copy", warm_copy_m)):
        print(f"  {label}: {', '.join(f'{k} {v * 1000:.1f} ms' for k, v in phases.items() if k != 'total')}")
    print(
        f"incremental image prep (+{NEW_LAYER_MIB} MiB layer on the cached realistic image): "
        f"{incr_m['total'] * 1000:.0f} ms / cold prep of that image {cold2_m['total'] * 1000:.0f} ms = "
        f"{results['prep_incremental_over_cold']:.3f} (goal <= {GOAL_INCREMENTAL}); / cold prep of the "
        f"realistic image: {results['prep_incremental_over_cold_base_image']:.3f}"
    )
    print(f"  incremental: {', '.join(f'{k} {v * 1000:.0f} ms' for k, v in incr_m.items() if k != 'total')}")
    print(f"  cold of that image: {_fmt(cold2_m)} s")
    for mode in rss:
        key = mode.replace("+", "_")
        peak, base = results[f"rss_{key}_peak_mib"], results[f"rss_{key}_baseline_mib"]
        imports = results[f"rss_{key}_after_imports_mib"]
        print(
            f"peak RSS, {mode} of a {BIG_LAYER_MIB} MiB layer: {peak:.1f} MiB (after imports {imports:.1f}, "
            f"with an HTTP client "
            f"{base:.1f} MiB, +{peak - base:.1f}); goal <= {GOAL_RSS_MIB} MiB; ru_maxrss "
            f"{results[f'rss_{key}_ru_maxrss_mib']:.1f} MiB"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument("--profile", type=Path, help="also cProfile one cold prep into PREFIX.prof/.txt")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: unpacking keeps image ownership")
    results = run(args.repeat, args.profile)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
