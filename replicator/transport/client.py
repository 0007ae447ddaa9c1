"""The primary side of the transport: send a cycle's delta stream to a replica and commit it.

A stream is opaque bytes named (disk, stream). send_stream asks the replica what it durably holds, checks
that resume token (length and XXH3-128 of that prefix) against its own bytes, sends only the rest, and
after a dropped connection does the same again (bounded retries with backoff): a cycle is never resent
whole, and a replica whose report does not match what was sent is refused (ResumeTokenError).

Compression is a property of the stream: `compression` is the protection setting the caller hands to
the delta encoder; the transport never recompresses.

Fencing: a client given an `epoch` (the machine's, from the host's fencing table) sends it with every
request (X-Replicator-Epoch); a replica that knows a newer one answers 409 fenced, raised as Fenced and
never retried.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import ssl
from urllib.parse import urlsplit

import aiohttp

from ..errors import ReplicatorError, UsageError
from ..targets.base import TokenBucket
from ..targets.outbox import OutboxStream
from .auth import (EPOCH_HEADER, AuthenticationError, AuthorizationError, Fenced, ReplicaRefused, ResumeTokenError,
                   TransportError)

MiB = 1 << 20
_DROPPED = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, ConnectionError)


class _Retry(Exception):
    """A failure worth another attempt (dropped connection, replica busy)."""


class _Source:
    """The stream's bytes, read by offset from a path, a binary file object, or an OutboxStream the encoder
    is still writing (never held whole). `size` is None until the stream's end is known."""

    def __init__(self, source):
        self.growing = source if isinstance(source, OutboxStream) else None
        if self.growing is not None:
            source = self.growing.path
        self._own = isinstance(source, (str, os.PathLike))
        self.file = open(source, "rb") if self._own else source
        self.file.seek(0, os.SEEK_END)
        self._size = self.file.tell()
        try:
            self.fd = self.file.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None

    @property
    def size(self) -> int | None:
        return self._size if self.growing is None else self.growing.final

    async def reach(self, offset: int) -> int:
        """Bytes readable once more than `offset` are there or the stream ended (waits for the encoder)."""
        return self._size if self.growing is None else await self.growing.reach(offset)

    async def final_size(self) -> int:
        return self._size if self.growing is None else await self.growing.complete()

    def read(self, offset: int, n: int) -> bytes:
        if self.fd is not None:
            return os.pread(self.fd, n, offset)
        self.file.seek(offset)
        return self.file.read(n)

    def digest(self, length: int) -> bytes:
        from ..kernels import digest_prefix
        return digest_prefix(self.read, length)

    def close(self) -> None:
        if self._own:
            self.file.close()


class ReplicaClient:
    """One replication link to one replica server (use `async with`). Several disks and cycles may be in
    flight at once over it; the bandwidth limit is shared by all of them."""

    def __init__(self, url: str, *, cert: str | None = None, key: str | None = None, ca: str | None = None,
                 kerberos: bool = False, service: str | None = None, ccache: str | None = None,
                 bandwidth_limit: float | None = None, compression: bool = True, retries: int = 5,
                 backoff: float = 0.2, chunk_size: int = MiB, timeout: float = 600.0, epoch: int | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"replica URL {url!r} must be http(s)://HOST:PORT")
        if kerberos == (parts.scheme == "https"):
            raise UsageError("use https:// with certificates, http:// with Kerberos")
        if not kerberos and not (cert and key and ca):
            raise UsageError("certificate mode needs our certificate, its key and the CA certificate")
        self.url = url.rstrip("/")
        self.kerberos, self.ccache = kerberos, ccache
        self.service = service or f"HTTP@{parts.hostname}"
        self.compression = compression
        self.epoch = epoch                  # the machine's fencing epoch; None: standalone, none sent
        self.retries, self.backoff, self.chunk_size = retries, backoff, chunk_size
        # small bursts: the limit shapes the stream instead of letting a second's worth out at once
        self.bucket = TokenBucket(bandwidth_limit, max(16 << 10, min(int(bandwidth_limit) // 8, MiB))) \
            if bandwidth_limit else None
        self.bytes_sent = 0
        self.counters: collections.Counter = collections.Counter()
        self._ssl = _client_context(cert, key, ca) if not kerberos else None
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "ReplicaClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl else False, limit=64)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  auto_decompress=False)
        return self._session

    # ------------------------------------------------------------------ requests
    async def _request(self, method: str, path: str, *, raw: bool = False, **kw) -> dict:
        """One request; replica refusals become errors carrying its reason, drops become _Retry. `raw`: a
        successful answer's body as bytes (not JSON)."""
        headers = dict(kw.pop("headers", {}))
        if self.epoch is not None:
            headers[EPOCH_HEADER] = str(self.epoch)
        ctx = None
        if self.kerberos:
            ctx, token = await asyncio.get_running_loop().run_in_executor(None, self._negotiate)
            headers["Authorization"] = "Negotiate " + base64.b64encode(token).decode()
        try:
            async with self._http().request(method, self.url + path, headers=headers, **kw) as resp:
                body = await resp.read() if raw and resp.status < 300 else await _json_body(resp)
                if ctx is not None and resp.status != 401:
                    self._check_mutual(ctx, resp)
                if resp.status >= 400:
                    self.counters[f"refused:{resp.status}"] += 1
                    raise _refusal(resp.status, body, method, path)
                return body
        except aiohttp.ClientConnectorCertificateError as e:
            raise AuthenticationError(f"replica certificate refused: {e.certificate_error}") from None
        except _DROPPED as e:
            cause = _ssl_cause(e)
            if cause is not None:
                raise AuthenticationError(f"TLS with the replica failed: {cause}") from None
            raise _Retry(f"{method} {path}: {type(e).__name__}: {e}") from e

    def _negotiate(self):
        import gssapi
        creds = None
        try:
            if self.ccache:
                creds = gssapi.Credentials(usage="initiate", store={"ccache": self.ccache})
            name = gssapi.Name(self.service, gssapi.NameType.hostbased_service)
            ctx = gssapi.SecurityContext(name=name, creds=creds, usage="initiate",
                                         flags=gssapi.RequirementFlag.mutual_authentication)
            return ctx, ctx.step()
        except gssapi.exceptions.GSSError as e:
            raise AuthenticationError(f"no Kerberos ticket for {self.service}: {e.gen_message()}") from None

    def _check_mutual(self, ctx, resp: aiohttp.ClientResponse) -> None:
        """Trust no answer the replica has not authenticated (Kerberos mutual authentication)."""
        import gssapi
        header = resp.headers.get("WWW-Authenticate", "")
        if not header.startswith("Negotiate "):
            raise AuthenticationError("the replica did not prove its identity (no Negotiate token)")
        try:
            ctx.step(base64.b64decode(header[len("Negotiate "):]))
            complete = ctx.complete
        except (gssapi.exceptions.GSSError, ValueError) as e:
            raise AuthenticationError(f"the replica failed mutual authentication: {e}") from None
        if not complete:
            raise AuthenticationError("the replica failed mutual authentication")

    async def _retrying(self, fn, *args, **kw):
        """Call fn until it does not ask for a retry, at most retries + 1 times with exponential backoff."""
        for attempt in range(self.retries + 1):
            try:
                return await fn(*args, **kw)
            except _Retry as e:
                last = e
                self.counters["retries"] += 1
            if attempt < self.retries:
                await asyncio.sleep(min(5.0, self.backoff * 2 ** attempt))
        raise TransportError(f"replica {self.url} unreachable after {self.retries + 1} attempts: {last}")

    # ------------------------------------------------------------------ API
    async def ensure_disk(self, disk_id, size: int, *, name: str = "", block_size: int = 2 * MiB,
                          machine: str = "") -> dict:
        body = {"size": size, "name": name, "block_size": block_size, **({"machine": machine} if machine else {})}
        return await self._retrying(self._request, "PUT", f"/v1/disks/{disk_id}", json=body)

    async def digests(self, disk_id, block_size: int) -> bytes | None:
        """The replica's XXH3-128 of every block (16 bytes each, little-endian) for a checksum resync; None
        when it holds no comparable copy (an empty replica)."""
        body = await self._retrying(self._request, "GET", f"/v1/disks/{disk_id}/digests",
                                    params={"block_size": str(block_size)}, raw=True)
        return body or None

    async def checkpoint(self, disk_id, generation: int, point: int, *, prepared: bool = False,
                         additional_points: int | None = None, disks: int | None = None) -> dict:
        """Tell the replica which generation ends the machine's cycle `point` (see ReplicaTarget.checkpoint)."""
        body = {"generation": generation, "point": point, "prepared": prepared,
                "additional_points": additional_points}
        if disks is not None:
            body["disks"] = disks
        return await self._retrying(self._request, "POST", f"/v1/disks/{disk_id}/checkpoint", json=body)

    async def delete_disk(self, disk_id) -> bool:
        return bool((await self._retrying(self._request, "DELETE", f"/v1/disks/{disk_id}"))["deleted"])

    async def state(self, disk_id) -> dict:
        return await self._retrying(self._request, "GET", f"/v1/disks/{disk_id}")

    async def health(self) -> dict:
        return await self._retrying(self._request, "GET", "/v1/health")

    async def abort(self, disk_id, stream_id: str) -> dict:
        return await self._retrying(self._request, "DELETE", f"/v1/disks/{disk_id}/uploads/{stream_id}")

    async def resume_token(self, disk_id, stream_id: str) -> tuple[int, bytes]:
        """(durable length, XXH3-128 of those bytes) as the replica reports them, unchecked."""
        return await self._retrying(self._resume_token, disk_id, stream_id)

    async def _resume_token(self, disk_id, stream_id: str) -> tuple[int, bytes]:
        body = await self._request("GET", f"/v1/disks/{disk_id}/uploads/{stream_id}")
        try:
            return int(body["durable"]), bytes.fromhex(body["digest"])
        except (KeyError, TypeError, ValueError):
            raise ResumeTokenError(f"malformed resume token from the replica: {body!r}") from None

    async def send_stream(self, disk_id, stream_id: str, source, *, commit: bool = True) -> dict:
        """Upload the stream (resuming whatever the replica already holds), then commit it.
        Returns the commit answer ({point, generation}), or {durable} when commit=False."""
        src = _Source(source)
        try:
            durable = await self._retrying(self._send_once, disk_id, stream_id, src)
        except ResumeTokenError:
            self.counters["resume_token_refused"] += 1
            await self._discard(disk_id, stream_id)
            raise
        finally:
            src.close()
        if not commit:
            return {"durable": durable}
        return await self.commit(disk_id, stream_id)

    async def _send_once(self, disk_id, stream_id: str, src: _Source) -> int:
        durable = await self._validated_offset(disk_id, stream_id, src)
        if src.size is None or durable < src.size:
            headers = {"Content-Type": "application/octet-stream"}
            if src.size is not None:            # a stream still being encoded goes out chunked
                headers["Content-Length"] = str(src.size - durable)
            body = await self._request("PUT", f"/v1/disks/{disk_id}/uploads/{stream_id}",
                                       params={"offset": str(durable)}, data=self._body(src, durable),
                                       headers=headers)
            durable = int(body["durable"])
        size = await src.final_size()
        if durable != size:
            raise _Retry(f"replica holds {durable} of {size} bytes after the upload")
        return durable

    async def _discard(self, disk_id, stream_id: str) -> None:
        """Tell the replica its spool of this stream is not what was sent (it counts and drops it, since it
        could never commit); best effort, the ResumeTokenError is what the caller acts on."""
        try:
            await self._request("DELETE", f"/v1/disks/{disk_id}/uploads/{stream_id}",
                                params={"reason": "resume-token"})
        except (ReplicatorError, _Retry):
            pass

    async def _validated_offset(self, disk_id, stream_id: str, src: _Source) -> int:
        """The replica's durable length, after checking its digest against our own bytes."""
        durable, digest = await self._resume_token(disk_id, stream_id)
        have = await src.reach(durable - 1) if durable > 0 else 0
        if not 0 <= durable <= have:
            raise ResumeTokenError(f"replica claims {durable} bytes of stream {stream_id}, which has "
                                   f"only {have}")
        mine = await asyncio.get_running_loop().run_in_executor(None, src.digest, durable)
        if mine != digest:
            raise ResumeTokenError(f"replica's first {durable} bytes of stream {stream_id} are not what "
                                   f"was sent (digest {digest.hex()} != {mine.hex()}): refusing to resume")
        return durable

    async def _body(self, src: _Source, start: int):
        """The request body from `start`, read as the connection drains (backpressure) and as the encoder
        writes, metered by the bandwidth limit."""
        loop = asyncio.get_running_loop()
        pos = start
        while True:
            avail = await src.reach(pos)
            if pos >= avail:
                return
            n = min(self.chunk_size, avail - pos)
            if self.bucket is not None:
                n = min(n, self.bucket.burst)
                await self.bucket.take(n)
            data = await loop.run_in_executor(None, src.read, pos, n)
            if not data:
                raise UsageError(f"stream {src.file!r} shrank while being sent")
            yield data
            pos += len(data)
            self.bytes_sent += len(data)

    async def commit(self, disk_id, stream_id: str) -> dict:
        """Ask the replica to verify and apply the stream. After a dropped answer, a generation that
        moved on in the meantime means the commit happened: it is not sent again."""
        before = (await self.state(disk_id))["generation"]
        path = f"/v1/disks/{disk_id}/uploads/{stream_id}/commit"
        for attempt in range(self.retries + 1):
            try:
                return await self._request("POST", path)
            except _Retry as e:
                last = e
            await asyncio.sleep(min(5.0, self.backoff * 2 ** attempt))
            st = await self.state(disk_id)
            if st["generation"] != before and st["points"]:
                return {"point": st["points"][-1], "generation": st["generation"]}
        raise TransportError(f"commit of {stream_id} on {self.url} failed: {last}")


async def _json_body(resp: aiohttp.ClientResponse) -> dict:
    """The answer as JSON; anything else (a proxy's page, an unknown route) becomes its text as message."""
    text = await resp.text(errors="replace")
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"message": text[:500]}


def _client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load the client certificate {cert} / key {key}: {e}") from None
    return ctx


def _ssl_cause(e: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a connection failure (with TLS 1.3 a refused client certificate shows up
    as an alert on the first read, after the handshake seemed to succeed)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return e
        e = e.__cause__ or e.__context__ or (e.args[0] if e.args and isinstance(e.args[0], BaseException)
                                             else None)
    return None


def _refusal(status: int, body: dict, method: str, path: str) -> Exception:
    code = str(body.get("error", "refused"))
    reason = str(body.get("message", f"HTTP {status}"))
    if status == 401:
        return AuthenticationError(f"replica refused our credentials: {reason}")
    if status == 403:
        return AuthorizationError(f"replica refused: {reason}")
    if code == "fenced" and status == 409:
        known = body.get("epoch")
        return Fenced(reason, epoch=known if isinstance(known, int) else None,
                      failed_over=body.get("failed_over") is True)
    if code == "busy" or status in (502, 503, 504):
        return _Retry(f"{method} {path}: replica busy: {reason}")
    if code == "sequence" and method == "PUT" and "/uploads/" in path:
        return _Retry(f"{method} {path}: upload offset moved: {reason}")
    return ReplicaRefused(f"replica refused {method} {path} ({code}): {reason}", status=status, code=code)
