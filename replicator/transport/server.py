"""The replica side of the transport: an aiohttp application on uvloop in front of ReplicaStores.

Routes (JSON unless noted; every refusal is {"error": CODE, "message": TEXT} and is counted):
  PUT    /v1/disks/{disk}                          create or check a replica disk  {size, name, block_size, machine}
  GET    /v1/disks/{disk}                          generation, recovery points, spooled uploads
  GET    /v1/disks/{disk}/digests?block_size=N     XXH3-128 of every block (octet-stream, streamed window by
                                                   window with its length announced; 204: empty replica)
  POST   /v1/disks/{disk}/checkpoint               {generation, point, prepared, additional_points}: a cycle ended
  PUT    /v1/disks/{disk}/domain                   the machine's replicated domain configuration (at most 1 MiB),
                                                   kept beside this disk's replica (daemon/domains.py)
  GET    /v1/disks/{disk}/uploads/{stream}         resume token {durable, digest}
  PUT    /v1/disks/{disk}/uploads/{stream}?offset=N  body: stream bytes from N (streamed, synced) -> {durable}
  DELETE /v1/disks/{disk}/uploads/{stream}         drop a spooled upload
  POST   /v1/disks/{disk}/uploads/{stream}/commit  verify and apply -> {point, generation}
  GET    /v1/health                                server counters and this primary's disks' counters
Refusals: 400 refused, 401 unauthenticated, 403 forbidden, 404 not_found, 409 busy|sequence|fenced, 422 format,
500 io, 507 disk_full. The resume token is {durable: bytes held after fsync, digest: hex XXH3-128 of them}.

Fencing (docs/management-plane.md): every disk route reads `X-Replicator-Epoch: E` when a primary sends
it. An E older than the disk's known epoch is refused 409 {"error": "fenced", "message": "fenced: ...",
"epoch": KNOWN, "failed_over": BOOL} and counted (rejected_fenced); a newer E becomes the known one; a
request without the header is not checked (standalone). A failover on this site raises the known epoch
itself (ReplicaDisk.set_failover). A malformed header is a one-line 400.

Every name a peer sends is taken inside the storage root and trust group it authenticated into; every
refusal is decided before anything is created; what a request can make the server hold is bounded by the
operator's settings (max_disk_size, max_disks, max_uploads, the digest block size, the upload length of a
disk, header_timeout for a request's header and read_timeout for its body).

Certificate mode is HTTPS with a required client certificate from our CA (no certificate, another CA,
an expired one or one without clientAuth fails the TLS handshake itself, counted as tls_refused).
Kerberos mode is HTTP with SPNEGO: each request carries `Authorization: Negotiate`, and each answer to an
authenticated request carries the acceptor's token so the client can check the server (mutual auth).
"""
from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import os
import re
import signal
import ssl
import threading
import uuid
from dataclasses import asdict

from aiohttp import web

from ..errors import DiskIOError, FormatError, ImageLocked, ReplicatorError, UsageError
from ..replica import ReplicaStore, SequenceError, StaleEpoch
from ..replica.limits import ReplicaLimits
from .auth import (EPOCH_HEADER, AuthenticationError, AuthorizationEntry, AuthorizationError, Ownership,
                   acceptor_credentials, authorize, certificate_principal, counting_sslobject, kerberos_accept,
                   parse_epoch)

log = logging.getLogger("replicator.transport")

MiB = 1 << 20
DEFAULT_PORTS = {"cert": 8084, "kerberos": 8083}
WRITE_SIZE, WRITE_DEPTH = MiB, 4     # spool writes of 1 MiB, up to 4 of them buffered per upload
PRINCIPAL = web.RequestKey("principal", str)
EPOCH = web.RequestKey("epoch", object)     # the request's fencing epoch (int), None without the header
MAX_DIGEST_BLOCK = 16 * MiB       # a digest request holds one window of max(8 MiB, block size)
MAX_NAME = 255
_MACHINE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")     # a machine name, as replicatord.toml's


class NotFound(ReplicatorError):
    """The request names a disk or upload the replica does not hold."""


class Busy(ReplicatorError):
    """Another request (often the torn-down half of a dropped connection) still holds this upload."""


_REFUSALS = [(AuthenticationError, 401, "unauthenticated"), (AuthorizationError, 403, "forbidden"),
             (NotFound, 404, "not_found"), (Busy, 409, "busy"), (ImageLocked, 409, "busy"),
             (StaleEpoch, 409, "fenced"), (SequenceError, 409, "sequence"),
             (FormatError, 422, "format")]


def _status_of(e: ReplicatorError) -> tuple[int, str]:
    """HTTP status and error code of a refusal (the client maps them back to its errors)."""
    for cls, status, code in _REFUSALS:
        if isinstance(e, cls):
            return status, code
    if isinstance(e, DiskIOError):
        full = "No space left" in e.message or "disk full" in e.message
        return (507, "disk_full") if full else (500, "io")
    return 400, "refused"


class _SpoolWriter:
    """Appends a request body to an Upload through WRITE_DEPTH buffers of WRITE_SIZE: the loop fills one
    while a thread of this upload's own writes the others in order (syncing every `interval` bytes), so
    network, disk writes and fsync overlap; with every buffer in flight the loop stops reading, so
    backpressure reaches the sender and memory stays bounded. After a failed write nothing more is
    written, so the spool never holds a gap."""

    def __init__(self, upload, interval: int, on_grow=None):
        self.upload, self.interval, self.unsynced, self.received = upload, interval, 0, 0
        self.on_grow = on_grow                  # called on the writing thread with the spool's new size
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")
        self.free = [bytearray(WRITE_SIZE) for _ in range(WRITE_DEPTH)]
        self.buf, self.fill = self.free.pop(), 0
        self.pending: collections.deque = collections.deque()
        self.failed = False

    async def feed(self, chunk: bytes) -> None:
        mv = memoryview(chunk)
        while mv:
            n = min(len(mv), WRITE_SIZE - self.fill)
            self.buf[self.fill:self.fill + n] = mv[:n]
            self.fill, mv = self.fill + n, mv[n:]
            if self.fill == WRITE_SIZE:
                self.pending.append((self.thread.submit(self._put, self.buf), self.buf))
                if not self.free:
                    await self._oldest()
                self.buf, self.fill = self.free.pop(), 0

    async def finish(self) -> int:
        last = self.thread.submit(self._finish, memoryview(self.buf)[:self.fill])
        while self.pending:
            await self._oldest()
        return await asyncio.wrap_future(last)

    def wait(self) -> None:
        """Block until no write is in flight: none may outlive the upload's file descriptor."""
        self.thread.shutdown(wait=True)

    async def _oldest(self) -> None:
        done, buf = self.pending.popleft()
        await asyncio.wrap_future(done)
        self.free.append(buf)

    def _put(self, data) -> None:
        if self.failed:
            return
        try:
            self.upload.write(self.upload.size, data)
            if self.on_grow is not None:
                self.on_grow(self.upload.size)
            self.unsynced += len(data)
            if self.unsynced >= self.interval:
                self.upload.sync()
                self.unsynced = 0
        except BaseException:
            self.failed = True
            raise

    def _finish(self, data) -> int:
        if self.failed:
            raise DiskIOError(f"{self.upload.path}: an earlier spool write failed")
        if len(data):
            self._put(data)
        return self.upload.sync()


class ReplicaServer:
    """Serves one or more storage roots to the primaries its authorization entries admit."""

    def __init__(self, entries: list[AuthorizationEntry], *, mode: str = "cert", host: str = "127.0.0.1",
                 port: int | None = None, certfile: str | None = None, keyfile: str | None = None,
                 cafile: str | None = None, keytab: str | None = None, service: str | None = None,
                 sync_interval: int = 16 * MiB, lock_timeout: float = 15.0, limits: ReplicaLimits | None = None,
                 **overrides):
        """limits (replica/limits.py), or single ones as keywords, bound what peers can make this server
        hold: read_timeout: a body (upload, JSON, digest answer) that makes no progress that long is dropped;
        header_timeout: a connection that sends no complete request header that long is closed;
        max_disk_size, max_disks (per trust group and root), max_uploads (spooled per disk),
        digest_requests (digest answers computed at once)."""
        if mode not in DEFAULT_PORTS:
            raise UsageError(f"unknown authentication mode {mode!r}: use cert or kerberos")
        if mode == "cert" and not (certfile and keyfile and cafile):
            raise UsageError("certificate mode needs the server certificate, its key and the CA certificate")
        if not entries:
            raise UsageError("no authorization entries: no primary could replicate here")
        self.limits = dataclasses.replace(limits or ReplicaLimits(), **overrides)
        for what, reason in self.limits.problems():
            raise UsageError(f"{what} {reason}")
        self.entries = list(entries)
        self.mode, self.host = mode, host
        self.port = DEFAULT_PORTS[mode] if port is None else port
        self.certfile, self.keyfile, self.cafile = certfile, keyfile, cafile
        self.keytab, self.service = keytab, service
        self.sync_interval, self.lock_timeout = sync_interval, lock_timeout
        lim = self.limits
        self.read_timeout, self.header_timeout = lim.read_timeout, lim.header_timeout
        self.max_disk_size, self.max_disks, self.max_uploads = lim.max_disk_size, lim.max_disks, lim.max_uploads
        self._digesting: asyncio.Semaphore | None = None
        self._lock_users: collections.Counter = collections.Counter()
        self.counters: collections.Counter = collections.Counter()
        self._stores: dict = {}
        self._owners: dict[str, Ownership] = {}
        self._locks: dict[tuple, asyncio.Lock] = {}
        self._gss_creds = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ setup
    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(self.certfile, self.keyfile)
        ctx.load_verify_locations(self.cafile)
        ctx.sslobject_class = counting_sslobject(self._tls_refused)
        return ctx

    def _tls_refused(self, e: ssl.SSLError) -> None:
        reason = getattr(e, "verify_message", None) or e.reason or type(e).__name__
        self.counters["tls_refused"] += 1
        self.counters[f"tls_refused:{reason}"] += 1
        log.warning("TLS handshake refused: %s", reason)

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        d, u = "/v1/disks/{disk}", "/v1/disks/{disk}/uploads/{stream}"
        app.add_routes([web.put(d, self.put_disk), web.get(d, self.get_disk), web.delete(d, self.delete_disk),
                        web.get(d + "/digests", self.get_digests), web.post(d + "/checkpoint", self.checkpoint),
                        web.put(d + "/domain", self.put_domain),
                        web.get(u, self.get_upload), web.put(u, self.put_upload),
                        web.delete(u, self.delete_upload), web.post(u + "/commit", self.commit),
                        web.get("/v1/health", self.health)])
        return app

    async def start(self) -> "ReplicaServer":
        ctx = None
        if self.mode == "cert":
            ctx = self.ssl_context()
        else:
            self._gss_creds = acceptor_credentials(self.keytab, self.service)
        self._digesting = asyncio.Semaphore(self.limits.digest_requests)
        await asyncio.get_running_loop().run_in_executor(None, self._sweep)
        # keepalive_timeout runs from the connection's start and after each answer, and closes a connection
        # whose next request header has not fully arrived by then (aiohttp's RequestHandler)
        self._runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False,
                                     read_bufsize=MiB, keepalive_timeout=self.header_timeout)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port, ssl_context=ctx, backlog=128).start()
        except BaseException:                   # a busy port: nothing of the runner may stay behind
            await self.stop()
            raise
        self.port = self._runner.addresses[0][1]
        return self

    def _sweep(self) -> None:
        """Open every disk of every root once: interrupted cycles are finished and spools nothing can use
        any more are removed (store.ReplicaDisk.sweep_spools) before the first request."""
        for entry in self.entries:
            if not os.path.isdir(os.path.join(entry.storage_root, "disks")):
                continue                        # nothing stored there yet (and nothing is created for it)
            store = self._store(entry)
            store.sweep_leftovers()
            for disk_id in store.disk_ids():
                try:
                    store.disk(disk_id)
                except (ReplicatorError, OSError) as e:
                    log.warning("replica disk %s in %s: %s", disk_id, store.root, getattr(e, "message", e))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        scheme = "https" if self.mode == "cert" else "http"
        return f"{scheme}://{self.host}:{self.port}"

    # ------------------------------------------------------------------ authentication and refusals
    @web.middleware
    async def _guard(self, request: web.Request, handler):
        self.counters["requests"] += 1
        mutual = None
        try:
            principal, mutual = await self._authenticate(request)
            request[PRINCIPAL] = principal
            resp = await handler(request)
        except ReplicatorError as e:
            resp = self._refusal(e, request)
        except OSError as e:                             # the store's own file handling (full disk, ...)
            resp = self._refusal(DiskIOError(f"{e.strerror or e}"), request)
        if mutual:
            resp.headers["WWW-Authenticate"] = "Negotiate " + base64.b64encode(mutual).decode()
        return resp

    def _refusal(self, e: ReplicatorError, request: web.Request) -> web.Response:
        status, code = _status_of(e)
        self.counters[f"refused:{code}"] += 1
        log.warning("%s %s refused (%s): %s", request.method, request.path, code, e.message)
        body = {"error": code, "message": e.message}
        if isinstance(e, StaleEpoch):                  # the client tells its operator which epoch won
            self.counters["rejected_fenced"] += 1
            body.update(epoch=e.known, failed_over=e.failed_over)
        resp = web.json_response(body, status=status)
        if status == 401 and self.mode == "kerberos":
            resp.headers["WWW-Authenticate"] = "Negotiate"
        return resp

    async def _authenticate(self, request: web.Request) -> tuple[str, bytes | None]:
        if self.mode == "cert":
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            return certificate_principal(peer), None
        header = request.headers.get("Authorization", "")
        if not header.startswith("Negotiate "):
            raise AuthenticationError("Kerberos authentication required (Authorization: Negotiate)")
        try:
            token = base64.b64decode(header[len("Negotiate "):], validate=True)
        except ValueError:
            raise AuthenticationError("malformed Negotiate token") from None
        return await asyncio.get_running_loop().run_in_executor(None, kerberos_accept, self._gss_creds, token)

    # ------------------------------------------------------------------ storage mapping
    async def _resolve(self, request: web.Request):
        """(store, disk id, entry) for this principal, checking no other trust group owns the disk (nothing
        is claimed here: put_disk claims once everything else was accepted), then the request's fencing
        epoch against the disk's (_fence)."""
        store, disk_id, entry = self._resolve_disk(request)
        await self._fence(request, store, disk_id)
        return store, disk_id, entry

    async def _fence(self, request: web.Request, store, disk_id: str) -> None:
        """Fencing: every disk route refuses an epoch older than the disk knows (409 fenced, counted as
        rejected_fenced) and adopts a newer one; no header, no check (standalone primaries). A disk not
        created yet takes the epoch when put_disk makes it. The disk's lock is taken only when something
        is written (a refusal's count, a new epoch); commit checks again under it."""
        epoch = request[EPOCH] = parse_epoch(request.headers.getall(EPOCH_HEADER, []))
        if epoch is None:
            return
        try:
            disk = store.disk(disk_id)
        except UsageError:
            return
        known = disk.state.epoch
        if known != epoch:
            if (known is None or epoch > known) and self._owners[store.root].owner(disk_id) is None:
                return          # claimed by nobody yet (a seed): only the PUT that claims it moves its epoch
            await self._in_disk(store, disk_id, disk.check_epoch, epoch)

    def _resolve_disk(self, request: web.Request):
        principal = request[PRINCIPAL]
        entry = self._entry(principal)
        try:
            disk_id = str(uuid.UUID(request.match_info["disk"]))
        except ValueError:
            raise UsageError(f"invalid disk id {request.match_info['disk']!r}") from None
        store = self._store(entry)
        try:
            self._owners[store.root].check(disk_id, entry, principal)
        except AuthorizationError:
            self.counters["unauthorized"] += 1
            raise
        return store, disk_id, entry

    def _entry(self, principal: str) -> AuthorizationEntry:
        try:
            return authorize(self.entries, principal, ignore_case=self.mode == "cert")
        except AuthorizationError:
            self.counters["unauthorized"] += 1
            raise

    def _store(self, entry: AuthorizationEntry):
        """The ReplicaStore of an entry's storage root (opened once, shared by every primary mapped there)."""
        root = os.path.abspath(entry.storage_root)
        if root not in self._stores:
            self._stores[root] = ReplicaStore(root)
            self._owners[root] = Ownership(root)
        return self._stores[root]

    def _lock(self, *key) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _held(self, key: tuple, timeout: float | None = None):
        """Hold the lock of `key`; it is forgotten when nobody holds or waits for it, so stream ids a peer
        makes up do not pile up locks."""
        self._lock_users[key] += 1
        try:
            lock = self._lock(*key)
            if timeout is None:
                await lock.acquire()
            else:
                try:
                    await asyncio.wait_for(lock.acquire(), timeout)
                except asyncio.TimeoutError:
                    raise Busy("another request is still using this upload; retry shortly") from None
            try:
                yield
            finally:
                lock.release()
        finally:
            self._lock_users[key] -= 1
            if not self._lock_users[key]:
                del self._lock_users[key]
                if len(key) > 2:                # upload locks; disk locks are shared with the replica site
                    self._locks.pop(key, None)

    def stores(self) -> dict[str, ReplicaStore]:
        """Every storage root's store, shared with the replica site's operations (one ReplicaDisk object per
        disk, so neither side saves a stale state over the other's)."""
        for entry in self.entries:
            self._store(entry)
        return dict(self._stores)

    def store_for(self, principal: str) -> ReplicaStore:
        """The store a primary's principal is mapped to (its authorization entry's storage root)."""
        return self._store(authorize(self.entries, principal, ignore_case=self.mode == "cert"))

    def disk_lock(self, store: ReplicaStore, disk_id: str) -> asyncio.Lock:
        """The lock state-changing calls on a disk take (cycles' commits, failovers, adoptions)."""
        return self._lock(store.root, str(disk_id))

    async def _disk(self, store, disk_id: str):
        try:
            return store.disk(disk_id)
        except UsageError:
            raise NotFound(f"this replica holds no disk {disk_id} for you") from None

    async def _in_disk(self, store, disk_id: str, fn, *args):
        """Run a state-changing call on the disk in a thread, one at a time per disk."""
        async with self._held((store.root, disk_id)):
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _count(self, store, disk_id: str, what: str) -> None:
        self.counters[what] += 1
        try:
            disk = await self._disk(store, disk_id)
            await self._in_disk(store, disk_id, disk.count, what)
        except (ReplicatorError, OSError) as e:       # a full disk cannot take the count; keep ours
            log.warning("could not record %s on disk %s: %s", what, disk_id, e)

    # ------------------------------------------------------------------ disks
    async def delete_disk(self, request: web.Request) -> web.Response:
        """The primary removed protection with delete_replica_on_remove: the replica and its points go."""
        store, disk_id, _ = await self._resolve(request)
        removed = await self._in_disk(store, disk_id, store.remove, disk_id)
        self.counters["disks_deleted"] += int(removed)
        return web.json_response({"deleted": removed})

    async def put_disk(self, request: web.Request) -> web.Response:
        """Create or check a disk. Everything is decided before anything is created: the body, the limits,
        the owner; the disk is made whole (store.ensure_disk) before its id is claimed for the group."""
        store, disk_id, entry = await self._resolve(request)
        size, block_size, name, machine = self._disk_request(await self._body(request))
        owners = self._owners[store.root]

        def ensure():
            owners.check(disk_id, entry, request[PRINCIPAL])
            if owners.owner(disk_id) is None and disk_id not in store.disk_ids() \
                    and owners.count(entry.group) >= self.max_disks:
                raise UsageError(f"trust group {entry.group!r} already holds {self.max_disks} disks here "
                                 "(the replica's max_disks)")
            with contextlib.suppress(UsageError):                  # before a failed-over disk says "sequence"
                store.disk(disk_id).check_epoch(request[EPOCH])
            disk = store.ensure_disk(disk_id, size, name=name, block_size=block_size, machine=machine)
            disk.check_epoch(request[EPOCH])                         # a new disk starts at the sender's epoch
            owners.claim(disk_id, entry)
            return disk
        disk = await self._in_disk(store, disk_id, ensure)
        return web.json_response(_disk_view(disk))

    def _disk_request(self, body: dict) -> tuple[int, int, str, str]:
        """(size, block size, name, machine) of a disk request, every field checked."""
        size, block_size = body.get("size"), body.get("block_size", 2 * MiB)
        name, machine = body.get("name", ""), body.get("machine", "")    # machine absent: older primaries
        if not _is_int(size) or not _is_int(block_size) or not isinstance(name, str) or not isinstance(machine, str):
            raise UsageError("disk request needs an integer size (and optionally a string name, an integer "
                             "block_size, a string machine)")
        if not 0 < size <= self.max_disk_size or size % 512:
            raise UsageError(f"disk size {size}: a multiple of 512 bytes up to {self.max_disk_size} (the "
                             "replica's max_disk_size)")
        if not MiB <= block_size <= 256 * MiB or block_size & (block_size - 1):
            raise UsageError(f"block_size {block_size}: a power of two from 1 MiB to 256 MiB")
        if len(name) > MAX_NAME or not name.isprintable():
            raise UsageError(f"disk name {name[:80]!r}: printable, at most {MAX_NAME} characters")
        if machine and not _MACHINE.match(machine):
            raise UsageError(f"machine name {machine[:80]!r}: letters, digits, '.', '_', '-' (at most 64)")
        return size, block_size, name, machine

    async def _body(self, request: web.Request) -> dict:
        """The JSON body, read within read_timeout (aiohttp bounds its size: client_max_size)."""
        try:
            return await asyncio.wait_for(_json(request), self.read_timeout)
        except asyncio.TimeoutError:
            raise UsageError(f"request body not received within {self.read_timeout} s") from None

    async def get_digests(self, request: web.Request) -> web.Response:
        """Block digests of the replica image, so a primary's checksum resync sends only what differs."""
        store, disk_id, _ = await self._resolve(request)
        disk = await self._disk(store, disk_id)
        raw = request.query.get("block_size", "65536")
        block_size = int(raw) if raw.isdigit() and len(raw) < 12 else 0
        if block_size < 4096 or block_size > MAX_DIGEST_BLOCK or block_size & (block_size - 1):
            raise UsageError(f"block_size must be a power of two from 4096 to {MAX_DIGEST_BLOCK}, not {raw[:40]!r}")
        if disk.generation == 0 and not disk.state.adopted:
            return web.Response(status=204)
        async with self._digesting, self._held((store.root, disk_id)):
            return await self._stream_digests(request, disk, block_size)

    async def _stream_digests(self, request: web.Request, disk, block_size: int) -> web.StreamResponse:
        """The digests window by window: the server holds one window's buffer, whatever the disk's size.
        The length is announced first, so a client sees an answer cut short by a failure."""
        from ..resync.engine import Grid, digest_window
        run = asyncio.get_running_loop().run_in_executor
        img = await run(None, disk.open_image)
        try:
            grid = Grid(block_size, img.size)
            buf = bytearray(grid.window_blocks * block_size)
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = grid.n_blocks * 16
            await resp.prepare(request)
            for index in range(grid.n_windows):
                w = await run(None, digest_window, img, grid, index, buf)
                await asyncio.wait_for(resp.write(w.digests.astype("<u8").tobytes()), self.read_timeout)
            await resp.write_eof()
            return resp
        finally:
            await run(None, img.close)

    async def checkpoint(self, request: web.Request) -> web.Response:
        store, disk_id, _ = await self._resolve(request)
        disk = await self._disk(store, disk_id)
        body = await self._body(request)
        try:
            generation, point, prepared = body["generation"], body["point"], bool(body.get("prepared"))
            keep, disks = body.get("additional_points"), body.get("disks")
            if not _is_int(generation) or not _is_int(point) or not (keep is None or _is_int(keep)) \
                    or not (disks is None or _is_int(disks)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise UsageError("checkpoint needs integer generation and point (and optionally prepared, "
                             "additional_points, disks)") from None
        await self._in_disk(store, disk_id, disk.record_checkpoint, generation, point, prepared, keep, disks)
        return web.json_response(_disk_view(disk))

    async def put_domain(self, request: web.Request) -> web.Response:
        """The machine's domain configuration, kept in the disk's folder: only a primary of the trust group
        owning the disk can write it (as every disk route), the body bounded (aiohttp's client_max_size,
        1 MiB, and domains.MAX_CONFIG), checked before it is written."""
        from ..daemon.domains import write_config
        store, disk_id, _ = await self._resolve(request)
        disk = await self._disk(store, disk_id)
        payload = await self._body(request)
        await self._in_disk(store, disk_id, write_config, disk.path, payload)
        self.counters["domain_configs"] += 1
        return web.json_response({"kept": True})

    async def get_disk(self, request: web.Request) -> web.Response:
        store, disk_id, _ = await self._resolve(request)
        return web.json_response(_disk_view(await self._disk(store, disk_id)))

    async def health(self, request: web.Request) -> web.Response:
        principal = request[PRINCIPAL]
        entry = self._entry(principal)
        disks = {}
        store = self._store(entry)
        for disk_id, group in self._owners[store.root]._load().items():
            if group == entry.group and disk_id in store.disk_ids():
                disks[disk_id] = dict(store.disk(disk_id).state.counters)
        return web.json_response({"principal": principal, "server": dict(self.counters), "disks": disks})

    # ------------------------------------------------------------------ uploads
    @contextlib.asynccontextmanager
    async def _upload(self, request: web.Request):
        """(store, disk id, disk, stream id) of the request, holding that upload's lock: one request at a
        time per upload (a resume waits for the torn-down half of a dropped connection)."""
        store, disk_id, _ = await self._resolve(request)
        disk = await self._disk(store, disk_id)
        stream = request.match_info["stream"]
        disk.spool_path(stream)                        # validates the stream id
        async with self._held((store.root, disk_id, stream), self.lock_timeout):
            yield store, disk_id, disk, stream

    async def get_upload(self, request: web.Request) -> web.Response:
        async with self._upload(request) as (_, _, disk, stream):
            if not os.path.exists(disk.spool_path(stream)):
                return web.json_response({"durable": 0, "digest": _empty_digest().hex()})
            upload = disk.open_upload(stream)
            try:
                digest = await asyncio.get_running_loop().run_in_executor(None, upload.prefix_digest)
                return web.json_response({"durable": upload.durable, "digest": digest.hex()})
            finally:
                upload.close()

    async def put_upload(self, request: web.Request) -> web.Response:
        raw = request.query.get("offset", "")
        if not raw.isdigit() or len(raw) > 20:
            raise UsageError("upload needs ?offset=N (the durable length the sender resumes from)")
        offset = int(raw)
        async with self._upload(request) as (store, disk_id, disk, stream):
            held = disk.upload_length(stream)
            if offset != (held or 0):                  # refused before any spool is created
                await self._count(store, disk_id, "upload_refused_offset")
                raise SequenceError(f"upload {stream} continues at byte {held or 0}, not at {offset}: "
                                    "ask for the resume token first")
            if held is None and len(_spools(disk)) >= self.max_uploads:
                raise UsageError(f"disk {disk_id} already holds {self.max_uploads} unfinished uploads (the replica's "
                           "max_uploads): commit or delete one first")
            first = b""
            if held is None:                           # no spool until the body starts with a stream's header
                first = await self._stream_header(request, stream)
                if not first:
                    return web.json_response({"durable": 0})
            upload = disk.open_upload(stream)
            try:
                durable = await self._receive(request, store, disk_id, disk, stream, upload, first)
            finally:
                upload.close()
        return web.json_response({"durable": durable})

    async def _stream_header(self, request: web.Request, stream: str) -> bytes:
        """The raw header a new upload's body begins with, read within read_timeout and checked: bytes that
        are not a delta stream can never be committed, so they are refused before a spool exists (b"": the
        body ended first: no spool is made for nothing)."""
        from ..delta.format import MAGIC, MAX_HEADER_BODY, PREFIX, read_header
        raw = bytearray()

        async def take(n: int) -> bool:
            while len(raw) < n:
                chunk = await request.content.read(n - len(raw))
                if not chunk:
                    return False
                raw.extend(chunk)
            return True
        try:
            complete = await asyncio.wait_for(take(PREFIX.size), self.read_timeout)
            if complete:
                length = PREFIX.unpack_from(raw)[3]
                if length <= MAX_HEADER_BODY:
                    complete = await asyncio.wait_for(take(PREFIX.size + length + 4), self.read_timeout)
        except asyncio.TimeoutError:
            raise UsageError(f"upload {stream}: no stream header within {self.read_timeout} s") from None
        except Exception:             # noqa: BLE001 -- the sender went away: nothing arrived to keep
            return b""
        if not complete:              # the body ended inside the header: kept for a resume, unless junk
            if not MAGIC.startswith(bytes(raw[:len(MAGIC)])):
                raise UsageError(f"upload {stream} is not a delta stream (bad magic)")
            return bytes(raw)
        try:
            read_header(io.BytesIO(raw).read)
        except FormatError as e:
            raise UsageError(f"upload {stream} is not a delta stream: {e.message}") from None
        return bytes(raw)

    async def _receive(self, request: web.Request, store, disk_id: str, disk, stream: str, upload,
                       first: bytes = b"") -> int:
        """Spool the body as it arrives (see _SpoolWriter); a sender that goes away mid-body keeps what
        arrived, a failed write keeps only what was synced. An upload from byte 0 is checked as it arrives
        (replica/precheck.py), so its commit only has to apply."""
        check = disk.precheck(stream, upload)
        writer = _SpoolWriter(upload, self.sync_interval, check.grew if check is not None else None)
        dropped, durable = None, None
        watchdog = self._watch(request, writer, -1)
        try:
            try:
                limit = _upload_limit(disk.state.size) - upload.size
                async for chunk in _body_chunks(first, request):
                    self.counters["bytes_received"] += len(chunk)
                    writer.received += len(chunk)
                    if writer.received > limit:
                        raise UsageError(f"upload {stream} is longer than any stream of a {disk.state.size}-byte "
                                         f"disk can be ({_upload_limit(disk.state.size)} bytes)")
                    await writer.feed(chunk)
            except (ReplicatorError, asyncio.CancelledError):
                raise
            except Exception as e:
                dropped = e
            durable = await writer.finish()
        except DiskIOError as e:
            writer.wait()
            os.truncate(upload.path, upload.durable)
            await self._count(store, disk_id, f"upload_{_status_of(e)[1]}")
            raise
        except UsageError:                    # too long: nothing of it can ever be committed
            writer.wait()
            disk.abort(stream)
            await self._count(store, disk_id, "upload_refused_length")
            raise
        finally:
            watchdog.cancel()
            writer.wait()
            if check is not None:
                result = await asyncio.get_running_loop().run_in_executor(None, check.finish)
                if result is not None and dropped is None and durable == result.size:
                    disk.keep_precheck(result)
                elif result is not None:
                    result.discard()
        if dropped is not None:
            await self._count(store, disk_id, "upload_interrupted")
            raise UsageError(f"upload interrupted at byte {durable}: {dropped}")
        return durable

    def _watch(self, request: web.Request, writer: "_SpoolWriter", seen: int) -> asyncio.TimerHandle:
        """Abort a connection whose body makes no progress for read_timeout seconds, so a half-open
        connection cannot hold its upload's lock forever."""
        def check():
            if writer.received == seen and request.transport is not None:
                log.warning("upload stalled for %s s: closing the connection", self.read_timeout)
                request.transport.abort()
            else:
                self._watch(request, writer, writer.received)
        return asyncio.get_running_loop().call_later(self.read_timeout, check)

    async def delete_upload(self, request: web.Request) -> web.Response:
        async with self._upload(request) as (store, disk_id, disk, stream):
            disk.abort(stream)
        if request.query.get("reason") == "resume-token":      # the sender found our spool corrupt
            await self._count(store, disk_id, "resume_token_refused")
        return web.json_response({"aborted": stream})

    async def commit(self, request: web.Request) -> web.Response:
        async with self._upload(request) as (store, disk_id, disk, stream):
            if not os.path.exists(disk.spool_path(stream)):
                raise NotFound(f"no upload {stream} to commit on disk {disk_id}")
            point = await self._in_disk(store, disk_id, disk.commit, stream, request[EPOCH])
        self.counters["commits"] += 1
        return web.json_response({"point": asdict(point), "generation": disk.generation})

    # ------------------------------------------------------------------ running
    def serve_forever(self, on_ready=None) -> None:
        """Run on uvloop until SIGINT or SIGTERM (the CLI's server)."""
        import uvloop

        async def main():
            await self.start()
            if on_ready:
                on_ready(self)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await stop.wait()
            finally:
                await self.stop()

        uvloop.run(main())


class ServerThread:
    """A ReplicaServer on its own uvloop thread, for tests and synchronous embedders."""

    def __init__(self, server: ReplicaServer):
        import uvloop
        self.server = server
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="replica-server", daemon=True)

    def start(self) -> ReplicaServer:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        except BaseException:                   # e.g. a busy port: the loop's thread goes with it
            self.stop()
            raise
        return self.server

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_closed() and not self.loop.is_running():
            self.loop.run_until_complete(self.loop.shutdown_default_executor())    # its threads too
            self.loop.close()


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise UsageError("request body is not JSON") from None
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    return body


async def _body_chunks(first: bytes, request: web.Request):
    """The upload's body: the header already read (_stream_header), then the rest as it arrives."""
    if first:
        yield first
    async for chunk in request.content.iter_any():
        yield chunk


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63


def _upload_limit(disk_size: int) -> int:
    """The longest stream of a disk: all of it as raw frames (frame headers are 1/1000 of the data even at
    the smallest frames a primary writes) plus the header and trailer."""
    return disk_size + disk_size // 64 + 64 * MiB


def _spools(disk) -> list[str]:
    spool = os.path.join(disk.path, "spool")
    return sorted(n for n in os.listdir(spool) if n.endswith(".delta"))


def _empty_digest() -> bytes:
    from ..kernels import Xxh3Hasher
    return Xxh3Hasher().digest()


def _disk_view(disk) -> dict:
    uploads = {}
    for n in _spools(disk):
        try:
            uploads[n[:-len(".delta")]] = disk.upload_length(n[:-len(".delta")]) or 0
        except UsageError:                # not a stream id: a file someone put there
            continue
    s = disk.state
    return {"disk_id": s.disk_id, "name": s.name, "size": s.size, "block_size": s.block_size,
            "generation": s.generation, "points": [asdict(p) for p in s.points], "uploads": uploads,
            "committed": [sid for sid, _ in s.committed], "machine": s.machine, "prepared": s.prepared,
            "failed_over": bool(s.failover), "adopted": s.adopted, "epoch": s.epoch}
