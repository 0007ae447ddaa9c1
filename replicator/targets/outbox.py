"""Outbox streams: a cycle's delta stream file, readable while the encoder is still writing it.

The encoder runs on its own thread and publishes how far the file is written; a sender reads what is there
and waits for more, and learns the final size when the encoder finishes. Encoding, the upload and the
replica's checks then overlap instead of running one after the other. The file stays in the outbox until
the replica committed it, so a resumed upload reads the same bytes again.

Targets receive either a path (a finished stream: seeds, a stream left by an interrupted run) or an
OutboxStream; `OutboxStream.of()` makes both look the same.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading

from ..errors import DiskIOError, ReplicatorError

PUBLISH = 1 << 20          # the encoder's bytes become readable in steps of about this much


class EncoderFailed(ReplicatorError):
    """The stream being read could not be finished by its encoder (the encoder's own error is raised to
    the cycle; readers see this one)."""


class OutboxStream:
    def __init__(self, path: str, *, finished: bool = False, recycle: str | None = None):
        """finished: the file is a complete stream. Otherwise an encoder is about to write it; `recycle`
        names a spent stream file to write over instead of a new one (see recycle())."""
        self.path = path
        self._cond = threading.Condition()
        try:
            self._written = os.path.getsize(path) if finished else 0
        except OSError as e:
            raise DiskIOError(f"{path}: cannot read the outbox stream: {e.strerror}") from None
        self._final: int | None = self._written if finished else None
        self._error: BaseException | None = None
        if not finished:                  # readers may open it before the encoder's first write
            if recycle is not None and os.path.exists(recycle):
                os.replace(recycle, path)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644))

    @staticmethod
    def recycle(path: str, spent: str) -> None:
        """Keep a sent stream's file to write the next stream over, as databases recycle log segments: its
        pages stay in the page cache, so the next encoder overwrites cached pages instead of allocating new
        ones (the largest cost of writing a file on a VM whose free memory went back to the host)."""
        os.replace(path, spent)

    @classmethod
    def of(cls, source) -> "OutboxStream":
        return source if isinstance(source, OutboxStream) else cls(os.fspath(source), finished=True)

    # ------------------------------------------------------------------ the encoder's side
    @contextlib.contextmanager
    def writer(self):
        """A file object for the encoder (only .write is used). Leaving the block normally finishes the
        stream; an exception marks it failed, which wakes every reader."""
        sink = _Sink(self)
        try:
            yield sink
            sink.close()
        except BaseException as e:
            sink.abandon()
            self._set(error=e)
            raise
        self._set(final=sink.size)

    def _set(self, *, written: int | None = None, final: int | None = None, error: BaseException | None = None):
        with self._cond:
            if written is not None:
                self._written = written
            if final is not None:
                self._written = self._final = final
            if error is not None:
                self._error = error
            self._cond.notify_all()

    # ------------------------------------------------------------------ the readers' side
    @property
    def final(self) -> int | None:
        """The stream's size once the encoder finished, else None."""
        return self._final

    def wait(self, offset: int) -> int:
        """Block until more than `offset` bytes are readable or the stream is finished; returns how many
        bytes are readable."""
        with self._cond:
            while self._written <= offset and self._final is None and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise EncoderFailed(f"{self.path}: the stream's encoder failed: {self._error}")
            return self._written

    async def reach(self, offset: int) -> int:
        """`wait` for asyncio callers."""
        if self._final is not None or self._written > offset:
            return self.wait(offset)
        return await asyncio.to_thread(self.wait, offset)

    async def complete(self) -> int:
        """Wait for the encoder to finish; the final size."""
        while self._final is None:
            await self.reach(self._written)
        return self._final

    def read_chunks(self, offset: int, chunk: int = 1 << 20):
        """The bytes from `offset` to the end, as they become readable; blocks while the encoder catches
        up, so call it from a thread (or use chunks())."""
        try:
            with open(self.path, "rb") as f:
                while True:
                    avail = self.wait(offset)
                    if offset >= avail:
                        return
                    data = os.pread(f.fileno(), min(chunk, avail - offset), offset)
                    if not data:
                        raise DiskIOError(f"{self.path}: outbox stream shrank at byte {offset}")
                    yield data
                    offset += len(data)
        except OSError as e:
            raise DiskIOError(f"{self.path}: cannot read the outbox stream: {e.strerror}") from None

    async def chunks(self, offset: int, chunk: int = 1 << 20):
        """read_chunks() for asyncio callers: each read (and wait) happens on a worker thread."""
        it = self.read_chunks(offset, chunk)
        try:
            while (data := await asyncio.to_thread(next, it, None)) is not None:
                yield data
        finally:
            it.close()


class _Sink:
    """Writes over the file from byte 0 (it may be a recycled one) and cuts it to the stream's size."""

    def __init__(self, stream: OutboxStream):
        self.stream = stream
        self.file = open(stream.path, "r+b")
        self.size = 0
        self._unpublished = 0

    def write(self, data) -> int:
        n = self.file.write(data)
        self.size += n
        self._unpublished += n
        if self._unpublished >= PUBLISH:
            self.file.flush()
            self._unpublished = 0
            self.stream._set(written=self.size)
        return n

    def close(self) -> None:
        self.file.truncate(self.size)
        self.file.close()

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
