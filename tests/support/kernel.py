"""A stand-in guest kernel bundle for tests that need a "fit" host but boot no VM."""

import json
from pathlib import Path


def fake_bundle(cache: Path) -> None:
    """What `runner kernel fetch` leaves in ``cache``, with a kernel file that is not really one."""
    kernel = cache / "kernel"
    kernel.mkdir(parents=True, exist_ok=True)
    (kernel / "vmlinuz").write_bytes(b"not really a kernel")
    (kernel / "bundle.json").write_text(json.dumps({"release": "x", "kernel": "vmlinuz", "modules": []}))
