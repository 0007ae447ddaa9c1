"""One Azurite for the whole Azure test session (started on a free 127.0.0.1 port, stopped at the end)."""
from __future__ import annotations

import os

import pytest

from replicator.azure.azurite import Azurite, azurite_binary


@pytest.fixture(scope="session")
def azurite():
    if azurite_binary() is None:
        why = "azurite is not installed (./tools/bootstrap installs it under tools/azurite)"
        if os.environ.get("CI"):
            pytest.fail(why)             # CI runs the bootstrap: a missing Azurite is a broken install step
        pytest.skip(why)
    az = Azurite().start()
    try:
        yield az
    finally:
        az.stop()
