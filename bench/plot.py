"""The job-phase plot: one horizontal stacked bar per job (cold, warm), one colour per phase.

Phases are the runner's result timings (see bench/job.py `job_phases`); matplotlib renders it
headless (Agg) to a PNG.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = ("pull", "unpack", "mkfs", "disk_copy", "boot_to_command", "command", "vm other", "collect", "other")
LABELS = {
    "pull": "pull",
    "unpack": "unpack",
    "mkfs": "mkfs.ext4",
    "disk_copy": "disk copy",
    "boot_to_command": "boot (guest)",
    "command": "command",
    "vm other": "QEMU start/stop",
    "collect": "read results",
    "other": "other (ours)",
}


def plot_phases(jobs: dict[str, dict[str, float]], out: Path, title: str) -> None:
    """``jobs``: label -> phase -> seconds (medians)."""
    labels = list(jobs)
    fig, ax = plt.subplots(figsize=(10, 2.2 + 0.7 * len(labels)))
    colors = plt.get_cmap("tab10")
    for i, phase in enumerate(ORDER):
        widths = [jobs[label].get(phase, 0.0) for label in labels]
        lefts = [sum(jobs[label].get(p, 0.0) for p in ORDER[:i]) for label in labels]
        bars = ax.barh(labels, widths, left=lefts, color=colors(i), label=LABELS[phase], height=0.6)
        for bar, width in zip(bars, widths, strict=True):
            if width >= 0.35:
                ax.text(
                    bar.get_x() + width / 2, bar.get_y() + bar.get_height() / 2, f"{width:.1f}",
                    ha="center", va="center", fontsize=8, color="white",
                )  # fmt: skip
    for label in labels:
        total = sum(jobs[label].get(p, 0.0) for p in ORDER)
        ax.text(total + 0.1, labels.index(label), f"{total:.1f} s", va="center", fontsize=9)
    ax.set_xlabel("seconds (median)")
    ax.set_title(title)
    ax.invert_yaxis()
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
