"""`runner run --image oci-archive:F.tar` / `docker-archive:F.tar` boot the example image (issue #17).

Both archives are written by skopeo from examples/hello/oci, as a user would write them.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import runner

EXAMPLE = Path(__file__).parents[2] / "examples" / "hello" / "oci"
pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")


def skopeo_copy(dest: str) -> None:
    res = subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{EXAMPLE}:latest", dest],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    ("written", "image"),
    [
        ("oci-archive:{f}", "oci-archive:{f}"),
        ("docker-archive:{f}:hello:latest", "docker-archive:{f}"),
    ],
    ids=["oci-archive", "docker-archive"],
)
def test_the_example_image_runs_from_an_archive(tmp_path: Path, written: str, image: str) -> None:
    archive = tmp_path / "hello.tar"
    skopeo_copy(written.format(f=archive))
    run = runner("--json", "--image", image.format(f=archive))
    assert run.returncode == 0, run.stderr
    stdout = run.doc["results"][0]["stdout"]
    print(stdout)
    assert "hello from inside the microVM" in stdout and "sum of squares below 20000" in stdout
