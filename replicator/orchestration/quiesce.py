"""Quiesce providers for application-consistent points: freeze the guest's writes around the cut.

Used as `async with provider:` around the cut only. Freezing is bounded by a timeout; when it fails or
times out the provider thaws anyway and raises QuiesceFailed, and the caller takes a crash-consistent cut
and reports a warning: a quiesce problem never stalls a machine. Thaw is always attempted, whatever
happened (a failed freeze may have frozen some filesystems; a guest left frozen is the worst outcome).

QemuGuestAgentQuiesce speaks the QEMU guest agent protocol (QMP-style JSON lines over the agent's Unix
socket): a 0xFF byte (flushes the agent's parser) and `guest-sync` with a random id, replies skipped until
the one echoing that id, then `guest-fsfreeze-freeze` (returns the number of frozen filesystems; on error
the agent thaws them itself) and later `guest-fsfreeze-thaw`. Each step uses a fresh connection that
starts with its own guest-sync, so a freeze that timed out cannot leave stale replies in the thaw's way.

LibvirtQuiesce freezes a protected libvirt domain through libvirt (Hypervisor.quiesce: virDomainFSFreeze /
FSThaw, never a second client on the agent's channel), with the hypervisor's watchdog thawing the guest if
the cut outlives the timeout. A point is application-consistent only if the freeze succeeded (at least one
filesystem frozen) and held until after the cut: a watchdog thaw raises QuiesceExpired out of the block
(not QuiesceFailed), so the scheduler never labels that cut "application"; its cycle fails and the sealed
logs go with the next one, crash-consistent.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random

from ..errors import ReplicatorError
from .scripts import argv_of, run_script


class QuiesceFailed(ReplicatorError):
    """Quiescing failed or timed out; `phase` is "freeze" (no consistent cut) or "thaw"."""

    def __init__(self, message: str, phase: str = "freeze"):
        super().__init__(message)
        self.phase = phase


class QuiesceProvider:
    """Subclasses implement `_freeze` and `_thaw`; the base bounds them by `timeout` and always thaws."""

    name = "quiesce"

    def __init__(self, timeout: float):
        self.timeout = float(timeout)
        self.log: collections.deque = collections.deque(maxlen=100)   # recent steps, for logs and warnings

    async def _freeze(self) -> None:
        raise NotImplementedError

    async def _thaw(self) -> None:
        raise NotImplementedError

    async def __aenter__(self):
        try:
            await asyncio.wait_for(self._freeze(), self.timeout)
            return self
        except asyncio.CancelledError:
            await self._safe_thaw()
            raise
        except QuiesceFailed as e:
            failure = e
        except asyncio.TimeoutError:
            failure = QuiesceFailed(f"{self.name}: freeze timed out after {self.timeout:g} s")
        except Exception as e:           # a broken guest agent or script must not stop the machine
            failure = QuiesceFailed(f"{self.name}: freeze failed: {e}")
        thaw_error = await self._safe_thaw()
        if thaw_error:
            failure = QuiesceFailed(f"{failure.message}; {thaw_error.message}")
        raise failure

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        thaw_error = await self._safe_thaw()
        if thaw_error is not None and exc is None:
            raise thaw_error
        return False

    async def _safe_thaw(self) -> QuiesceFailed | None:
        try:
            await asyncio.wait_for(self._thaw(), self.timeout)
            return None
        except asyncio.TimeoutError:
            failure = QuiesceFailed(f"{self.name}: thaw timed out after {self.timeout:g} s", "thaw")
        except QuiesceFailed as e:
            failure = QuiesceFailed(e.message, "thaw")
        except Exception as e:
            failure = QuiesceFailed(f"{self.name}: thaw failed: {e}", "thaw")
        self.log.append(failure.message)
        return failure


class ScriptQuiesce(QuiesceProvider):
    """Runs a pre-freeze script before the cut and a post-thaw script after it (always, even when the
    pre-freeze script failed). A non-zero exit or a timeout fails the quiesce; scripts are killed with
    their whole process group on timeout."""

    name = "script quiesce"

    def __init__(self, pre_freeze=None, post_thaw=None, timeout: float = 30.0, env: dict | None = None):
        super().__init__(timeout)
        self.pre_freeze, self.post_thaw, self.env = pre_freeze, post_thaw, env

    async def _freeze(self) -> None:
        if self.pre_freeze:
            await self._run(self.pre_freeze, "pre-freeze")

    async def _thaw(self) -> None:
        if self.post_thaw:
            await self._run(self.post_thaw, "post-thaw")

    async def _run(self, cmd, what: str) -> None:
        name = argv_of(cmd)[0]
        try:
            code, text = await run_script(cmd, {**(self.env or {}), "REPLICATOR_QUIESCE": what})
        except OSError as e:
            raise QuiesceFailed(f"{what} script {name!r} cannot run: {e.strerror or e}") from None
        except asyncio.CancelledError:          # the provider's timeout: run_script killed it
            self.log.append(f"{what}: {name} killed (timeout)")
            raise
        self.log.append(f"{what}: {name} exited {code}" + (f": {text[-500:]}" if text else ""))
        if code != 0:
            raise QuiesceFailed(f"{what} script {name!r} exited with {code}" + (f": {text[-200:]}" if text else ""))


class QemuGuestAgentQuiesce(QuiesceProvider):
    """guest-fsfreeze-freeze / guest-fsfreeze-thaw through the QEMU guest agent of a KVM guest."""

    name = "guest agent quiesce"

    def __init__(self, socket_path: str, timeout: float = 10.0):
        super().__init__(timeout)
        self.socket_path = socket_path
        self.frozen: int | None = None       # filesystems the last freeze reported

    async def _freeze(self) -> None:
        self.frozen = await self.command("guest-fsfreeze-freeze")
        self.log.append(f"guest-fsfreeze-freeze: {self.frozen} filesystems frozen")

    async def _thaw(self) -> None:
        thawed = await self.command("guest-fsfreeze-thaw")
        self.log.append(f"guest-fsfreeze-thaw: {thawed} filesystems thawed")

    async def command(self, execute: str, arguments: dict | None = None):
        """One command on a fresh, synchronized connection; its `return` value, or QuiesceFailed."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path)
        except OSError as e:
            raise QuiesceFailed(f"guest agent socket {self.socket_path}: {e.strerror or e}") from None
        try:
            await self._sync(reader, writer)
            request = {"execute": execute, **({"arguments": arguments} if arguments else {})}
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            reply = await _reply(reader)
            if "error" in reply:
                raise QuiesceFailed(f"guest agent {execute}: {_describe(reply['error'])}")
            return reply.get("return")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _sync(self, reader, writer) -> None:
        sync_id = random.randrange(1, 1 << 31)
        request = {"execute": "guest-sync", "arguments": {"id": sync_id}}
        writer.write(b"\xff" + json.dumps(request).encode() + b"\n")
        await writer.drain()
        while True:
            reply = await _reply(reader)
            if "error" in reply:
                raise QuiesceFailed(f"guest agent guest-sync: {_describe(reply['error'])}")
            if reply.get("return") == sync_id:
                return


async def _reply(reader) -> dict:
    """The next response object; stale bytes, 0xFF delimiters and events are skipped."""
    while True:
        line = await reader.readline()
        if not line:
            raise QuiesceFailed("guest agent closed the connection")
        line = line.replace(b"\xff", b"").strip()
        try:
            obj = json.loads(line) if line else None
        except ValueError:
            continue
        if isinstance(obj, dict) and ("return" in obj or "error" in obj):
            return obj


def _describe(error) -> str:
    if isinstance(error, dict):
        return f"{error.get('desc', 'error')} ({error.get('class', 'GenericError')})"
    return str(error)


class LibvirtQuiesce(QuiesceProvider):
    """A libvirt domain's filesystems frozen through its guest agent, by libvirt (Hypervisor.quiesce)."""

    name = "libvirt quiesce"

    def __init__(self, uri: str | None, domain: str, timeout: float = 30.0):
        super().__init__(timeout)
        self.uri, self.domain = uri, domain
        self.frozen: int | None = None
        self.expired = False
        self._held = None               # (hypervisor, context manager) while frozen

    async def _freeze(self) -> None:
        from ..hypervisor import Hypervisor
        self.expired, self.frozen = False, None

        def freeze():
            hv = Hypervisor.open(self.uri)
            try:
                cm = hv.quiesce(self.domain, timeout=self.timeout)
                q = cm.__enter__()
            except BaseException:
                hv.close()
                raise
            return hv, cm, q
        hv, cm, q = await asyncio.to_thread(freeze)
        self._held = (hv, cm)
        self.frozen = q.frozen
        self.log.append(f"{self.domain}: {q.frozen} filesystems frozen through libvirt")
        if not q.frozen:
            raise QuiesceFailed(f"{self.name}: the guest agent of {self.domain!r} froze no filesystem")

    async def _thaw(self) -> None:
        held, self._held = self._held, None
        if held is None:
            # a freeze that timed out here may still complete in the guest: the hypervisor's watchdog thaws it
            # `timeout` seconds after it does; a freeze that failed was thawed by Hypervisor.quiesce itself
            return
        hv, cm = held

        def thaw():
            try:
                cm.__exit__(None, None, None)
            finally:
                hv.close()
        from ..errors import QuiesceExpired
        try:
            await asyncio.to_thread(thaw)
        except QuiesceExpired as e:
            self.expired = True
            self.log.append(e.message)
            return
        self.log.append(f"{self.domain}: thawed")

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        await super().__aexit__(exc_type, exc, tb)
        if self.expired and exc is None:
            from ..errors import QuiesceExpired
            logging.getLogger("replicatord").warning(
                "%s: the guest was thawed by the watchdog after %g s, before the cut was known to be taken: "
                "not application-consistent (the cut's logs go with the next cycle)", self.domain, self.timeout)
            raise QuiesceExpired(f"{self.name}: {self.domain!r} was thawed by the watchdog after {self.timeout:g} s "
                                 "before the cut ended: not an application-consistent point")
        return False


def provider_from_settings(q) -> QuiesceProvider | None:
    """The provider for a settings.QuiesceSettings (None stays None)."""
    if q is None:
        return None
    if q.provider == "libvirt":
        return LibvirtQuiesce(q.uri, q.domain, q.timeout)
    if q.provider == "qga":
        return QemuGuestAgentQuiesce(q.socket, q.timeout)
    return ScriptQuiesce(q.pre_freeze, q.post_thaw, q.timeout)
