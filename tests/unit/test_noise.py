"""`runner noise`'s pure parts: the workload output, the image it builds, the figures and verdicts."""

from pathlib import Path
from typing import Any

from bencher_runner.noise import (
    NOISY_CV,
    Measurements,
    build_image,
    parse_output,
    plain_lines,
    summarize,
    top_sources,
)
from bencher_runner.oci.layout import open_layout


def test_parse_output_takes_known_workloads_only() -> None:
    assert parse_output("cpu 123\nmem 45\nsyscall 6\n") == {"cpu": 123, "mem": 45, "syscall": 6}
    assert parse_output("cpu x\nother 5\n\n") == {}


def test_built_image_is_a_valid_layout_running_the_binary(tmp_path: Path) -> None:
    binary = tmp_path / "bin"
    binary.write_bytes(b"\x7fELF fake")
    image = open_layout(build_image(tmp_path / "oci", binary))
    assert image.config.config.entrypoint == ["/noise", "all"]
    assert len(image.layers) == 1


def _measured(
    bare: list[int], sandbox: list[int], accel: str, reports: tuple[dict[str, Any], ...] = ()
) -> Measurements:
    m = Measurements(accel=accel, reports=list(reports))
    for w in ("cpu", "mem", "syscall"):
        m.bare[w], m.sandbox[w] = list(bare), list(sandbox)
    return m


def test_quiet_host_is_fit_and_overhead_is_the_median_ratio() -> None:
    doc = summarize(_measured([100, 101, 100], [110, 111, 110], "kvm"), cpu=1, runs=3)
    cpu = doc["workloads"]["cpu"]
    assert doc["verdict"] == "fit" and cpu["verdict"] == "fit" and cpu["why"] == []
    assert cpu["bare"]["median_ns"] == 100 and cpu["sandbox"]["median_ns"] == 110
    assert cpu["overhead"] == 0.1
    assert cpu["bare"]["cv"] < NOISY_CV and not doc["emulated"] and doc["note"] is None


def test_spread_makes_noisy_and_tcg_sandbox_spread_does_not() -> None:
    noisy_host = summarize(_measured([100, 150, 100], [110, 110, 110], "kvm"), cpu=1, runs=3)
    assert noisy_host["verdict"] == "noisy"
    assert noisy_host["workloads"]["mem"]["why"][0].startswith("host runs vary")
    kvm = summarize(_measured([100, 100, 100], [100, 300, 100], "kvm"), cpu=1, runs=3)
    assert kvm["verdict"] == "noisy" and "sandbox runs vary" in kvm["workloads"]["cpu"]["why"][0]
    tcg = summarize(_measured([100, 100, 100], [1000, 3000, 1000], "tcg"), cpu=1, runs=3)
    assert tcg["verdict"] == "fit" and tcg["emulated"] and "emulated" in tcg["note"]
    assert tcg["workloads"]["cpu"]["overhead"] == 9.0  # shown, not held against the host


def test_top_sources_name_what_disturbed_how_often() -> None:
    busy = {
        "checks": {
            "other_tasks": {"verdict": "disturbed", "top": [{"name": "busyneighbour"}, {"name": "cc1"}]},
            "irqs": {"verdict": "clean", "top": []},
            "steal": {"verdict": "disturbed"},
            "pressure": {"cpu": {"verdict": "info"}, "memory": {"verdict": "disturbed"}},
        }
    }
    quiet = {"checks": {"other_tasks": {"verdict": "clean", "top": []}, "pressure": {}}}
    assert top_sources([busy, busy, quiet], limit=4) == [
        "task busyneighbour (2/3 runs)",
        "task cc1 (2/3 runs)",
        "steal (2/3 runs)",
        "pressure (2/3 runs)",
    ]
    doc = summarize(_measured([100, 100, 100], [100, 100, 100], "kvm", (busy,)), cpu=1, runs=3)
    assert doc["interference_sources"][0] == "task busyneighbour (1/1 runs)"
    lines = plain_lines(doc)
    assert lines[0] == "runner noise: CPU 1, 3 runs each, sandbox accel kvm"
    assert lines[-1].startswith("verdict: this host is fit (interference: task busyneighbour (1/1 runs)")
