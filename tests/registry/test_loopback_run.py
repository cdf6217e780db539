"""`runner run --image 127.0.0.1:PORT/repo@sha256:…` pulls from a plain-HTTP loopback registry
without --insecure-registry (issue #17): HTTPS is tried first, then HTTP, with one warning."""

import json
import subprocess
import sys
from pathlib import Path

from tests.support.busybox import busybox_tree
from tests.support.oci_builder import build_layout, layer_from_dir
from tests.support.registry import Registry, http_push


def test_runner_run_falls_back_to_http_for_a_loopback_registry(tmp_path: Path, registry: Registry) -> None:
    layout = tmp_path / "layout"
    digest = build_layout(
        layout,
        [layer_from_dir(busybox_tree(tmp_path / "tree"))],
        {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", "echo pulled over http"]},
        tag="v1",
    )
    http_push(layout, registry, "loopback/bench", "v1")
    image = f"{registry.host}/loopback/bench@{digest}"
    argv = [sys.executable, "-m", "bencher_runner", "run", "--json", "--image", image]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["stdout"] == "pulled over http\n"
    assert proc.stderr.count("does not speak TLS") == 1, proc.stderr
    assert f"registry {registry.host} does not speak TLS" in proc.stderr
