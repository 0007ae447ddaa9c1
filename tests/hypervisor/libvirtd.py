"""A private root libvirtd for the tests: Debian's monolithic daemon (libvirt 9.0), its own configuration,
socket, state, cache and log directories under one work directory, nothing of the host's libvirt touched.

    with PrivateLibvirtd(workdir) as d:          # ~1 s warm; the first hypervisor call probes QEMU (~8 s)
        conn = libvirt.open(d.uri)               # qemu+unix:///system?socket=WORKDIR/sock/libvirt-sock

How, and why (the traps of this machine, learnt from ../shared/recipes/libvirt-private-daemon.sh):
- `unshare -m -n`: a mount namespace in which the libvirt directories (/etc/libvirt, /run/libvirt,
  /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt) are bind mounts of the work directory's, and a
  network namespace of its own (loopback up): the bridges and iptables rules of libvirt's networks live and
  die with the daemon's namespace instead of the host's. (host_network=True keeps the host's namespace;
  then libvirt's global LIBVIRT_* chains are removed from the host's tables at stop.)
- the QEMU driver refuses to start unless its compiled-in user `libvirt-qemu` exists, even running QEMU as
  root: /etc/passwd and /etc/group are bind-mounted copies with that user added;
- `stdio_handler = "file"` (no virtlogd), `cgroup_controllers = [ ]` (no systemd/cgroup delegation here),
  `security_driver = "none"`, no dynamic ownership;
- the daemon is pinned to one CPU (taskset): libvirt 9.0 keys its QEMU capability cache on the raw CPUID of
  the CPU it runs on, which differs per CPU here (APIC id): unpinned, it re-probes QEMU (~8 s) at random;
- QEMU processes outlive libvirtd: stop() destroys every domain (and network) first, then stops the
  daemon, then kills any QEMU whose pid file is still in the state directory.

The daemon runs in the foreground as a child of this process (no --daemon, so its pid is ours) and dies
with it (PR_SET_PDEATHSIG); its log is WORKDIR/root/libvirtd.log. Its pid file is given (-p) too: by
default it is /run/libvirtd.pid, the host's, locked, and a second daemon would refuse to start.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import signal
import subprocess
import time

from ..processes import alive

LIBVIRT_DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
                "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}
LIBVIRT_QEMU_UID = 64055

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
"""


def available() -> str | None:
    """None when a private libvirtd can run here, else why not."""
    if os.geteuid() != 0:
        return "a private libvirtd needs root (mount namespace, QEMU as root)"
    for tool in ("libvirtd", "unshare", "taskset", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (./tools/bootstrap installs libvirt-daemon, qemu-system-x86)"
    if not glob.glob("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so") and \
            not glob.glob("/usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so"):
        return "libvirt's QEMU driver is not installed (libvirt-daemon-driver-qemu)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed (pip install -e .[dev])"
    return None


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)


class PrivateLibvirtd:
    def __init__(self, workdir, cpu: int = 0, host_network: bool = False):
        self.workdir = str(workdir)
        self.root = os.path.join(self.workdir, "root")
        self.sockdir = os.path.join(self.workdir, "sock")
        self.cpu = cpu
        self.host_network = host_network
        self.uri = f"qemu+unix:///system?socket={self.sockdir}/libvirt-sock"
        self.log_path = os.path.join(self.root, "libvirtd.log")
        self.proc: subprocess.Popen | None = None
        if len(self.sockdir) + 20 > 107:
            raise ValueError(f"{self.sockdir}: too long for a Unix socket path")

    # ----------------------------------------------------------------- setup
    def _write_config(self) -> None:
        for sub in LIBVIRT_DIRS:
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.makedirs(self.sockdir, exist_ok=True)
        with open(os.path.join(self.root, "etc", "libvirtd.conf"), "w") as f:
            f.write(f'unix_sock_dir = "{self.sockdir}"\n'
                    'unix_sock_rw_perms = "0700"\n'
                    'auth_unix_ro = "none"\n'
                    'auth_unix_rw = "none"\n'
                    f'log_outputs = "3:file:{self.log_path}"\n')
        with open(os.path.join(self.root, "etc", "qemu.conf"), "w") as f:
            f.write(QEMU_CONF)
        for name, line in (("passwd", f"libvirt-qemu:x:{LIBVIRT_QEMU_UID}:{LIBVIRT_QEMU_UID}::"
                                      "/var/lib/libvirt:/usr/sbin/nologin\n"),
                           ("group", f"libvirt-qemu:x:{LIBVIRT_QEMU_UID}:\n")):
            with open(f"/etc/{name}") as f:
                text = f.read()
            if not any(x.startswith("libvirt-qemu:") for x in text.splitlines()):
                text = text.rstrip("\n") + "\n" + line
            with open(os.path.join(self.root, name), "w") as f:
                f.write(text)
        for target in LIBVIRT_DIRS.values():       # empty mount points on the host (nothing written there)
            os.makedirs(target, exist_ok=True)

    def start(self, timeout: float = 60) -> "PrivateLibvirtd":
        import libvirt
        self._write_config()
        mounts = [f"mount --bind {os.path.join(self.root, sub)} {target}" for sub, target in LIBVIRT_DIRS.items()]
        mounts += [f"mount --bind {self.root}/passwd /etc/passwd", f"mount --bind {self.root}/group /etc/group"]
        if not self.host_network:
            mounts.append("ip link set lo up")
        daemon = f"exec libvirtd -f {self.root}/etc/libvirtd.conf -p {self.root}/libvirtd.pid"
        script = "set -e; " + "; ".join(mounts + [daemon])
        ns = ["-m", "--propagation", "private"] + ([] if self.host_network else ["-n"])
        argv = ["taskset", "-c", str(self.cpu), "unshare", *ns, "/bin/sh", "-c", script]
        self.out = open(os.path.join(self.root, "libvirtd.stderr"), "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited {self.proc.returncode} at start:\n{self.stderr()}")
            if os.path.exists(os.path.join(self.sockdir, "libvirt-sock")):
                try:
                    libvirt.open(self.uri).close()
                    break
                except libvirt.libvirtError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"libvirtd did not answer within {timeout} s:\n{self.stderr()}")
            time.sleep(0.05)
        return self

    def stderr(self) -> str:
        text = ""
        for path in (os.path.join(self.root, "libvirtd.stderr"), self.log_path):
            with contextlib.suppress(FileNotFoundError):
                with open(path, errors="replace") as f:
                    text += f"--- {os.path.basename(path)} ---\n{f.read()[-3000:]}\n"
        return text

    def nsenter(self) -> list[str]:
        """argv prefix that runs a command in the daemon's network namespace (its bridges, its iptables)."""
        return ["nsenter", f"--net=/proc/{self.proc.pid}/ns/net"]

    # ----------------------------------------------------------------- teardown
    def _qemu_pids(self) -> list[int]:
        pids = []
        for path in glob.glob(os.path.join(self.root, "run", "qemu", "*.pid")):
            with contextlib.suppress(OSError, ValueError):
                with open(path) as f:
                    pids.append(int(f.read().strip()))
        return [p for p in pids if alive(p)]

    def destroy_all(self) -> None:
        """Every domain destroyed and undefined, every network destroyed and undefined."""
        import libvirt
        conn = libvirt.open(self.uri)
        try:
            for dom in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            for net in conn.listAllNetworks():
                with contextlib.suppress(libvirt.libvirtError):
                    if net.isActive():
                        net.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    net.undefine()
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        leftover_qemu = []
        if self.proc.poll() is None:
            try:
                self.destroy_all()
            except Exception:  # noqa: BLE001 - the daemon may be wedged; what follows still cleans up
                pass
            leftover_qemu = self._qemu_pids()
            if self.host_network:
                self._remove_iptables_chains()
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        for pid in leftover_qemu + self._qemu_pids():     # QEMU outlives libvirtd
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.out.close()
        self.proc = None

    @staticmethod
    def _remove_iptables_chains() -> None:
        """libvirt 9.0 adds global LIBVIRT_INP/OUT/FWI/FWO/FWX/PRT chains (jumped to from INPUT, OUTPUT,
        FORWARD, POSTROUTING) the first time it starts a network, and never removes them."""
        for ipt in ("iptables", "ip6tables"):
            if shutil.which(ipt) is None:
                continue
            for table in ("filter", "nat", "mangle"):
                rules = subprocess.run([ipt, "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
                for rule in rules.splitlines():
                    parts = rule.split()
                    if parts[:1] == ["-A"] and "-j" in parts and parts[parts.index("-j") + 1].startswith("LIBVIRT_"):
                        subprocess.run([ipt, "-w", "-t", table, "-D", *parts[1:]], capture_output=True)
                for rule in rules.splitlines():
                    parts = rule.split()
                    if parts[:1] == ["-N"] and parts[1].startswith("LIBVIRT_"):
                        subprocess.run([ipt, "-w", "-t", table, "-F", parts[1]], capture_output=True)
                        subprocess.run([ipt, "-w", "-t", table, "-X", parts[1]], capture_output=True)

    def __enter__(self) -> "PrivateLibvirtd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
