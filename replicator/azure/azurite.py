"""Azurite, the local Azure Storage emulator: the embedded default the Azure target's tests, demo and
benchmark run against, so none of them needs an Azure account or the network.

The bootstrap installs the pinned npm package under tools/azurite; this module starts its blob service on
127.0.0.1 on a free port with a throw-away workspace, and stops it again. Azurite answers page-range diff
requests with the full range list, so nothing in replicator.azure depends on page-range diffs.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from ..errors import ReplicatorError

# The well-known development account every Azure Storage emulator accepts (published, not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_BIN = os.path.join(_TOP, "tools", "azurite", "node_modules", ".bin", "azurite-blob")


class AzuriteError(ReplicatorError):
    """Azurite is not installed or did not start."""


def connection_string(port: int, host: str = "127.0.0.1") -> str:
    """The dev account's connection string for a blob service at host:port (path-style URLs)."""
    return (f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
            f"BlobEndpoint=http://{host}:{port}/{DEV_ACCOUNT};")


def azurite_binary() -> str | None:
    """The azurite-blob launcher: $REPLICATOR_AZURITE, the bootstrap's copy, or one on PATH."""
    for cand in (os.environ.get("REPLICATOR_AZURITE"), DEFAULT_BIN, shutil.which("azurite-blob")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RequestCounter:
    """Counts requests and their body bytes, every attempt included: pass it to an SDK client as
    `raw_request_hook=counter` to see what actually went on the wire (tests and the benchmark)."""

    def __init__(self) -> None:
        self.requests = 0
        self.body_bytes = 0
        self.by_op: dict[str, int] = {}

    def __call__(self, request) -> None:
        req = request.http_request
        self.requests += 1
        self.body_bytes += int(req.headers.get("Content-Length") or 0)
        op = f"{req.method} {req.headers.get('x-ms-page-write', '')}".strip()
        self.by_op[op] = self.by_op.get(op, 0) + 1

    def reset(self) -> None:
        self.__init__()


class Azurite:
    """One Azurite blob service in a temporary workspace. Use as a context manager or start()/stop()."""

    def __init__(self, *, workspace: str | None = None, in_memory: bool = False, host: str = "127.0.0.1",
                 binary: str | None = None, extent_memory_mib: int | None = None):
        self.host = host
        self.in_memory = in_memory
        self.extent_memory_mib = extent_memory_mib
        self.binary = binary or azurite_binary()
        self._own_workspace = workspace is None
        self.workspace = workspace
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(self.port, self.host)

    @property
    def account_url(self) -> str:
        return f"http://{self.host}:{self.port}/{DEV_ACCOUNT}"

    def start(self, timeout: float = 60.0) -> "Azurite":
        """Start the service; a no-op when it runs already (`with Azurite().start()` enters it again)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.binary is None:
            raise AzuriteError("azurite is not installed: run ./tools/bootstrap (npm package under tools/azurite)")
        if self.workspace is None:
            self.workspace = tempfile.mkdtemp(prefix="azurite-")
        for attempt in range(3):         # a free port can be taken between our probe and Azurite's bind
            self.port = free_port(self.host)
            with open(os.path.join(self.workspace, "azurite.log"), "ab") as log:
                self.proc = subprocess.Popen(self._argv(), cwd=self.workspace, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            try:
                if self._wait_ready(timeout):
                    return self
            except BaseException:        # interrupted while it starts (SIGTERM, Ctrl-C): no __exit__ will run
                self._kill()
                raise
            self._kill()
        with open(os.path.join(self.workspace, "azurite.log"), "rb") as f:
            log = f.read()[-2000:].decode(errors="replace")
        self.stop()
        raise AzuriteError(f"azurite did not start:\n{log}")

    def _argv(self) -> list[str]:
        argv = [self.binary, "--blobHost", self.host, "--blobPort", str(self.port), "--skipApiVersionCheck",
                "--loose", "--silent", "--disableTelemetry"]
        if not self.in_memory:
            argv += ["--location", self.workspace]
        else:                               # Azurite refuses --location here; the log still goes to workspace
            argv.append("--inMemoryPersistence")
            if self.extent_memory_mib:
                argv += ["--extentMemoryLimit", str(self.extent_memory_mib)]
        return argv

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)     # our own session: the launcher and its node child
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def stop(self) -> None:
        """Stop the service and remove a workspace we created (the blobs go with it)."""
        self._kill()
        if self._own_workspace and self.workspace:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None

    def __enter__(self) -> "Azurite":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

