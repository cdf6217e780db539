"""The extracted vmlinux boots like the bzImage it came from (QEMU takes ELF kernels with a PVH note).

This is what the Firecracker backend boots; here QEMU (TCG) runs it, so the extraction is verified
end to end on a host without Firecracker.
"""

from pathlib import Path

import pytest

from bencher_runner.sandbox.vmlinux import extract_vmlinux
from tests.vm.conftest import runner

KERNEL_DIR = Path.home() / ".cache" / "bencher-runner" / "kernel"
BZIMAGE = KERNEL_DIR / "vmlinuz"
MODULES = KERNEL_DIR / "modules"

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not BZIMAGE.is_file(), reason=f"{BZIMAGE} is absent (run `make setup`)"),
]


def test_vmlinux_and_bzimage_give_the_same_result(plain_image: str, tmp_path: Path) -> None:
    vmlinux = extract_vmlinux(BZIMAGE, tmp_path / "vmlinux")
    results = []
    for kernel in (vmlinux, BZIMAGE):
        run = runner(
            "--image", plain_image, "--kernel", str(kernel), "--kernel-modules", str(MODULES),
            "--accel", "tcg", "--json", "--", "/bin/sh", "-c", "echo same",
        )  # fmt: skip
        assert run.returncode == 0, f"{kernel}: {run.stderr}"
        result = run.doc["results"][0]
        results.append((result["exit_code"], result["stdout"]))
    assert results[0] == results[1]
    assert results[0][0] == 0 and "same" in str(results[0][1])
