"""`python -m bencher_runner.daemon.upgrade`: the upgrade step the systemd unit runs before each start.

The logic lives in daemon/update.py; this module only runs it. It is separate because the daemon
package already imports update.py, and `python -m` on an imported module runs it twice (with a
warning in the journal on every start).
"""

import sys

from bencher_runner.daemon.update import main

if __name__ == "__main__":
    sys.exit(main())
