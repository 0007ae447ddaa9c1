"""The encryption side of AzureTarget (crypto.py): which key a blob is stored under, refusing a wrong or
missing key before anything is written, and the ciphers that read points stored under older keys."""
from __future__ import annotations

import asyncio

from ..errors import UsageError
from .crypto import WrongKey
from .meta import BlobState
from .pages import MAX_PUT


class KeyedTarget:
    """Mixed into AzureTarget: uses its `keys` (a KeyRing or None), `_where`, `_save`, `_call`, `blob`."""

    async def _take_key(self, disk_id, state: BlobState) -> bool:
        """Check the blob's key against ours before anything is written; a new blob takes our current key.
        True when the state changed (to be saved)."""
        where = self._where(disk_id)
        if self.keys is None:
            if state.key_id:
                raise WrongKey(f"{where} is encrypted with key {state.key_id}: give the target its key file "
                               "(key_file= in the azure:// URL)")
            return False
        cipher = self.keys.cipher(disk_id)
        if not state.key_id:
            if state.generation or state.ip is not None or not state.zeroed:
                raise UsageError(f"{where} holds data stored in the clear: an encrypted replica needs a new blob "
                                 "(disable and re-enable replication, or use another prefix)")
            state.key_id, state.key_check = cipher.key_id, cipher.check
            return True
        if state.rekey_from or (state.key_id != cipher.key_id and state.key_id in self.keys.ids):
            await self._rekey(disk_id, state)            # the key was rotated: the blob follows it
        if state.key_id != cipher.key_id:
            raise WrongKey(f"{where} is encrypted with key {state.key_id}, the key file {self.keys.path} starts with "
                           f"{cipher.key_id}: refusing to write (use the key file the replica was written with)")
        if state.key_check != cipher.check:
            raise WrongKey(f"{where}: the key check value does not match key {state.key_id}: refusing to write")
        return False

    async def _rekey(self, disk_id, state: BlobState) -> None:
        """Re-encrypt the blob's data under the current key (after `keygen --rotate`): its valid ranges are
        read under the old key and written under the new one, progress kept in the metadata (a rotation
        stopped midway goes on from there). Points taken before stay under the old key (their metadata
        names it; the key file keeps it). The digest sidecar is dropped: it is rebuilt when needed."""
        from .digests import sidecar_name
        from .meta import disk_area
        from .reader import page_ranges, read_ranges
        if not state.rekey_from:
            state.rekey_from, state.rekey_at = state.key_id, 0
            new = self.keys.cipher(disk_id)
            state.key_id, state.key_check = new.key_id, new.check
            await self._save(disk_id, self.writer_id, state)
        old, new = self.keys.cipher(disk_id, state.rekey_from), self.keys.cipher(disk_id)
        blob, area = self.blob(disk_id), disk_area(state.disk_size)
        ranges = [(max(s, state.rekey_at), e) for s, e in await page_ranges(self, blob, area) if e > state.rekey_at]
        done_since_save = 0
        async for at, data in read_ranges(self, blob, area, area, old, ranges=ranges):
            data = await asyncio.to_thread(new.encrypt, at, data)
            for pos in range(0, len(data), MAX_PUT):
                piece = data[pos:pos + MAX_PUT]
                await self._call(f"re-encrypt {self._where(disk_id)}", blob.upload_page, piece, offset=at + pos,
                                 length=len(piece), lease=self.writer_id)
            state.rekey_at, done_since_save = at + len(data), done_since_save + len(data)
            if done_since_save >= 64 << 20:
                await self._save(disk_id, self.writer_id, state)
                done_since_save = 0
        state.rekey_from, state.rekey_at = "", 0
        side = self.container.get_blob_client(sidecar_name(self, disk_id))
        if await self._call(f"look for {side.blob_name}", side.exists):
            await self._call(f"delete {side.blob_name}", side.delete_blob)
        await self._save(disk_id, self.writer_id, state)

    def _cipher(self, disk_id, state: BlobState):
        if not state.key_id and self.keys is None:
            return None
        if self.keys is None or state.key_id != self.keys.current_id:
            raise WrongKey(f"{self._where(disk_id)} is encrypted with key {state.key_id or '(none)'}, this target's "
                           f"key is {self.keys.current_id if self.keys else '(none)'}: run ensure_disk first")
        return self.keys.cipher(disk_id)

    def _key_id(self, disk_id) -> str:
        return self.keys.current_id if self.keys else ""

    def sidecar_cipher(self, disk_id, state: BlobState):
        return self.keys.cipher(disk_id, state.key_id, "digests") if state.key_id and self.keys else None

    def cipher_for(self, disk_id, key_id: str):
        """The cipher that reads data stored under `key_id` ("" = in the clear: None)."""
        if not key_id:
            return None
        if self.keys is None:
            raise WrongKey(f"{self._where(disk_id)} is encrypted with key {key_id}: give the target its key file "
                           "(key_file= in the azure:// URL)")
        return self.keys.cipher(disk_id, key_id)

    def check_keys(self, point) -> None:
        """Refuse, before anything is written, a machine point some disk of which we cannot decrypt."""
        for part in point.disks.values():
            self.cipher_for(part.disk_id, part.key_id)
