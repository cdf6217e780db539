"""A job's root filesystem: the image's layers unpacked (in memory when they surely fit) and made an
ext4 root disk of the requested size, from the template cache, from a cached disk of the image's
lower layers (layercache.py), or in full.

The job's disk bounds the unpack while it extracts (bytes and inodes: exactly what mkfs.ext4 gives
that disk), so an image that cannot fit fails early with the disk size it would need.
"""

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bencher_runner import metrics
from bencher_runner.layercache import (
    ChainBase,
    ChainCache,
    IncrementalUnavailable,
    apply_layers,
    base_depth,
    has_dir,
    incremental_supported,
)
from bencher_runner.oci.layout import LayerRef, LocalImage
from bencher_runner.oci.unpack import (
    ByteBudget,
    StagingAllowance,
    StagingFull,
    UnpackStats,
    ensure_directory,
    read_image_file,
    unpack_layers,
)
from bencher_runner.rootfs import (
    EXT4_RESERVED_INODES,
    Template,
    TemplateCache,
    build_rootfs,
    ext4_inode_count,
    min_disk_mib,
    template_key,
)
from bencher_runner.sandbox.backend import JobContext
from bencher_runner.spec.errors import ImageError
from bencher_runner.spec.units import MIB
from bencher_runner.staging import memory_allowance, memory_tree, out_of_space, remove_memory_tree


class RootDisks:
    """Builds one job's root disk template (or, for --sandbox none, its tree)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    def _timed(self, name: str, fn: Callable[[], object]) -> None:
        t0 = time.monotonic()
        fn()
        self.ctx.timings[f"{name}_s"] = time.monotonic() - t0

    def template(self, work: Path, image: LocalImage) -> Template:
        """The image's root disk template: cached, else built (and cached)."""
        disk_mib = self.ctx.config.job.disk_mib
        templates = TemplateCache(self.ctx.cache)
        key = template_key(image.manifest_digest, disk_mib)
        template = templates.get(key)
        metrics.cache_lookup("template", template is not None)
        if template is not None:
            self.ctx.phase(f"root disk template cached ({disk_mib} MiB)")
            self.ctx.metadata["root_disk"] = {"built": "template"}
            return template
        return self.build_template(work, image, templates, key)

    def _budget(self, staged: Path | None = None, *, used: int = 0, inodes: int = 0) -> ByteBudget:
        """The job's disk bounds the tree (bytes and inodes) while it extracts; on tmpfs (``staged``)
        so does the tmpfs allowance. ``used``/``inodes``: already charged (by a cached chain base)."""
        disk_mib = self.ctx.config.job.disk_mib

        def disk_for(total_bytes: int, total_inodes: int) -> int:
            """A disk (MiB, at most ~1.5% above the least) that holds this many bytes and inodes."""
            mib = max(min_disk_mib(total_bytes), disk_mib)
            while ext4_inode_count(mib) - EXT4_RESERVED_INODES < total_inodes:
                mib += max(1, mib // 64)
            return mib

        allowance = StagingAllowance(*memory_allowance(staged)) if staged is not None else None
        return ByteBudget(
            disk_mib * MIB,
            used=used,
            inode_limit=ext4_inode_count(disk_mib) - EXT4_RESERVED_INODES,
            inodes=inodes,
            disk_mib=disk_mib,
            staging=allowance,
            disk_for=disk_for,
        )

    def unpack(
        self, work: Path, image: LocalImage, *, in_memory: bool = True
    ) -> tuple[Path, str | None, str | None]:
        """Unpack the whole image (WorkingDir created): the tree, the image's /etc/passwd and /etc/group."""
        tree, _, stats = self.unpack_layers_into(work, image.layers, in_memory=in_memory)
        return tree, *self.finish_tree(tree, image, stats.skipped_devices)

    def unpack_layers_into(
        self, work: Path, layers: Sequence[LayerRef], *, in_memory: bool = True
    ) -> tuple[Path, ByteBudget, UnpackStats]:
        """Unpack ``layers`` into a tmpfs tree when it surely fits (staging.py), else into work/tree;
        returns the tree, the budget charged for it and the unpack's stats.

        Passing the tmpfs allowance (or filling the tmpfs) moves the unpack to disk."""
        compressed = sum(layer.size for layer in layers)
        staged = memory_tree(work, compressed, warn=self.ctx.warn) if in_memory else None
        tree = staged or work / "tree"
        tree.mkdir(exist_ok=True)
        self.ctx.phase(f"unpacking layers{' in memory' if staged else ''}")
        t0 = time.monotonic()
        budget = self._budget(staged)
        try:
            stats = unpack_layers(layers, tree, budget=budget, total=len(layers))
        except ImageError as err:
            if staged is None or not (isinstance(err, StagingFull) or out_of_space(err)):
                raise
            self.ctx.warn(f"the image did not fit in {staged.parent} ({err}): unpacking it on disk instead")
            remove_memory_tree(work)
            tree = work / "tree"
            tree.mkdir()
            budget = self._budget(None)
            stats = unpack_layers(layers, tree, budget=budget, total=len(layers))
        self.ctx.timings["unpack_s"] = time.monotonic() - t0
        self.ctx.check_cancel("while its image was unpacked")
        return tree, budget, stats

    def _warn_devices(self, devices: Sequence[str]) -> None:
        if devices:
            shown = ", ".join(devices[:4]) + (f" and {len(devices) - 4} more" if len(devices) > 4 else "")
            self.ctx.warn(
                f"skipped {len(devices)} device node(s) in the image: {shown} (the guest's /dev is devtmpfs)"
            )

    def finish_tree(
        self, tree: Path, image: LocalImage, devices: Sequence[str]
    ) -> tuple[str | None, str | None]:
        """WorkingDir created (as Docker does); returns the image's /etc/passwd and /etc/group."""
        self._warn_devices(devices)
        ensure_directory(tree, image.config.config.working_dir or "/")
        return read_image_file(tree, "etc/passwd"), read_image_file(tree, "etc/group")

    def build_template(self, work: Path, image: LocalImage, templates: TemplateCache, key: str) -> Template:
        """The image's root disk template: from the cached base of its longest known chain of lower
        layers plus its new layers (layercache.py), else in full (unpack + mkfs), leaving a base of
        its lower layers for the next image that shares them."""
        cfg = self.ctx.config.job
        layers = image.layers
        chains = ChainCache(self.ctx.cache)
        unsupported = incremental_supported()
        base = chains.longest(layers, cfg.disk_mib) if unsupported is None else None
        metrics.cache_lookup("chain", base is not None)
        if base is not None:
            try:
                template = self._incremental(work, image, templates, key, chains, base)
                self.ctx.metadata["root_disk"] = {
                    "built": "incremental",
                    "cached_layers": base.depth,
                    "applied_layers": len(layers) - base.depth,
                }
                return template
            except IncrementalUnavailable as err:
                self.ctx.phase(f"cannot reuse the cached lower layers ({err}): building the disk in full")
                unsupported = str(err)
        depth = base_depth(layers) if unsupported is None else len(layers)
        tree, budget, stats = self.unpack_layers_into(work, layers[:depth])
        if depth < len(layers):  # a base of the lower layers first, then the top layer onto a copy of it
            base = self._lower_base(work, layers[:depth], tree, budget, stats, chains)
            try:
                template = self._incremental(work, image, templates, key, chains, base)
                self.ctx.metadata["root_disk"] = {
                    "built": "full",
                    "layers": len(layers),
                    "base_layers": depth,
                }
                return template
            except IncrementalUnavailable as err:
                self.ctx.phase(f"applying the top layer failed ({err}): building the disk in full")
                tree, budget, stats = self.unpack_layers_into(work, layers)
                depth = len(layers)
        return self._full(
            work,
            image,
            templates,
            key,
            chains,
            tree,
            budget,
            stats,
            pristine=(depth == len(layers) and unsupported is None),
        )

    def _lower_base(
        self,
        work: Path,
        lower_layers: Sequence[LayerRef],
        tree: Path,
        budget: ByteBudget,
        stats: UnpackStats,
        chains: ChainCache,
    ) -> ChainBase:
        """The disk of the lower layers (unpacked in ``tree``), kept as their chain's base."""
        disk_mib = self.ctx.config.job.disk_mib
        self.ctx.phase(f"building {disk_mib} MiB ext4 disk of the lower {len(lower_layers)} layers")
        lower = work / "lower.ext4"
        self._timed(
            "mkfs", lambda: build_rootfs(tree, lower, disk_mib, allocate=False, cancel=self.ctx.cancel)
        )
        shutil.rmtree(tree)
        used = (budget.used, budget.inodes, stats.skipped_devices)
        stored = chains.put(
            lower_layers,
            disk_mib,
            lower,
            link=False,
            used_bytes=used[0],
            used_inodes=used[1],
            skipped_devices=used[2],
        )
        return stored or ChainBase("", len(lower_layers), disk_mib, lower, *used[:2], tuple(used[2]))

    def _full(
        self,
        work: Path,
        image: LocalImage,
        templates: TemplateCache,
        key: str,
        chains: ChainCache,
        tree: Path,
        budget: ByteBudget,
        stats: UnpackStats,
        *,
        pristine: bool,
    ) -> Template:
        """The template made from the whole unpacked ``tree``; ``pristine``: the tree is exactly the
        image's layers (so the template is also their chain's base)."""
        cfg = self.ctx.config.job
        layers = image.layers
        built = work / "rootfs.ext4"
        pristine = pristine and has_dir(tree, image.config.config.working_dir or "/")
        passwd, group = self.finish_tree(tree, image, stats.skipped_devices)
        self.ctx.phase(f"building {cfg.disk_mib} MiB ext4 root disk")
        self._timed(
            "mkfs", lambda: build_rootfs(tree, built, cfg.disk_mib, allocate=False, cancel=self.ctx.cancel)
        )
        shutil.rmtree(tree)
        template = templates.put(key, built, passwd, group)
        self.ctx.metadata["root_disk"] = {"built": "full", "layers": len(layers)}
        if pristine:  # the template is exactly the layers' tree: the base of their chain, for free
            self._keep_as_base(chains, layers, template, budget, stats.skipped_devices)
        return template

    def _keep_as_base(
        self,
        chains: ChainCache,
        layers: Sequence[LayerRef],
        template: Template,
        budget: ByteBudget,
        devices: Sequence[str],
    ) -> None:
        """The template is exactly ``layers``' tree: keep it (linked) as their chain's base."""
        chains.put(
            layers,
            self.ctx.config.job.disk_mib,
            template.disk,
            link=True,
            used_bytes=budget.used,
            used_inodes=budget.inodes,
            skipped_devices=devices,
        )

    def _incremental(
        self,
        work: Path,
        image: LocalImage,
        templates: TemplateCache,
        key: str,
        chains: ChainCache,
        base: ChainBase,
    ) -> Template:
        """The template as ``base`` (the disk of the first ``base.depth`` layers) plus the rest."""
        cfg = self.ctx.config.job
        layers = image.layers
        new = layers[base.depth :]
        self.ctx.phase(
            f"building {cfg.disk_mib} MiB ext4 root disk from the cached disk of its lower {base.depth} "
            f"layer(s) and {len(new)} new layer(s)"
        )
        budget = self._budget(used=base.used_bytes, inodes=base.used_inodes)  # as a full unpack by then
        mount_point = work / "disk-mount"
        mount_point.mkdir(exist_ok=True)
        built = work / "rootfs.ext4"
        t0 = time.monotonic()
        applied = apply_layers(
            base.disk,
            built,
            mount_point,
            new,
            budget=budget,
            first=base.depth + 1,
            total=len(layers),
            working_dir=image.config.config.working_dir or "/",
        )
        self.ctx.timings["incremental_s"] = time.monotonic() - t0
        self.ctx.check_cancel("while its image was unpacked")
        self._warn_devices([*base.skipped_devices, *applied.stats.skipped_devices])
        template = templates.put(key, built, applied.passwd, applied.group)
        if applied.pristine:
            devices = [*base.skipped_devices, *applied.stats.skipped_devices]
            self._keep_as_base(chains, layers, template, budget, devices)
        return template

    def discard(self, work: Path) -> None:
        """The job's tmpfs tree, if one is left (the work dir itself is the job's to remove)."""
        remove_memory_tree(work)
