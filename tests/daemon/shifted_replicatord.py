"""replicatord with its clock set back by REPLICATOR_TEST_CLOCK_SHIFT seconds, so a test makes in seconds
the hourly recovery points a replica keeps (a point's time is the primary's clock when it cut the cycle).
Run as `python -m tests.daemon.shifted_replicatord --config ...` from the repository root."""
from __future__ import annotations

import os
import sys
import time

_real_time = time.time
_shift = float(os.environ.get("REPLICATOR_TEST_CLOCK_SHIFT", "0"))
time.time = lambda: _real_time() + _shift

from replicator.daemon.main import main  # noqa: E402  (after the clock is set)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
