"""Joining a controller: `replicatord --register URL --key FILE --state DIR` (docs/management-plane.md).

The registration key file names the controller, the site, a one-time token and the SHA-256 of the
controller's CA certificate. The host fetches the CA (GET /v1/ca, the only request made before the CA is
trusted), checks it against that hash -- so a man in the middle never sees the token -- then sends the token
and a certificate signing request over TLS verified by that CA. Its key is made here and never leaves it.

Files, in STATE/controller/: host.key (0600), host.pem, ca.pem, controller.json (URL, host id, site,
hostname, pinned CA hash, when to renew).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import ssl

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..durable import write_json_atomic
from ..errors import ReplicatorError
from ..transport import certs

TIMEOUT = aiohttp.ClientTimeout(total=30)
KEY_FIELDS = ("controller", "site", "token", "ca_sha256", "expires")


class EnrolError(ReplicatorError):
    """Registration did not happen; the message is the one line replicatord prints."""


class HostFiles:
    """The agent's files under STATE/controller/."""

    def __init__(self, state_dir: str):
        self.state_dir = os.path.abspath(state_dir)
        self.dir = os.path.join(self.state_dir, "controller")
        self.key, self.cert, self.ca = (os.path.join(self.dir, n) for n in ("host.key", "host.pem", "ca.pem"))
        self.info = os.path.join(self.dir, "controller.json")
        self.desired = os.path.join(self.dir, "desired.json")
        self.previous = os.path.join(self.dir, "desired.previous.json")  # the one before, until it started
        self.operations = os.path.join(self.dir, "operations.json")     # what the agent applied of them

    @property
    def registered(self) -> bool:
        return all(os.path.exists(p) for p in (self.info, self.key, self.cert, self.ca))

    def read_info(self) -> dict:
        try:
            with open(self.info, encoding="utf-8") as f:
                info = json.load(f)
            if not all(isinstance(info.get(k), str) for k in ("controller", "host_id", "hostname", "renew_after")):
                raise ValueError("controller, host_id, hostname or renew_after missing")
        except (OSError, ValueError, AttributeError) as e:
            raise EnrolError(f"{self.info} is unusable ({e}): register again with --register URL --key FILE") \
                from None
        return info

    def write_info(self, info: dict) -> None:
        write_json_atomic(self.info, info)

    def write_cert(self, pem: str) -> None:
        certs._write(self.cert, pem.encode(), 0o644)

    def csr(self, hostname: str) -> str:
        """A CSR signed by the host's key (made on first use, 0600); the controller sets the names."""
        if not os.path.exists(self.key):
            os.makedirs(self.dir, exist_ok=True)
            certs._write(self.key, certs._key_pem(ec.generate_private_key(ec.SECP256R1())), 0o600)
        with open(self.key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])]))
               .sign(key, hashes.SHA256()))
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    def client_context(self) -> ssl.SSLContext:
        """TLS to the controller: its CA only, this host's certificate as the client's."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def not_after(self) -> dt.datetime:
        with open(self.cert, "rb") as f:
            return x509.load_pem_x509_certificate(f.read()).not_valid_after_utc


def read_key_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise EnrolError(f"cannot read the registration key {path}: {e}") from None
    missing = [k for k in KEY_FIELDS if not isinstance(doc, dict) or not isinstance(doc.get(k), str) or not doc[k]]
    if missing:
        raise EnrolError(f"{path} is not a registration key: missing {', '.join(missing)}")
    try:
        expires = dt.datetime.fromisoformat(doc["expires"])
    except ValueError:
        raise EnrolError(f"{path}: expires is not an ISO 8601 date-time: {doc['expires'][:40]!r}") from None
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=dt.timezone.utc)
    if expires <= dt.datetime.now(dt.timezone.utc):
        raise EnrolError(f"the registration key {path} expired at {doc['expires']}: ask for a new one")
    return doc


def reason(e: BaseException) -> str:
    """One line for a failed connection (aiohttp's connector error would name its SSL context object)."""
    return str(getattr(e, "os_error", None) or e) or type(e).__name__


async def _error_of(r: aiohttp.ClientResponse) -> str:
    try:
        body = await r.json(content_type=None)
        return str(body.get("error") or body)[:300] if isinstance(body, dict) else str(body)[:300]
    except (ValueError, aiohttp.ClientError):
        return f"HTTP {r.status}"


async def fetch_pinned_ca(url: str, ca_sha256: str) -> str:
    """The controller's CA certificate, checked against the key's hash before anything is trusted."""
    from ..controller.ca import ca_fingerprint
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.get(f"{url}/v1/ca", ssl=False) as r:
                if r.status != 200:
                    raise EnrolError(f"{url} did not give its CA: {await _error_of(r)}")
                pem = await r.text()
    except (aiohttp.ClientError, TimeoutError) as e:
        raise EnrolError(f"cannot reach the controller at {url}: {reason(e)}") from None
    try:
        got = ca_fingerprint(pem.encode())
    except ValueError:
        raise EnrolError(f"{url} answered GET /v1/ca with something that is not a certificate") from None
    if got != ca_sha256.lower():
        raise EnrolError(f"the controller's CA does not match the key's ca_sha256 (it is {got[:16]}..., the key "
                         f"pins {ca_sha256[:16]}...): refusing to register (wrong controller, or someone between)")
    return pem


def _key_digest(key: dict) -> str:
    return hashlib.sha256(key["token"].encode()).hexdigest()


def new_key(files: HostFiles, key_path: str) -> bool:
    """Is this key file another, usable one than the one the host registered with? (Then it registers again.)
    An unusable key (expired, say) does not stop a registered host: it runs on its registration."""
    try:
        key = read_key_file(key_path)
    except ReplicatorError:
        return False
    try:
        return files.read_info().get("key_sha256") != _key_digest(key)
    except EnrolError:                  # the registration's files are unusable: the key makes them again
        return True


async def register(files: HostFiles, url: str, key_path: str, *, hostname: str, admin_url: str,
                   data_url: str) -> dict:
    """Register this host; returns controller.json's content. EnrolError (one line) when refused."""
    key = read_key_file(key_path)
    url = url.rstrip("/")
    ca_pem = await fetch_pinned_ca(url, key["ca_sha256"])
    os.makedirs(files.dir, exist_ok=True)
    certs._write(files.ca, ca_pem.encode(), 0o644)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files.ca)
    body = {"token": key["token"], "hostname": hostname, "csr": files.csr(hostname), "admin_url": admin_url,
            "data_url": data_url, "site": key["site"]}
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.post(f"{url}/v1/register", json=body, ssl=ctx) as r:
                if r.status != 200:
                    raise EnrolError(f"the controller refused the registration: {await _error_of(r)}")
                answer = await r.json()
    except (aiohttp.ClientError, TimeoutError) as e:
        raise EnrolError(f"cannot reach the controller at {url}: {reason(e)}") from None
    files.write_cert(answer["certificate"])
    info = {"controller": url, "host_id": answer["host_id"], "site": key["site"], "hostname": hostname,
            "ca_sha256": key["ca_sha256"].lower(), "renew_after": answer["renew_after"],
            "key_sha256": _key_digest(key),
            "registered_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    files.write_info(info)
    return info
