"""Fixtures for the console's browser tests: the real controller app served by uvicorn on loopback (SQLite in
the test's tmp dir), and a real headless Chromium (Debian's) driven by Playwright, which refuses and records
every request to a host other than loopback.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import urllib.parse

import pytest

from replicator.controller.db import Store
from tests.controller.conftest import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Chromium logs every 4xx answer; the API's refusals (bad token, role, conflict, validation) are shown on the
# page and asserted there, so only those are not errors here (a 404 for a console file still is).
REFUSAL = re.compile(r"the server responded with a status of (401|403|409|422)\b")
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


def pytest_configure(config):
    # starlette's TestClient (a host's report through the app, test_machine_history.py) warns at its import
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")


class Portal:
    """The controller app served by uvicorn in a thread on 127.0.0.1; `stop`/`start` keep its port and store."""

    def __init__(self, app, store: Store, admin_token: str):
        self.app, self.store, self.admin_token = app, store, admin_token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = self.thread = None

    def start(self) -> None:
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="controller", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the controller did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "the controller did not stop"

    def make_token(self, role: str, name: str | None = None) -> str:
        from replicator.controller.auth import create_token
        with self.store.session() as s:
            return create_token(s, name or f"{role}-{os.urandom(3).hex()}", role, created_by="tests")

    def api(self, method: str, path: str, token: str | None = None, **kw):
        import httpx
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {token or self.admin_token}"},
                             timeout=10, **kw)


@pytest.fixture
def portal(tmp_path):
    """The controller (every REST router and the console) listening on 127.0.0.1 at a free port."""
    from replicator.controller.app import create_app
    from replicator.controller.auth import ensure_admin_token

    data = tmp_path / "controller-data"
    data.mkdir()
    store = Store.open(f"sqlite:///{data / 'controller.db'}")
    token = ensure_admin_token(store, str(data))
    portal = Portal(create_app(store, data_dir=str(data)), store, token)
    portal.start()
    try:
        yield portal
    finally:
        portal.stop()
        store.close()


@dataclasses.dataclass
class Browser:
    context: object
    external: list
    errors: list = dataclasses.field(default_factory=list)

    def page(self):
        """A new tab; script errors and console errors in it (a CSP refusal is one) fail the test."""
        page = self.context.new_page()
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))
        page.on("console", lambda msg: self.errors.append(f"{page.url}: {msg.text}")
                if msg.type == "error" and not REFUSAL.search(msg.text) else None)
        return page

    def expect_errors(self, *fragments: str) -> None:
        """Drop the errors a test provoked on purpose (each must contain one of `fragments`)."""
        self.errors[:] = [e for e in self.errors if not any(f in e for f in fragments)]


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium profile; any request to a non-loopback host is aborted and fails the test."""
    from playwright.sync_api import expect, sync_playwright

    external: list[str] = []

    def guard(route):
        host = urllib.parse.urlsplit(route.request.url).hostname or ""
        if route.request.url.startswith(("data:", "blob:")) or host in LOOPBACK:
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "chromium-profile"), executable_path=CHROMIUM,
                                                   headless=True, args=CHROMIUM_ARGS,
                                                   viewport={"width": 1400, "height": 900},
                                                   # the real controller listens with its deployment CA's
                                                   # certificate, which this fresh profile does not know
                                                   ignore_https_errors=True)
        ctx.set_default_timeout(10_000)
        # expect() has its own timeout (5 s by default): the same 10 s, for a run with both cores busy
        # (a clean-clone run once saw a page take longer than 5 s to show a locator)
        expect.set_options(timeout=10_000)
        ctx.route("**/*", guard)
        browser = Browser(ctx, external)
        try:
            yield browser
        finally:
            ctx.close()
    assert not external, f"the console asked for non-loopback URLs: {external}"
    assert not browser.errors, f"errors in the browser: {browser.errors}"


def login(page, portal, token: str) -> None:
    """Open the console of `portal` (anything with a .url) and sign in with `token`; returns once the Overview
    is shown."""
    page.goto(portal.url + "/ui/")
    page.fill("#token", token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#page-overview")
