"""`runner noise --runs 3` end to end: the host runs, the sandbox runs through the job path, the output.

The figures depend on this shared machine, so only the document's shape, the counts and the relations
that hold on any host are asserted: every run measured, medians among the runs, the TCG note.
"""

import json
import os
import statistics
import subprocess
import sys
from typing import Any

WORKLOADS = ("cpu", "mem", "syscall")


def noise(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bencher_runner", "noise", "--runs", "3", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_noise_json() -> None:
    proc = noise("--json")
    assert proc.returncode in (0, 1), proc.stderr  # fit or noisy: both are answers
    doc: dict[str, Any] = json.loads(proc.stdout)
    assert {
        "verdict",
        "cpu",
        "runs",
        "accel",
        "emulated",
        "note",
        "workloads",
        "interference_sources",
    } <= set(doc)
    assert doc["runs"] == 3 and doc["verdict"] in ("fit", "noisy")
    assert (proc.returncode == 0) == (doc["verdict"] == "fit")
    assert set(doc["workloads"]) == set(WORKLOADS)
    for w in doc["workloads"].values():
        for side in ("bare", "sandbox"):
            runs = w[side]["runs_ns"]
            assert len(runs) == 3 and all(v > 0 for v in runs)
            assert w[side]["median_ns"] == round(statistics.median(runs))
            assert w[side]["cv"] >= 0
        assert w["overhead"] == round(w["sandbox"]["median_ns"] / w["bare"]["median_ns"] - 1, 4)
        assert (w["verdict"] == "noisy") == bool(w["why"])
    if doc["accel"] == "tcg":
        assert doc["emulated"] and "emulated" in doc["note"]
        assert not any("sandbox" in why for w in doc["workloads"].values() for why in w["why"])
    assert doc["fingerprint"]["accel"] == doc["accel"]


def test_noise_table_on_a_terminal() -> None:
    proc = noise(env={"FORCE_COLOR": "1"})  # rich then renders as on a terminal
    assert proc.returncode in (0, 1), proc.stderr
    for text in ("host median", "sandbox cv", "overhead", *WORKLOADS, "verdict: this host is"):
        assert text in proc.stdout, proc.stdout
