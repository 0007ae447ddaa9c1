"""`replicator bench cpu`: what this host's CPU can do for replication (like `borg benchmark cpu`).

Each line is the best of `runs` timings of one operation over `size` bytes held in memory: the hashing and
zero-detection kernels (one thread and all threads), CRC-32C, zstd level 1 (what delta streams use) on
real-ish data (text, integers, random bytes, zeros; see bench.workloads.data_pool), and TLS over loopback
(a server thread and a client in this process, a fresh self-signed ECDSA certificate, the ssl module's
default cipher choice), which bounds what one replication connection can carry on this host.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import tempfile
import threading
import time

import numpy as np

from .. import kernels
from .workloads import data_pool

BLOCK = 64 << 10
CHUNK = 1 << 20


def best_of(fn, runs: int) -> float:
    best = float("inf")
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _realish(size: int) -> np.ndarray:
    pool = data_pool(7)
    return np.resize(pool, size)


def kernel_cases(buf: np.ndarray, threads: int):
    zeros = np.full(len(buf), 0, dtype=np.uint8)      # real pages, not the shared zero page
    return [
        ("CRC-32C", "1 thread", lambda: kernels.crc32c(buf)),
        ("XXH3-128, 64 KiB blocks", "1 thread", lambda: kernels.xxh3_128_blocks(buf, BLOCK, threads=1)),
        ("XXH3-128, 64 KiB blocks", f"{threads} threads", lambda: kernels.xxh3_128_blocks(buf, BLOCK, threads=threads)),
        ("zero detection, 64 KiB blocks (all zero)", "1 thread", lambda: kernels.zero_blocks(zeros, BLOCK, threads=1)),
        ("zero detection, 64 KiB blocks (all zero)", f"{threads} threads",
         lambda: kernels.zero_blocks(zeros, BLOCK, threads=threads)),
    ]


def zstd_cases(buf: np.ndarray):
    import zstandard
    comp, dec = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    mv = memoryview(buf)
    frames = [comp.compress(mv[i:i + CHUNK]) for i in range(0, len(buf), CHUNK)]
    ratio = len(buf) / sum(len(f) for f in frames)
    return ratio, [
        ("zstd -1 compress, 1 MiB frames", "1 thread",
         lambda: [comp.compress(mv[i:i + CHUNK]) for i in range(0, len(buf), CHUNK)]),
        ("zstd -1 decompress, 1 MiB frames", "1 thread",
         lambda: [dec.decompress(f, max_output_size=CHUNK) for f in frames]),
    ]


# ---------------------------------------------------------------------------------------------- TLS
def self_signed(directory: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def tls_loopback(size: int, runs: int) -> tuple[float, str]:
    """Seconds to send `size` bytes client -> server over TLS on 127.0.0.1 (best of runs), and the cipher."""
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as d:
        cert, key = self_signed(d)
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(cert, key)
        cctx = ssl.create_default_context(cafile=cert)
        payload = memoryview(bytes(_realish(CHUNK)))
        best, cipher = float("inf"), ""
        for _ in range(max(1, runs)):
            seconds, cipher = _tls_once(sctx, cctx, payload, size)
            best = min(best, seconds)
        return best, cipher


def _tls_once(sctx, cctx, payload, size: int) -> tuple[float, str]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got = [0]

    def serve():
        conn, _ = listener.accept()
        with sctx.wrap_socket(conn, server_side=True) as s:
            buf = bytearray(CHUNK)
            while got[0] < size:
                n = s.recv_into(buf)
                if not n:
                    break
                got[0] += n
            s.sendall(b"k")
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        with cctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as c:
            t0 = time.perf_counter()
            sent = 0
            while sent < size:
                n = min(len(payload), size - sent)
                c.sendall(payload[:n])
                sent += n
            c.recv(1)
            seconds = time.perf_counter() - t0
            cipher = f"{c.version()} {c.cipher()[0]}"
    finally:
        th.join(30)
        listener.close()
    return seconds, cipher


# ---------------------------------------------------------------------------------------------- driver
def run_all(size: int, *, runs: int = 3, out=print) -> list[dict]:
    """Every measurement as {"what", "threads", "bytes", "seconds", "GBps"}; `out` gets one line each."""
    threads = kernels.default_threads()
    buf = _realish(size)
    results = []

    def record(what: str, how: str, seconds: float, note: str = "") -> None:
        r = {"what": what, "threads": how, "bytes": size, "seconds": seconds, "GBps": size / seconds / 1e9,
             "note": note}
        results.append(r)
        if out:
            out(f"{what:<44} {how:<11} {r['GBps']:8.2f} GB/s{('  ' + note) if note else ''}")
    if out:
        out(f"kernels: {kernels.implementation}; {os.cpu_count()} CPUs; {size / 2**20:g} MiB per measurement; "
            f"best of {runs}")
    for what, how, fn in kernel_cases(buf, threads):
        record(what, how, best_of(fn, runs))
    ratio, cases = zstd_cases(buf)
    for what, how, fn in cases:
        record(what, how, best_of(fn, runs), f"(of uncompressed data; ratio {ratio:.2f}x)")
    seconds, cipher = tls_loopback(size, runs)
    record("TLS loopback, one connection", "2 threads", seconds, cipher)
    return results
