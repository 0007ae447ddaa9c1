"""An aiohttp reverse proxy in front of Azurite that injects faults: answer 503 ServerBusy, or cut the
connection, for the requests a rule picks. Shared Key signatures cover the path, not the host, so a
client pointed at the proxy works unchanged. Runs on the test's own event loop."""
from __future__ import annotations

import aiohttp
from aiohttp import web

from replicator.azure.azurite import DEV_ACCOUNT, DEV_KEY

HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


class FaultProxy:
    """`rule(request) -> None | 503 | "drop"`; `seen` counts requests, `faults` the injected ones."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.rule = None
        self.seen = self.faults = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
                f"BlobEndpoint=http://127.0.0.1:{self.port}/{DEV_ACCOUNT};")

    async def start(self) -> "FaultProxy":
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        # no headers of aiohttp's own (Content-Type is part of the Shared Key signature)
        self._session = aiohttp.ClientSession(auto_decompress=False,
                                              skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding"))
        return self

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen += 1
        action = self.rule(request) if self.rule else None
        if action == 503:
            self.faults += 1
            return web.Response(status=503, headers={"x-ms-error-code": "ServerBusy"},
                                text="The server is busy.")
        if action == "drop":
            self.faults += 1
            request.transport.close()
            return web.Response(status=500)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body or None, allow_redirects=False) as up:
            payload = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            if request.method == "HEAD":                      # the blob's size travels as Content-Length
                out["Content-Length"] = up.headers.get("Content-Length", "0")
                return web.Response(status=up.status, headers=out)
            return web.Response(status=up.status, headers=out, body=payload)


def is_put_page(request) -> bool:
    return request.method == "PUT" and request.headers.get("x-ms-page-write") == "update"
