"""Encryption of stored data with the customer's key (ASR's "encrypt data at rest" for VMM to Azure): the
blob only ever holds ciphertext; data is decrypted at failover (or export) on a host holding the key.

- The key file (kept on the primary hosts; escrow is a copy of it, see docs/operations.md) holds one master
  key per line as 64 hex digits, the current one first; older lines are previous keys still needed to read
  older points. `replicator azure keygen` writes one.
- Each disk has its own AES-256-XTS key, derived from the master key with HKDF-SHA256 and the disk id.
- The data unit is one 512-byte sector and the tweak its sector number (little-endian), so any sector is
  encrypted on its own: page blobs are written in 512-byte pages and no write needs a read-modify-write
  of its neighbours. Length-preserving: the blob's layout (disk sectors, then the fixed-VHD footer,
  which stays in the clear) is unchanged.
- An all-zero sector is stored as zeros and zeros read back as a zero sector. Trimmed and never-written
  ranges stay sparse (Clear Page) this way; the cost is that which sectors are zero is visible.
- The blob's metadata carries the master key's id (a hash of it) and the disk key's check value (an HMAC
  of a constant under it), never a key: a host with the wrong key is refused before it writes anything.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .. import kernels
from ..errors import UsageError

SECTOR = 512
KEY_BYTES = 32


class WrongKey(UsageError):
    """The key on hand is not the one the data was stored with (or there is none)."""


class DiskCipher:
    """AES-256-XTS of one disk: sector-aligned ranges in, same-length ranges out."""

    def __init__(self, master: bytes, key_id: str, disk_id, purpose: str = "disk"):
        """`purpose`: "disk" for the data, "digests" for the digest sidecar (a key of its own)."""
        self.key_id = key_id
        info = f"replicator-xts-{purpose}:".encode() + uuid.UUID(str(disk_id)).bytes
        key = HKDF(hashes.SHA256(), 64, salt=None, info=info).derive(master)
        self._alg = algorithms.AES(key)
        self.check = hmac.new(key, b"replicator key check", hashlib.sha256).hexdigest()[:32]

    def encrypt(self, offset: int, data) -> bytes:
        return self._run(offset, data, encrypt=True)

    def decrypt(self, offset: int, data) -> bytes:
        return self._run(offset, data, encrypt=False)

    def _run(self, offset: int, data, encrypt: bool) -> bytes:
        if offset % SECTOR or len(data) % SECTOR:
            raise ValueError(f"encryption needs whole sectors, not [{offset}, {offset + len(data)})")
        mv = memoryview(data).cast("B")
        out = bytearray(len(mv))                    # zero sectors stay zero
        zero = kernels.zero_blocks(mv, SECTOR) if len(mv) else []
        first = offset // SECTOR
        for i, is_zero in enumerate(zero):
            if is_zero:
                continue
            tweak = (first + i).to_bytes(16, "little")
            c = Cipher(self._alg, modes.XTS(tweak))
            ctx = c.encryptor() if encrypt else c.decryptor()
            out[i * SECTOR:(i + 1) * SECTOR] = ctx.update(mv[i * SECTOR:(i + 1) * SECTOR])   # XTS: no tail
        return bytes(out)


class KeyRing:
    """The master keys of a key file: the current one (first line) and previous ones."""

    def __init__(self, keys: list[bytes], path: str = ""):
        if not keys:
            raise UsageError(f"{path or 'key file'}: holds no key")
        self.keys, self.path = keys, path
        self.ids = [key_id(k) for k in keys]

    @classmethod
    def load(cls, path: str) -> "KeyRing":
        try:
            with open(path) as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError as e:
            raise UsageError(f"cannot read the key file {path}: {e.strerror}") from None
        keys = []
        for n, line in enumerate(lines, 1):
            try:
                key = bytes.fromhex(line)
            except ValueError:
                key = b""
            if len(key) != KEY_BYTES:
                raise UsageError(f"{path}: key {n} is not {KEY_BYTES * 2} hex digits (`replicator azure keygen` "
                                 "writes a key file)")
            keys.append(key)
        return cls(keys, path)

    @property
    def current_id(self) -> str:
        return self.ids[0]

    def cipher(self, disk_id, wanted_id: str | None = None, purpose: str = "disk") -> DiskCipher:
        """The disk's cipher under the current key, or under the key `wanted_id` names (refused if absent)."""
        kid = wanted_id or self.current_id
        if kid not in self.ids:
            raise WrongKey(f"the data is encrypted with key {kid}; the key file {self.path} holds "
                            f"{', '.join(self.ids)}: use the key file the replica was written with")
        return DiskCipher(self.keys[self.ids.index(kid)], kid, disk_id, purpose)


def key_id(master: bytes) -> str:
    """A public name for a master key (a hash of it: it tells keys apart, it does not reveal one)."""
    return hashlib.sha256(b"replicator-key-id\0" + master).hexdigest()[:16]


def new_key_line() -> str:
    return os.urandom(KEY_BYTES).hex()
