"""Page requests to one page blob: retries with backoff, adaptive concurrency, ordering, progress.

Put Page takes at most 4 MiB of 512-byte-aligned data; Clear Page any aligned range. Requests run in
parallel, as many as an AIMD window allows: one more per window of successes, half as many when the
service throttles (503, 500, timeouts), so a busy account is eased off instead of hammered. Requests whose
ranges overlap run in stream order, so a later frame always wins. `watermark` is the number of stream
frames whose pages are all acknowledged, in order: what the Checkpointer records in the blob's metadata
so a send killed at any point resumes after it. `feed` decodes the stream off the event loop.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import deque

import numpy as np

from .. import delta, kernels
from .errors import classify, is_transient

SECTOR = 512
MAX_PUT = 4 << 20                # Put Page limit per request
BATCH_BYTES = 8 << 20            # frames decoded per trip to the decoding thread
CLEAR_CHUNK = 1 << 30            # Clear Page has no size limit; chunks keep progress (and retries) fine-grained


def align_down(n: int) -> int:
    return n - n % SECTOR


def align_up(n: int) -> int:
    return -(-n // SECTOR) * SECTOR


class Window:
    """AIMD concurrency limit shared by every request of one send."""

    def __init__(self, maximum: int, start: int | None = None):
        self.maximum = max(1, maximum)
        self.limit = float(min(self.maximum, start or max(2, self.maximum // 2)))
        self.inflight = 0
        self.cuts = 0
        self._last_cut = 0.0
        self._waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> None:
        while self.inflight >= int(self.limit):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def success(self) -> None:
        self.limit = min(self.maximum, self.limit + 1.0 / self.limit)

    def congestion(self) -> None:
        """Halve, at most once per half second: one burst of 503s is one signal, not ten."""
        now = time.monotonic()
        if now - self._last_cut >= 0.5:
            self.limit = max(1.0, self.limit / 2)
            self._last_cut = now
            self.cuts += 1


class Caller:
    """Runs one SDK call with our own retries (the SDK's are switched off per call, so every retry is seen
    here and slows the window). Gives up with TargetUnavailable, which the Retry decorator resumes."""

    def __init__(self, window: Window, *, attempts: int = 6, base_delay: float = 0.25, max_delay: float = 8.0,
                 timeout: float = 120.0):
        self.window, self.attempts, self.timeout = window, attempts, timeout
        self.base_delay, self.max_delay = base_delay, max_delay
        self.retries = 0

    async def __call__(self, what: str, fn, *args, **kw):
        for attempt in range(self.attempts):
            try:
                return await asyncio.wait_for(fn(*args, retry_total=0, **kw), self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:       # noqa: BLE001 - every failure is classified below
                if not is_transient(e) or attempt == self.attempts - 1:
                    raise classify(e, what) from None
                self.retries += 1
                self.window.congestion()
                delay = min(self.max_delay, self.base_delay * 2 ** attempt)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))


class PageChannel:
    """Parallel page requests to one blob under a lease, in an order that keeps overlapping writes right."""

    def __init__(self, blob, lease: str, caller: Caller, *, throttle=None, on_progress=None, cipher=None):
        """`cipher` (crypto.DiskCipher): pages are encrypted on their way out and decrypted when read."""
        self.blob, self.lease, self.caller, self.cipher = blob, lease, caller, cipher
        self.window = caller.window
        self.throttle, self.on_progress = throttle, on_progress
        self.watermark = 0
        self.error: BaseException | None = None
        self.bytes_put = self.bytes_cleared = self.requests = 0
        self._entries: deque[list] = deque()          # [frames_done, finished] in issue order
        self._inflight: dict[int, tuple[int, int, asyncio.Task]] = {}
        self._next = 0

    @property
    def name(self) -> str:
        return f"{self.blob.container_name}/{self.blob.blob_name}"

    async def put(self, offset: int, data: bytes, frames_done: int) -> None:
        if self.throttle is not None:
            await self.throttle(len(data))
        if self.cipher is not None:
            data = await asyncio.to_thread(self.cipher.encrypt, offset, data)
        await self._launch(offset, offset + len(data), frames_done, "Put Page", self.blob.upload_page, data,
                           offset=offset, length=len(data), lease=self.lease)

    async def clear(self, offset: int, length: int, frames_done: int) -> None:
        await self._launch(offset, offset + length, frames_done, "Clear Page", self.blob.clear_page,
                           offset=offset, length=length, lease=self.lease)

    def mark(self, frames_done: int) -> None:
        """Frames up to here are done once every request issued before is."""
        self._entries.append([frames_done, True])
        self._advance()

    async def read(self, offset: int, length: int) -> bytes:
        """Current bytes of a range (to complete a partial sector), after any pending write to it."""
        await self._wait_overlaps(offset, offset + length)
        self._raise()
        lo, hi = (align_down(offset), align_up(offset + length)) if self.cipher else (offset, offset + length)
        stream = await self.caller(f"read {self.name}", self.blob.download_blob, offset=lo, length=hi - lo)
        data = await stream.readall()
        if self.cipher is not None:
            data = self.cipher.decrypt(lo, data)[offset - lo:offset - lo + length]
        return data

    async def drain(self) -> None:
        while self._inflight:
            await asyncio.wait([t for _, _, t in self._inflight.values()])
        self._raise()

    def abort(self) -> None:
        for _, _, task in list(self._inflight.values()):
            task.cancel()

    # ---- internals
    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    async def _wait_overlaps(self, start: int, end: int) -> None:
        tasks = [t for s, e, t in self._inflight.values() if s < end and start < e]
        if tasks:
            await asyncio.wait(tasks)

    async def _launch(self, start, end, frames_done, verb, fn, *args, **kw) -> None:
        self._raise()
        await self._wait_overlaps(start, end)
        await self.window.acquire()
        if self.error is not None:
            self.window.release()
            self._raise()
        entry = [frames_done, False]
        self._entries.append(entry)
        key, self._next = self._next, self._next + 1
        what = f"{verb} [{start}, {end}) on {self.name}"
        task = asyncio.create_task(self._run(key, entry, end - start, verb, what, fn, args, kw))
        self._inflight[key] = (start, end, task)

    async def _run(self, key, entry, length, verb, what, fn, args, kw) -> None:
        try:
            await self.caller(what, fn, *args, **kw)
        except asyncio.CancelledError:
            self.error = self.error or asyncio.CancelledError()
            raise
        except BaseException as e:      # noqa: BLE001 - kept and raised to the producer
            self.error = self.error or e
            return
        finally:
            self.window.release()
            self._inflight.pop(key, None)
        self.window.success()
        self.requests += 1
        if verb == "Put Page":
            self.bytes_put += length
        else:
            self.bytes_cleared += length
        entry[1] = True
        self._advance()

    def _advance(self) -> None:
        moved = False
        while self._entries and self._entries[0][1]:
            self.watermark = self._entries.popleft()[0]
            moved = True
        if moved and self.on_progress is not None:
            self.on_progress(self.watermark)


class PageApplier:
    """Turns verified delta frames into sector-aligned page requests: contiguous data is coalesced into Put
    Pages of up to 4 MiB, ZERO/TRIM become Clear Page, a partial sector is completed by reading it back.
    With `skip_zeros` (a full stream onto a blob that reads as zeros) only non-zero sectors are sent and ZERO
    frames send nothing. A request costs far more than a few KiB of bytes, so a zero gap of up to `zero_gap`
    bytes between two non-zero runs is sent along instead of splitting the request, as long as the zeros
    sent stay within `bridge_ratio` of the data sent (the bytes-on-the-wire budget)."""

    def __init__(self, channel: PageChannel, disk_size: int, *, skip_zeros: bool, zero_gap: int = 64 << 10,
                 bridge_ratio: float = 0.048):
        self.ch = channel
        self.disk_size = disk_size
        self.skip = skip_zeros
        self.zero_gap, self.bridge_ratio = zero_gap, bridge_ratio
        self.data_bytes = self.bridged = 0
        self.buf = bytearray()
        self.at = 0
        self.index = 0
        self.high = 0                # end of the furthest frame so far; skipping needs frames in disk order
        self.on_frame = None         # sees every frame, applied or passed (digests.DigestUpdate.frame)

    def passed(self, frame) -> None:
        """A frame before the resume point: not applied again, but it counts for the ordering check."""
        self._order(frame)
        if self.on_frame is not None:
            self.on_frame(frame)

    async def apply(self, index: int, frame) -> None:
        self.index = index
        if self.on_frame is not None:
            self.on_frame(frame)
        skip = self._order(frame) and self.skip
        if frame.data is None:
            if not skip:
                await self._clear(frame.offset, frame.length)
        elif skip:
            mv = memoryview(frame.data)
            for a, b in self._nonzero_runs(frame.offset, mv):
                await self._add(frame.offset + a, mv[a:b])
        else:
            await self._add(frame.offset, memoryview(frame.data))
        if not self.buf:
            self.ch.mark(index + 1)

    async def finish(self, frames: int) -> None:
        self.index = frames
        await self._flush()
        self.ch.mark(frames)
        await self.ch.drain()

    # ---- data
    def _order(self, frame) -> bool:
        """False (and no more zero skipping) once a frame goes back over ranges already written."""
        if frame.offset < self.high:
            self.skip = False
        self.high = max(self.high, frame.offset + frame.length)
        return self.skip

    async def _add(self, offset: int, data: memoryview) -> None:
        gap = offset - self.at - len(self.buf)
        if self.buf and gap and not self._bridge(gap):
            await self._flush()
        if not self.buf:
            self.at = align_down(offset)
            if self.at != offset:
                self.buf += await self.ch.read(self.at, offset - self.at)
        pos = 0
        while pos < len(data):
            n = min(MAX_PUT - len(self.buf), len(data) - pos)
            self.buf += data[pos:pos + n]
            pos += n
            if len(self.buf) == MAX_PUT:
                await self._issue()

    def _bridge(self, gap: int) -> bool:
        """Send `gap` zero bytes (known zeros on the blob) to keep one request going, if within budget."""
        if not self.skip or gap < 0 or gap > self.zero_gap or len(self.buf) + gap >= MAX_PUT:
            return False
        if self.bridged + gap > self.bridge_ratio * self.data_bytes:
            return False
        self.buf += bytes(gap)
        self.bridged += gap
        return True

    async def _flush(self) -> None:
        if not self.buf:
            return
        end = self.at + len(self.buf)
        if end % SECTOR:
            pad = align_up(end) - end
            self.buf += bytes(pad) if end >= self.disk_size else await self.ch.read(end, pad)
        await self._issue()

    async def _issue(self) -> None:
        data, at = bytes(self.buf), self.at
        self.buf = bytearray()
        self.at = at + len(data)
        await self.ch.put(at, data, self.index)

    async def _clear(self, offset: int, length: int) -> None:
        await self._flush()
        end = offset + length
        lo = align_up(offset)
        hi = align_up(end) if end >= self.disk_size else align_down(end)
        if lo >= hi:                               # within one sector: write the zeros
            await self._zeros(offset, length)
            return
        if offset < lo:
            await self._zeros(offset, lo - offset)
        for pos in range(lo, hi, CLEAR_CHUNK):
            await self.ch.clear(pos, min(CLEAR_CHUNK, hi - pos), self.index)
        if hi < end:
            await self._zeros(hi, end - hi)

    async def _zeros(self, offset: int, length: int) -> None:
        await self._add(offset, memoryview(bytes(length)))
        await self._flush()

    def _nonzero_runs(self, offset: int, mv: memoryview) -> list[tuple[int, int]]:
        """(start, end) pieces of a frame holding non-zero sectors (the native kernel finds them); frames not
        on a sector boundary are sent whole."""
        zb = kernels.zero_blocks(mv, SECTOR)         # True where a sector is all zeros
        if zb.all():
            return []
        if offset % SECTOR or not zb.any():
            self.data_bytes += len(mv)
            return [(0, len(mv))]
        edges = np.flatnonzero(np.diff(zb.astype(np.int8))) + 1
        bounds = np.concatenate(([0], edges, [len(zb)])).tolist()
        runs = [(a * SECTOR, min(b * SECTOR, len(mv))) for a, b in zip(bounds[:-1], bounds[1:]) if not zb[a]]
        self.data_bytes += sum(b - a for a, b in runs)
        return runs


class Checkpointer:
    """Records a send's progress (state.ip: frames acknowledged, bytes) through `write()` (which stores the
    state in the blob metadata) every so many bytes or seconds, one write at a time; a failed write (say,
    the lease was lost) fails the send at its end, never silently."""

    def __init__(self, state, write, every_bytes: int, every_seconds: float):
        self.state, self.write = state, write
        self.every_bytes, self.every_seconds = every_bytes, every_seconds
        self.base_bytes = 0
        self.saved_bytes, self.saved_at = 0, time.monotonic()
        self.task: asyncio.Task | None = None
        self.error: BaseException | None = None
        self.latest = (0, 0)
        self.count = 0

    def progress(self, watermark: int, bytes_put: int) -> None:
        self.latest = (watermark, bytes_put)
        due = (bytes_put - self.saved_bytes >= self.every_bytes
               or time.monotonic() - self.saved_at >= self.every_seconds)
        if due and (self.task is None or self.task.done()) and watermark > 0:
            self._collect()
            self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        """Save the newest progress; if more became due while saving, save again at once."""
        while self.latest[0] > self.state.ip.frames_done or not self.count:
            watermark, bytes_put = self.latest
            await self._save(watermark, bytes_put)
            if self.latest[1] - self.saved_bytes < self.every_bytes:
                break

    def _collect(self) -> None:
        if self.task is not None and self.task.done() and not self.task.cancelled():
            self.error = self.error or self.task.exception()

    async def _save(self, watermark: int, bytes_put: int) -> None:
        self.saved_bytes, self.saved_at = bytes_put, time.monotonic()
        ip = self.state.ip
        ip.frames_done = watermark
        ip.bytes_done = self.base_bytes + bytes_put
        await self.write()
        self.count += 1

    async def wait(self) -> None:
        if self.task is not None:
            await asyncio.wait([self.task])
            self._collect()
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def last_try(self, watermark: int, bytes_put: int) -> None:
        """After a failure: record how far we got, if the service still listens (best effort)."""
        try:
            if self.task is not None and not self.task.done():
                await asyncio.wait([self.task])
            if watermark > 0:
                await self._save(watermark, bytes_put)
        except Exception:            # noqa: BLE001 - the original failure is what the caller must see
            pass


async def feed(path: str, applier: PageApplier, resume: int) -> int:
    """Decode the stream in a worker thread, batch by batch, and hand frames from `resume` on to the applier."""
    f = open(path, "rb")
    try:
        frames = iter(delta.DeltaDecoder(f, path=path))
        index = 0
        while True:
            batch = await asyncio.to_thread(_next_batch, frames)
            if not batch:
                break
            for frame in batch:
                if index < resume:
                    applier.passed(frame)
                else:
                    await applier.apply(index, frame)
                index += 1
        await applier.finish(index)
        return index
    finally:
        f.close()


def _next_batch(frames) -> list:
    out, size = [], 0
    for frame in frames:
        out.append(frame)
        size += len(frame.data) if frame.data is not None else 0
        if size >= BATCH_BYTES or len(out) >= 4096:
            break
    return out
