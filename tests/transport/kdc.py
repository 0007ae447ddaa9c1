"""A throwaway MIT Kerberos realm on 127.0.0.1 for the transport tests: its own kdc.conf, krb5.conf,
database, keytabs and credential caches under one directory, and a krb5kdc in the foreground."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from ..ports import free_port  # noqa: F401 (the tests import it from here)

REALM = "TEST.REPLICATOR"


def _tool(name: str) -> str:
    for d in ("/usr/sbin", "/usr/bin", "/sbin"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; ./tools/bootstrap installs krb5-kdc and krb5-user")
    return path


class Kdc:
    """Start with start(); env holds the variables every Kerberos user in the tests needs."""

    def __init__(self, directory: str):
        self.dir = directory
        self.port = free_port()
        self.env = {"KRB5_CONFIG": self.path("krb5.conf"), "KRB5_KDC_PROFILE": self.path("kdc.conf"),
                    "KRB5CCNAME": "FILE:" + self.path("default.ccache"),
                    "KRB5_KTNAME": "FILE:" + self.path("none.keytab"),
                    "KRB5_CLIENT_KTNAME": "FILE:" + self.path("none.keytab"),
                    "KRB5RCACHEDIR": self.path("rcache")}
        self.proc: subprocess.Popen | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _write_config(self) -> None:
        os.makedirs(self.path("rcache"), exist_ok=True)
        with open(self.path("kdc.conf"), "w") as f:
            f.write(f"""[kdcdefaults]
 kdc_ports = {self.port}
 kdc_tcp_ports = {self.port}
[realms]
 {REALM} = {{
  database_name = {self.path('principal')}
  key_stash_file = {self.path('stash')}
  acl_file = {self.path('kadm5.acl')}
  kdc_ports = {self.port}
  kdc_tcp_ports = {self.port}
  max_life = 1h
  supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
 }}
[logging]
 kdc = FILE:{self.path('kdc.log')}
""")
        with open(self.path("krb5.conf"), "w") as f:
            f.write(f"""[libdefaults]
 default_realm = {REALM}
 dns_lookup_kdc = false
 dns_lookup_realm = false
 dns_canonicalize_hostname = false
 rdns = false
 udp_preference_limit = 1
[realms]
 {REALM} = {{
  kdc = 127.0.0.1:{self.port}
 }}
[domain_realm]
 localhost = {REALM}
 127.0.0.1 = {REALM}
""")

    def run(self, *argv: str, input: str | None = None) -> str:
        env = {**os.environ, **self.env}
        r = subprocess.run([_tool(argv[0]), *argv[1:]], env=env, input=input, capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {r.stdout}{r.stderr}")
        return r.stdout

    def kadmin(self, query: str) -> str:
        return self.run("kadmin.local", "-r", REALM, "-q", query)

    def start(self) -> "Kdc":
        self._write_config()
        self.run("kdb5_util", "-r", REALM, "create", "-s", "-P", "master-" + os.urandom(8).hex())
        self.proc = subprocess.Popen([_tool("krb5kdc"), "-n", "-r", REALM], env={**os.environ, **self.env},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"krb5kdc exited with {self.proc.returncode}")
                time.sleep(0.1)
        raise RuntimeError("krb5kdc did not start listening")

    def add_principal(self, name: str, keytab: str) -> str:
        """A principal with a random key, exported to a keytab (services and primaries alike)."""
        self.kadmin(f"addprinc -randkey {name}")
        self.kadmin(f"ktadd -k {keytab} {name}")
        return f"{name}@{REALM}"

    def kinit(self, principal: str, keytab: str, ccache: str) -> str:
        self.run("kinit", "-k", "-t", keytab, "-c", ccache, principal)
        return ccache

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
