"""Suite-wide: under pytest-xdist (./tools/test runs two workers), the tests that boot a TCG guest or a
private libvirtd share one worker, so two emulated machines never compete for this machine's two cores and
the session's libvirtd is started once."""
from __future__ import annotations

import pytest

# folders or files whose tests run one after another on one worker
_ONE_WORKER = ("tests/guest/", "tests/hypervisor/", "tests/bench/test_guest_impact_smoke.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        where = item.nodeid.split("::", 1)[0]
        if where.startswith(_ONE_WORKER):
            item.add_marker(pytest.mark.xdist_group("machines"))
