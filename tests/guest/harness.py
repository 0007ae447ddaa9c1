"""A real Linux guest whose disk is an NBD export on a Unix socket, for tests that need a VM in the loop.

    disk = make_disk_image(tmp / "disk.vhdx", 256 * MiB)      # ext4 inside a VHDX (the project's converter)
    ... serve disk over NBD on sock (ExportService, `replicator track serve`, qemu-nbd ...)
    with Guest(tmp / "guest") as g:                            # kills qemu on exit, whatever happened
        g.start(sock, export="disk.vhdx")                      # qemu-system-x86_64, TCG, nice 19
        g.wait_rounds(5, timeout=120)                          # the writer loop's GUEST_ROUND markers
        with g.freeze():                                       # guest-fsfreeze-freeze ... always thawed
            ...
        g.agent("guest-ping")                                  # any qemu-ga command (guest-sync first)
        g.shutdown()                                           # loop stops, umount (GUEST_UMOUNT_OK), poweroff
        assert g.errors() == []                                # GUEST_IO_ERROR / GUEST_KERNEL_ERROR lines
    n = verify_image(disk)                                     # e2fsck -fn clean, every manifest sha256 right

The guest (image.py) writes files of random bytes with dd conv=fsync, appends each one's sha256 to
/MANIFEST.sha256 once the file is synced, syncs, and prints `GUEST_ROUND n`. The disk is attached as
`-blockdev driver=nbd,...,reconnect-delay=N` + virtio-blk: when the NBD server goes away, the guest's
requests wait up to N seconds for it to come back instead of failing.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from . import image as guest_image

MiB = 1 << 20
QEMU = "qemu-system-x86_64"
ERROR_MARKERS = ("GUEST_IO_ERROR", "GUEST_KERNEL_ERROR", "GUEST_BOOT_ERROR", "GUEST_MOUNT_FAILED")
# What the kernel itself prints on the console (quiet: errors and worse) when a disk fails under ext4.
KERNEL_ERROR_RE = re.compile(r"I/O error|EXT4-fs error|Remounting filesystem read-only|Aborting journal|"
                             r"Kernel panic|blocked for more than")
NO_REPLY = {"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"}


class GuestError(AssertionError):
    """The guest did not do what was expected; the message carries the console's tail."""


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def _log(msg: str) -> None:
    print(f"[guest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cli_argv() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "replicator")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "replicator.cli"]


def _run(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {p.returncode}: "
                           f"{(p.stdout + p.stderr).decode(errors='replace')[-3000:]}")
    return p


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)


# --------------------------------------------------------------------------- disk images
def make_disk_image(path, size: int = 256 * MiB, label: str = "guest") -> str:
    """A dynamic VHDX at `path` holding an empty ext4 filesystem of `size` bytes: mkfs.ext4 on a raw file
    (inode tables and journal written now, not lazily by the guest), then `replicator vhdx convert`."""
    path = str(path)
    raw = path + ".mkfs.raw"
    try:
        with open(raw, "wb") as f:
            f.truncate(size)
        _run("mkfs.ext4", "-q", "-F", "-L", label, "-m", "0",
             "-E", "lazy_itable_init=0,lazy_journal_init=0", raw)
        _run(*_cli_argv(), "vhdx", "convert", "-f", "raw", "-O", "vhdx", raw, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(raw)
    return path


def verify_image(vhdx_path, crash_consistent: bool = False, workdir=None) -> int:
    """Check the guest's filesystem in a disk image (VHDX, or any format qemu-img reads) as qemu-img reads
    it: `e2fsck -fn` must be clean, and every file /MANIFEST.sha256 lists must have that sha256.

    crash_consistent=True is for an image taken while the guest ran (a cut that was not quiesced, a
    crash): the ext4 journal is replayed first (`e2fsck -E journal_only` on the copy, as the guest's mount
    would) and a torn last manifest line is allowed. Every listed file must still be intact: the guest
    appends a file's line only after the file is synced. A clean shutdown or a frozen guest needs neither.
    Returns the number of files verified."""
    vhdx_path = str(vhdx_path)
    strict = not crash_consistent
    with tempfile.TemporaryDirectory(dir=workdir, prefix="verify-") as tmp:
        raw = os.path.join(tmp, "disk.raw")
        _run("qemu-img", "convert", "-O", "raw", vhdx_path, raw)
        if crash_consistent:
            replay = subprocess.run(["e2fsck", "-y", "-E", "journal_only", raw], capture_output=True, text=True)
            if replay.returncode > 1:
                raise GuestError(f"journal replay of {vhdx_path}: exit {replay.returncode}\n"
                                 f"{replay.stdout}{replay.stderr}")
        fsck = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True)
        if fsck.returncode != 0:
            raise GuestError(f"e2fsck -fn {vhdx_path}: exit {fsck.returncode}\n{fsck.stdout}{fsck.stderr}")
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        manifest = os.path.join(out, "MANIFEST.sha256")
        _run("debugfs", "-R", f"dump /MANIFEST.sha256 {manifest}", raw)
        _run("debugfs", "-R", f"rdump /data {out}", raw)
        if not os.path.exists(manifest):
            raise GuestError(f"{vhdx_path}: no /MANIFEST.sha256 (the guest never finished a file)")
        with open(manifest) as f:
            lines = f.read().splitlines()
        bad, verified = [], 0
        for i, line in enumerate(lines):
            m = re.fullmatch(r"([0-9a-f]{64})  (data/\S+)", line)
            if not m:
                if not strict and i == len(lines) - 1:
                    continue
                bad.append(f"line {i + 1}: malformed {line!r}")
                continue
            path = os.path.join(out, m.group(2))
            try:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            except FileNotFoundError:
                bad.append(f"{m.group(2)}: missing")
                continue
            if digest != m.group(1):
                bad.append(f"{m.group(2)}: sha256 {digest}, manifest says {m.group(1)}")
            else:
                verified += 1
        if bad:
            raise GuestError(f"{vhdx_path}: {len(bad)} of {len(lines)} manifest entries wrong:\n"
                             + "\n".join(bad[:20]))
        return verified


# --------------------------------------------------------------------------- qemu-ga and QMP clients
class _JsonSocket:
    def __init__(self, path: str, timeout: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send(self, obj) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def read_until(self, delim: bytes, deadline: float) -> bytes:
        while delim not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("socket closed")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(delim)
        return head

    def read_json(self, deadline: float) -> dict:
        while True:
            line = self.read_until(b"\n", deadline).strip()
            if line:
                return json.loads(line)

    def close(self) -> None:
        self.sock.close()


class AgentError(RuntimeError):
    pass


class Agent:
    """qemu-guest-agent over the host side of its virtio-serial chardev. Every connection starts with
    guest-sync-delimited (a 0xFF byte resets the agent's parser; its reply is preceded by 0xFF), which
    drops anything a previous client left unread."""

    def __init__(self, path: str):
        self.path = path
        self.conn: _JsonSocket | None = None

    def _sync(self, timeout: float) -> None:
        conn = _JsonSocket(self.path, timeout)
        try:
            ident = random.randrange(1, 2**31)
            conn.sock.sendall(b"\xff")
            conn.send({"execute": "guest-sync-delimited", "arguments": {"id": ident}})
            deadline = time.monotonic() + timeout
            while True:
                conn.read_until(b"\xff", deadline)
                reply = conn.read_json(deadline)
                if reply.get("return") == ident:
                    break
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def call(self, cmd: str, timeout: float = 60, **args):
        if self.conn is None:
            self._sync(timeout)
        msg = {"execute": cmd, **({"arguments": args} if args else {})}
        try:
            self.conn.send(msg)
            if cmd in NO_REPLY:
                return None
            reply = self.conn.read_json(time.monotonic() + timeout)
        except BaseException:
            self.close()          # a reply may still come: the next call syncs on a new connection
            raise
        if "error" in reply:
            raise AgentError(f"{cmd}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Qmp:
    """QEMU's monitor (QMP): query-block, stop/cont, quit."""

    def __init__(self, path: str, timeout: float = 30):
        self.conn = _JsonSocket(path, timeout)
        deadline = time.monotonic() + timeout
        self.conn.read_json(deadline)                        # the greeting
        self.call("qmp_capabilities")

    def call(self, cmd: str, timeout: float = 30, **args):
        self.conn.send({"execute": cmd, **({"arguments": args} if args else {})})
        deadline = time.monotonic() + timeout
        while True:
            reply = self.conn.read_json(deadline)
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {cmd}: {reply['error']}")
            return reply.get("return")

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- the console
class ConsoleLog:
    """The guest's serial console as a file (qemu `-serial file:`, or libvirt's `<serial type='file'>`):
    the writer loop's markers (image.py) and the errors. `alive()` says whether the VM still runs (a
    waiting call fails at once when it does not); `describe()` adds to a failure's message."""

    def __init__(self, path, alive=lambda: True, describe=lambda: ""):
        self.console_path = str(path)
        self.alive, self.describe = alive, describe

    def console(self) -> str:
        try:
            with open(self.console_path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self) -> list[str]:
        return [line.rstrip("\r") for line in self.console().split("\n")]

    def tail(self, n: int = 40) -> str:
        extra = self.describe()
        return "--- console (last lines) ---\n" + "\n".join(self.lines()[-n:]) + (f"\n{extra}" if extra else "")

    def rounds(self) -> int:
        """The highest round the guest reported finished (all its data synced to the disk)."""
        found = re.findall(r"GUEST_ROUND (\d+)", self.console())
        return max(map(int, found)) if found else 0

    def round_times(self) -> list[tuple[int, float]]:
        """(round, guest uptime in seconds) of every GUEST_ROUND line."""
        return [(int(n), float(u)) for n, u in re.findall(r"GUEST_ROUND (\d+) files=\d+ uptime=([\d.]+)",
                                                           self.console())]

    def errors(self) -> list[str]:
        """Every console line that says the guest saw an I/O problem."""
        return [line for line in self.lines()
                if any(m in line for m in ERROR_MARKERS) or KERNEL_ERROR_RE.search(line)]

    def _wait(self, done, what: str, timeout: float, allow_errors: bool):
        deadline = time.monotonic() + timeout
        while True:
            result = done()
            if result:
                return result
            if not allow_errors and self.errors():
                raise GuestError(f"error lines while waiting for {what}: {self.errors()}\n{self.tail()}")
            if not self.alive():
                raise GuestError(f"the VM stopped before {what}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise GuestError(f"no {what} within {timeout} s (at round {self.rounds()})\n{self.tail()}")
            time.sleep(0.1)

    def wait_for(self, marker: str, timeout: float = 120, allow_errors: bool = False) -> str:
        """The first console line containing `marker`, waiting up to `timeout` seconds. Raises GuestError
        when the VM stops first, or (unless allow_errors) when an error line shows up meanwhile."""
        return self._wait(lambda: next((line for line in self.lines() if marker in line), None),
                          repr(marker), timeout, allow_errors)

    def wait_rounds(self, n: int, timeout: float = 120, allow_errors: bool = False) -> int:
        """Wait until the guest has finished round n (rounds count on across boots of one disk)."""
        return self._wait(lambda: self.rounds() if self.rounds() >= n else 0, f"round {n}", timeout,
                          allow_errors)


# --------------------------------------------------------------------------- the guest
class Guest(ConsoleLog):
    """One qemu-system-x86_64 (TCG, nice 19) booting the cached kernel + initramfs, its disk an NBD
    export. Files in `workdir`: console.log (ttyS0), qemu.log (qemu's stderr), qga.sock, qmp.sock."""

    def __init__(self, workdir, image: guest_image.GuestImage | None = None):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        super().__init__(os.path.join(self.workdir, "console.log"), self.running, self._qemu_stderr)
        self.image = image
        self.qemu_log = os.path.join(self.workdir, "qemu.log")
        self.qga_path = os.path.join(self.workdir, "qga.sock")
        self.qmp_path = os.path.join(self.workdir, "qmp.sock")
        self.proc: subprocess.Popen | None = None
        self._agent: Agent | None = None
        self.started_at = 0.0

    # ----------------------------------------------------------------- lifecycle
    def start(self, nbd_socket, export: str = "", *, reconnect_delay: float = 60, files: int = 4,
              maxkb: int = 64, pause: float = 0, memory_mb: int = 256, append: str = "") -> "Guest":
        if not qemu_available():
            raise RuntimeError(f"{QEMU} is not installed (./tools/bootstrap installs qemu-system-x86)")
        if self.image is None:
            t = time.monotonic()
            self.image = guest_image.build()
            _log(f"image {self.image.key} ({self.image.kernel_version}) ready in {time.monotonic() - t:.1f} s")
        for p in (self.console_path, self.qga_path, self.qmp_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        nbd = {"driver": "nbd", "node-name": "nbd0", "export": export, "reconnect-delay": int(reconnect_delay),
               "server": {"type": "unix", "path": str(nbd_socket)}}
        cmdline = guest_image.kernel_cmdline(files=files, maxkb=maxkb, pause=pause, extra=append)
        argv = ["nice", "-n", "19", QEMU, "-nodefaults", "-no-user-config", "-machine", "q35,accel=tcg",
                "-cpu", "max", "-smp", "1", "-m", str(memory_mb), "-display", "none", "-no-reboot",
                "-kernel", self.image.kernel, "-initrd", self.image.initramfs, "-append", cmdline,
                "-serial", f"file:{self.console_path}",
                "-blockdev", json.dumps(nbd),
                "-blockdev", json.dumps({"driver": "raw", "node-name": "disk0", "file": "nbd0"}),
                "-device", "virtio-blk-pci,drive=disk0,id=vblk0",
                "-chardev", f"socket,id=qga0,path={self.qga_path},server=on,wait=off",
                "-device", "virtio-serial-pci",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.started_at = time.monotonic()
        with open(self.qemu_log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         preexec_fn=_die_with_parent)
        _log(f"qemu pid {self.proc.pid} started, disk nbd+unix:///{export}?socket={nbd_socket} "
             f"reconnect-delay={reconnect_delay}")
        return self

    def _qemu_stderr(self) -> str:
        text = ""
        with contextlib.suppress(FileNotFoundError):
            with open(self.qemu_log, errors="replace") as f:
                text = f.read()[-2000:]
        exit_status = f"qemu exit status {self.proc.returncode}\n" if self.proc and self.proc.poll() is not None else ""
        return exit_status + (f"--- qemu stderr ---\n{text}" if text.strip() else "")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def kill(self) -> None:
        """SIGKILL qemu (no-op when it is not running)."""
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
            _log(f"qemu killed after {self.elapsed():.1f} s")

    def shutdown(self, timeout: float = 180) -> float:
        """A clean stop through the agent: guest-shutdown -> /sbin/shutdown asks the writer loop to stop
        after its round; it syncs, unmounts and powers off. Returns the seconds it took; raises GuestError
        (after killing qemu) if qemu does not exit or the guest did not report GUEST_UMOUNT_OK."""
        t = time.monotonic()
        self.agent("guest-shutdown", timeout=timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestError(f"qemu did not exit within {timeout} s of guest-shutdown\n{self.tail()}") from None
        took = time.monotonic() - t
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if not any("GUEST_UMOUNT_OK" in line for line in self.lines()):
            raise GuestError(f"the guest powered off without unmounting cleanly (qemu exit "
                             f"{self.proc.returncode})\n{self.tail()}")
        _log(f"clean shutdown in {took:.1f} s after {self.rounds()} rounds")
        return took

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    # ----------------------------------------------------------------- the agent and the monitor
    def agent(self, cmd: str, timeout: float = 60, **args):
        """One qemu-ga command; returns its "return" value (None for commands without a reply, e.g.
        guest-shutdown). Waits for GUEST_QGA_READY first."""
        self.wait_for("GUEST_QGA_READY", timeout, allow_errors=True)
        if self._agent is None:
            self._agent = Agent(self.qga_path)
        return self._agent.call(cmd, timeout=timeout, **args)

    def thaw(self, timeout: float = 60) -> int:
        return self.agent("guest-fsfreeze-thaw", timeout=timeout)

    @contextlib.contextmanager
    def freeze(self, timeout: float = 60):
        """guest-fsfreeze-freeze for the block; thawed on every way out (an error, a timeout of the freeze
        itself, an exception in the block). Yields the number of filesystems frozen."""
        try:
            yield self.agent("guest-fsfreeze-freeze", timeout=timeout)
        finally:
            last = None
            for _ in range(3):
                try:
                    self.thaw(timeout)
                    break
                except Exception as e:        # noqa: BLE001 - retried, then reported
                    last = e
                    if self._agent is not None:
                        self._agent.close()
            else:
                raise GuestError(f"could not thaw the guest: {last}")

    def qmp(self, cmd: str, **args):
        q = Qmp(self.qmp_path)
        try:
            return q.call(cmd, **args)
        finally:
            q.close()
