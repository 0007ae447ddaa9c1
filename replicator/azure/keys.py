"""The encryption side of AzureTarget (crypto.py): which key a blob is stored under, refusing a wrong or
missing key before anything is written, and the ciphers that read points stored under older keys."""
from __future__ import annotations

from ..errors import UsageError
from .crypto import WrongKey
from .meta import BlobState


class KeyedTarget:
    """Mixed into AzureTarget: uses its `keys` (a KeyRing or None) and `_where`."""

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
        if state.key_id != cipher.key_id:
            raise WrongKey(f"{where} is encrypted with key {state.key_id}, the key file {self.keys.path} starts with "
                           f"{cipher.key_id}: refusing to write (use the key file the replica was written with)")
        if state.key_check != cipher.check:
            raise WrongKey(f"{where}: the key check value does not match key {state.key_id}: refusing to write")
        return False

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
