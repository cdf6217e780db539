"""A job whose image shares its lower layers with one run before boots from an incremental root disk
(layercache.py): the new layers applied onto a copy of the cached disk of the lower ones."""

import secrets
from pathlib import Path

from tests.support.oci_builder import Entry, RawLayer, build_layout, file, layer_bytes
from tests.vm.conftest import runner


def test_a_new_top_layer_boots_from_the_cached_lower_layers(
    tmp_path: Path, busybox_layer: list[Entry]
) -> None:
    token = secrets.token_hex(8)  # new digests: nothing of these images is cached yet
    app = [file("app/v", f"v1 {token}\n"), file("app/old", "old\n"), file("etc/motd", "lower\n")]
    new = [file("app/v", f"v2 {token}\n"), file("app/.wh.old"), Entry("app/bin", "dir", mode=0o700, uid=7)]
    script = "cat /app/v /etc/motd; ls /app; stat -c '%a %u' /app/bin 2>/dev/null || true"
    config = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", script]}
    layers = [RawLayer(layer_bytes(entries)) for entries in (busybox_layer, app, new)]  # equal blobs
    first, second = str(tmp_path / "v1"), str(tmp_path / "v2")
    build_layout(Path(first), layers[:2], config)
    build_layout(Path(second), layers, config)
    v1 = runner("--image", first, "--json", "--disk", "128")
    assert [(r["exit_code"], r["stdout"]) for r in v1.doc["results"]] == [(0, f"v1 {token}\nlower\nold\nv\n")]
    v2 = runner("--image", second, "--json", "--disk", "128")
    assert v2.returncode == 0, v2.stderr
    assert [(r["exit_code"], r["stdout"]) for r in v2.doc["results"]] == [
        (0, f"v2 {token}\nlower\nbin\nv\n700 7\n")
    ]
    assert "from the cached disk of its lower 2 layer(s) and 1 new layer(s)" in v2.stderr, v2.stderr
    assert v2.doc["host"]["root_disk"] == {"built": "incremental", "cached_layers": 2, "applied_layers": 1}
    assert "incremental_s" in v2.doc["timings"]
