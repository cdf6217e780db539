"""Session-wide test settings.

The host's maintenance directory (drain markers, the daemon and job locks, host/maintenance.py) is
/run/bencher-runner on a real host. Tests, and every `runner` process they start, use a private one,
so a test never waits for, or drains, a runner that happens to serve the machine the tests run on.
"""

import os
import tempfile

os.environ["BENCHER_RUNNER_RUN_DIR"] = tempfile.mkdtemp(prefix="bencher-runner-run-")
