"""The walkthrough a new user does, in a real terminal: a tmux server on its own socket, one window per
replicatord (site A protects vm01, site B holds its replica), and two shell windows where every action is a
typed command whose output is read back from the pane (`tmux capture-pane`).

Steps: certificates (`replicator certs`), two configuration files written as a user writes them (paths relative
to their directory), two VHDX disks (`replicator vhdx create`, then qemu-io on the file), both daemons, the VM's
writes through the NBD export `replicator status` prints, status until Replicating and healthy, an operator's
cycle, test failover and its cleanup, a recovery plan's test run with a manual action confirmed from the other
shell, kill -9 of site A's daemon and its restart, planned failover (zero loss), reverse replication, failback,
then an unplanned failover at the latest point. Each operation ends with the disks compared byte for byte
with the primary's at the expected point. On a failure the message carries every window's transcript (the
shells' commands and output, the daemons' logs)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid

import pytest

from replicator.vhdx import VhdxDisk

from ..externals import tool
from .two_sites import BIN, free_port, read_vhdx, same

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (./tools/bootstrap installs it): the walkthrough "
                                       "drives a real terminal")

DISKS = (("vm01-os.vhdx", 32), ("vm01-data.vhdx", 16))
NAMES = tuple(n for n, _ in DISKS)
WINDOWS = ("shell", "shell2", "site-a", "site-b")
MARK = re.compile(r"^\[exit (\d+) #(\d+)\][ \t]*$", re.M)     # printed by PROMPT_COMMAND before every prompt


# ---------------------------------------------------------------------------------------------- the terminal
class Terminal:
    """A tmux server on a socket of its own; windows run an interactive bash whose PROMPT_COMMAND prints
    `[exit RC #N]` before its N-th prompt, so the end of each typed command and its exit status are read
    from the pane like everything else."""

    def __init__(self, folder):
        self.dir = folder
        self.socket = f"replicator-walk-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.prompts: dict[str, int] = {}       # window -> the number of the prompt its shell shows last
        rc = folder / ".walk-bashrc"
        rc.write_text("PS1='$ '\n"
                      "PROMPT_COMMAND='echo \"[exit $? #$((++N))]\"'\n"
                      f"export PATH={shlex.quote(BIN)}:\"$PATH\"\n"
                      "unset HISTFILE\n")
        conf = folder / ".walk-tmux.conf"
        conf.write_text("set -g history-limit 100000\nset -g default-shell /bin/sh\nset -g default-size 240x50\n")
        self.shell = f"exec bash --noprofile --rcfile {shlex.quote(str(rc))} -i"
        try:
            self.tmux("-f", str(conf), "new-session", "-d", "-s", "walk", "-x", "240", "-y", "50", "-n",
                      WINDOWS[0], "-c", str(folder), self.shell)
            for name in WINDOWS[1:]:
                self.tmux("new-window", "-d", "-t", "walk", "-n", name, "-c", str(folder), self.shell)
            for name in WINDOWS:
                self.prompts[name] = 1
                self.wait_for(name, MARK, "the shell's first prompt", after=0)
        except BaseException:
            subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)
            raise

    def tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def screen(self, window: str) -> str:
        """The window's whole history and screen, wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", f"walk:{window}")

    def since(self, window: str, prompt: int, text: str | None = None) -> str:
        """What the window shows after prompt number `prompt` (the typed command line included)."""
        text = self.screen(window) if text is None else text
        if prompt == 0:
            return text
        m = next((m for m in MARK.finditer(text) if int(m.group(2)) == prompt), None)
        return text[m.end():] if m else ""

    def wait_for(self, window: str, pattern, what: str, timeout: float = 60, after: int | None = None):
        """Poll the window until `pattern` appears after prompt `after` (default: the last one); the match."""
        after = self.prompts[window] if after is None else after
        pattern = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            found = pattern.search(self.since(window, after))
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"window {window}: timed out after {timeout:.0f} s waiting for {what} "
                                     f"({pattern.pattern!r})")
            time.sleep(0.1)

    def type(self, window: str, line: str) -> None:
        """Type a command line and Enter, as a user does."""
        self.tmux("send-keys", "-t", f"walk:{window}", "-l", line)
        self.tmux("send-keys", "-t", f"walk:{window}", "Enter")

    def start(self, window: str, line: str) -> int:
        """Type a command that keeps running (a daemon, a followed job); the prompt number it ends at."""
        self.type(window, line)
        return self.prompts[window] + 1

    def finish(self, window: str, ends_at: int, timeout: float = 90) -> tuple[int, str]:
        """Wait for the command started with `start` to end: its exit status and its output."""
        m = self.wait_for(window, rf"^\[exit (\d+) #{ends_at}\][ \t]*$", f"prompt #{ends_at}", timeout)
        text = self.since(window, self.prompts[window])
        self.prompts[window] = ends_at
        out = text[:text.index(m.group(0))].lstrip("\n") if m.group(0) in text else text
        return int(m.group(1)), out.split("\n", 1)[1] if "\n" in out else ""    # without the command line

    def run(self, line: str, window: str = "shell", *, rc: int | None = 0, timeout: float = 90) -> str:
        """Type a command, wait for its prompt; its output (an exit status other than `rc` fails)."""
        status, out = self.finish(window, self.start(window, line), timeout)
        if rc is not None and status != rc:
            raise AssertionError(f"`{line}` in window {window} exited {status}, expected {rc}:\n{out}")
        return out

    def fails(self, line: str, window: str = "shell", timeout: float = 90) -> str:
        """Type a command that must be refused (a non-zero exit status); its output."""
        status, out = self.finish(window, self.start(window, line), timeout)
        if status == 0:
            raise AssertionError(f"`{line}` in window {window} succeeded; it should have been refused:\n{out}")
        return out

    def poll(self, line: str, predicate, what: str, *, window: str = "shell", timeout: float = 60) -> str:
        """Type `line` again and again (a user watching `replicator status`) until its output satisfies
        `predicate`; that output."""
        deadline, out = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            out = self.run(line, window, rc=None)
            if predicate(out):
                return out
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; `{line}` said last:\n{out}")

    def daemon_pid(self, window: str) -> int:
        """The replicatord the window's shell runs in the foreground, found by its parent's id (the shell's)."""
        shell = self.tmux("display-message", "-p", "-t", f"walk:{window}", "#{pane_pid}").strip()
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", shell], capture_output=True, text=True).stdout
        pids = [int(line.split()[0]) for line in out.splitlines() if "replicatord" in line]
        assert len(pids) == 1, f"window {window}: expected one replicatord under its shell {shell}:\n{out}"
        return pids[0]

    def transcript(self, lines: int = 400) -> str:
        parts = []
        for name in WINDOWS:
            try:
                text = self.screen(name).rstrip("\n").split("\n")
            except (subprocess.SubprocessError, OSError) as e:
                text = [f"(cannot capture: {e})"]
            parts.append(f"======== window {name} (last {lines} lines) ========\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def close(self) -> None:
        """Stop the daemons as a user does (Ctrl-C in their windows), then the tmux server; a daemon that
        does not stop is killed by its pid."""
        for name in ("site-a", "site-b"):
            try:
                pid = self.daemon_pid(name)
            except (AssertionError, subprocess.SubprocessError, OSError):
                continue
            try:
                self.tmux("send-keys", "-t", f"walk:{name}", "C-c")
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
                    time.sleep(0.1)
            except subprocess.SubprocessError:
                pass
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, 9)
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


# ---------------------------------------------------------------------------------------------- bytes
def held_bytes(path) -> bytes:
    """A disk a daemon holds open: a copy, its log replayed, read whole."""
    copy = f"{path}.walk-copy"
    shutil.copy(path, copy)
    try:
        with VhdxDisk.open(copy, read_only=False) as d:
            return d.read(0, d.size)
    finally:
        os.unlink(copy)


def replica_bytes(root, disk_id: str) -> bytes:
    """A disk's replica image in a site's store, read-only as the daemon left it."""
    folder = root / "disks" / disk_id
    chain = json.loads((folder / "state.json").read_text())["chain"]
    with VhdxDisk.open(str(folder / "chain" / chain[-1]), read_only=True) as d:
        return d.read(0, d.size)


def nbd_uris(out: str) -> dict[str, str]:
    """Disk name -> NBD URI, from `replicator status` (`   NAME: tracking  nbd+unix://...`) or from
    `replica-machines` (`   running here: NAME nbd+unix://...`)."""
    found = dict(re.findall(r"^\s+(\S+?): \S.*?(nbd\+unix://\S+)\s*$", out, re.M))
    found.update(re.findall(r"running here: (\S+) (nbd\+unix://\S+)", out))
    return {n: u for n, u in found.items() if n in NAMES}


def disk_ids(out: str) -> dict[str, str]:
    """Disk name -> disk id, from `replicator replica-machines` (`   NAME  ID  generation N`)."""
    return dict(re.findall(r"^\s+(\S+\.vhdx)\s+([0-9a-f-]{36})\s+generation \d+", out, re.M))


# ---------------------------------------------------------------------------------------------- configs
def site_config(me: str, peer: str, admin: int, port: int, peer_port: int, *, machine: bool, plan: bool) -> str:
    tls = f'cert = "pki/{me}.pem"\nkey = "pki/{me}.key"\nca = "pki/ca.pem"\n'
    text = f'''# {me}: paths are relative to this file's directory
[daemon]
state_dir = "{me}/state"
admin_listen = "127.0.0.1:{admin}"

[replica]
listen = "127.0.0.1"
port = {port}
{tls}failover_dir = "{me}/failover"
test_failover_dir = "{me}/test-failover"

[[replica.allow]]
principal = "{peer}"
storage = "{me}/replica"

[replica.reverse]
target = "https://127.0.0.1:{peer_port}"
{tls}frequency = "15m"
'''
    if machine:
        text += f'''
[[machine]]
name = "vm01"
disks = ["{me}/{NAMES[0]}", "{me}/{NAMES[1]}"]
target = "https://127.0.0.1:{peer_port}"
{tls}frequency = "15m"
additional_points = 2
'''
    if plan:
        text += '''
[[plan]]
name = "dr"

[[plan.group]]
members = ["vm01"]
pre = [{ script = "hooks/announce.sh" }]
post = [{ manual = "Boot vm01 from its test disks and check that it answers", kinds = ["test"] }]
'''
    return text


# ---------------------------------------------------------------------------------------------- the walk
def test_walkthrough_in_tmux(tmp_path):
    tool("qemu-io")
    work = tmp_path
    a_admin, b_admin, a_port, b_port = (free_port() for _ in range(4))
    (work / "site-a.toml").write_text(site_config("site-a", "site-b", a_admin, a_port, b_port,
                                                  machine=True, plan=False))
    (work / "site-b.toml").write_text(site_config("site-b", "site-a", b_admin, b_port, a_port,
                                                  machine=False, plan=True))
    (work / "hooks").mkdir()
    hook = work / "hooks" / "announce.sh"
    hook.write_text('#!/bin/sh\necho "$REPLICATOR_PLAN $REPLICATOR_FAILOVER $REPLICATOR_ACTION" '
                    '>> "$(dirname "$0")/../plan-hooks.log"\n')
    hook.chmod(0o755)
    A, B = "--config site-a.toml", "--config site-b.toml"
    a_disk = {n: work / "site-a" / n for n in NAMES}
    b_failover = {n: work / "site-b" / "failover" / "vm01" / n for n in NAMES}

    term = Terminal(work)
    try:
        sh = term.run

        def write(uris: dict[str, str], pattern: int, offset_mib: int, length: str = "1M") -> None:
            """The VM writes to both disks through the daemon's NBD export."""
            for k, n in enumerate(NAMES):
                sh(f"qemu-io -f raw -c 'write -P {pattern + k:#04x} {offset_mib + k}M {length}' "
                   f"'{uris[n]}'")

        def status(config: str) -> str:
            return sh(f"replicator status {config}")

        def compare(actual: dict[str, bytes], expected: dict[str, bytes], what: str) -> None:
            for n in NAMES:
                same(actual[n], expected[n], f"{what}: {n}")

        # ---- certificates, disks, daemons
        out = sh("replicator certs init pki")
        assert "CA: " in out and "ca.pem" in out, out
        for site in ("site-a", "site-b"):
            out = sh(f"replicator certs issue pki {site}")
            assert "certificate: " in out and f"{site}.pem" in out, out
        sh("mkdir -p site-a site-b")
        for n, size in DISKS:
            sh(f"replicator vhdx create site-a/{n} {size}M --block-size 1M")
        # the VM's existing data, written before protection starts
        sh(f"qemu-io -f vhdx -c 'write -P 0x40 0 1M' -c 'write -P 0x41 20M 3M' site-a/{NAMES[0]}")
        sh(f"qemu-io -f vhdx -c 'write -P 0x42 4M 2M' site-a/{NAMES[1]}")
        out = sh("replicatord --config site-a.toml --check-config")
        assert "valid; roles: primary, replica; machines: vm01" in out, out

        daemon_started = r"admin API on http://127\.0\.0\.1:\d+"
        term.start("site-b", "replicatord --config site-b.toml")
        term.wait_for("site-b", daemon_started, "site B's daemon to start")
        a_daemon_ends = term.start("site-a", "replicatord --config site-a.toml")
        term.wait_for("site-a", daemon_started, "site A's daemon to start")

        # ---- watch status until the initial replication is done and the machine healthy
        out = term.poll(f"replicator status {A}",
                        lambda o: "vm01: Replicating" in o and "health Normal" in o, "vm01 to replicate")
        uris_a = nbd_uris(out)
        assert set(uris_a) == set(NAMES), out
        assert "replica role: " in out, out
        out = sh(f"replicator jobs {A}")
        assert re.search(r"initial vm01 .*succeeded", out), out

        # ---- the VM writes; an operator's cycle
        write(uris_a, 0x11, 2)
        out = sh(f"replicator machine vm01 cycle --wait {A}")
        assert "succeeded" in out, out
        snap1 = {n: held_bytes(a_disk[n]) for n in NAMES}
        out = sh(f"replicator replica-machines {B}")
        assert "vm01: Replicating (replica)" in out, out
        ids_b = disk_ids(out)
        assert set(ids_b) == set(NAMES), out
        compare({n: replica_bytes(work / "site-b" / "replica", ids_b[n]) for n in NAMES}, snap1,
                 "site B's replica after the first cycle")

        # ---- test failover on site B, then its cleanup
        out = sh(f"replicator replica-machine vm01 test-failover {B}")
        assert re.search(r"test failover of point \d+ in \S+", out), out
        test_dir = work / "site-b" / "test-failover" / "vm01"
        compare({n: read_vhdx(test_dir / n) for n in NAMES}, snap1, "test failover")
        out = term.fails(f"replicator replica-machine vm01 failover {B}")
        assert "test failover is running" in out, out
        sh(f"replicator replica-machine vm01 cleanup-test-failover {B}")
        assert not test_dir.exists()

        # ---- a recovery plan: its test run waits for the operator, who confirms from the other shell
        write(uris_a, 0x21, 6, "64k")
        sh(f"replicator machine vm01 cycle --wait {A}")
        snap2 = {n: held_bytes(a_disk[n]) for n in NAMES}
        out = sh(f"replicator plans {B}")
        assert "dr: 1 group; never run" in out, out
        plan_ends = term.start("shell", f"replicator plan dr test --wait {B}")
        asked = term.wait_for("shell", r"confirm with `(replicator plan dr confirm (\S+) --config site-b.toml)`",
                              "the manual action")
        hint, action = asked.group(1), asked.group(2)
        out = term.run(f"replicator plan dr show {B}", "shell2")
        assert "waiting for confirmation" in out and action in out, out
        out = term.run(hint, "shell2")                      # the hint, pasted as printed
        assert f"dr: {action} confirmed" in out, out
        _, out = term.finish("shell", plan_ends)
        assert "dr: test failover succeeded" in out, out
        assert f"{action}: ok" in out, out
        compare({n: read_vhdx(test_dir / n) for n in NAMES}, snap2, "the plan's test failover")
        assert (work / "plan-hooks.log").read_text() == "dr test g1.pre1\n"
        sh(f"replicator plan dr cleanup {B}")
        assert not test_dir.exists()

        # ---- kill -9 site A's daemon while the VM has written, restart it, see it continue
        write(uris_a, 0x31, 9, "2M")
        sh(f"kill -9 {term.daemon_pid('site-a')}")
        status_killed, _ = term.finish("site-a", a_daemon_ends, timeout=30)
        assert status_killed == 137, status_killed
        out = term.fails(f"replicator status {A}")
        assert "is not reachable" in out, out
        term.start("site-a", "replicatord --config site-a.toml")
        term.wait_for("site-a", daemon_started, "site A's daemon to start again")
        out = term.poll(f"replicator status {A}", lambda o: "vm01: Replicating" in o, "vm01 to replicate again")
        sh(f"replicator machine vm01 cycle --wait {A}")
        out = status(A)
        assert "vm01: Replicating" in out and "health Normal" in out, out
        snap3 = {n: held_bytes(a_disk[n]) for n in NAMES}
        compare({n: replica_bytes(work / "site-b" / "replica", ids_b[n]) for n in NAMES}, snap3,
                "site B's replica after site A's restart")

        # ---- planned failover: nothing lost, not even what was written after the last cycle
        write(uris_a, 0x41, 12, "128k")
        sh(f"replicator machine vm01 planned-failover --wait {A}")
        assert "vm01: PreparedForFailover" in status(A)
        out = term.fails(f"qemu-io -f raw -c 'write -P 0x4f 0 64k' '{uris_a[NAMES[0]]}'")   # the primary is stopped
        assert "Failed to connect" in out, out
        snap4 = {n: held_bytes(a_disk[n]) for n in NAMES}
        out = sh(f"replicator replica-machine vm01 failover --planned {B}")
        assert "vm01: FailedOverWaitingCompletion" in out, out
        uris_b = nbd_uris(out)
        assert set(uris_b) == set(NAMES), out
        compare({n: held_bytes(b_failover[n]) for n in NAMES}, snap4, "planned failover")

        # ---- the machine runs on site B; reverse replication back to site A
        write(uris_b, 0x51, 3, "192k")
        out = sh(f"replicator replica-machine vm01 accept-reverse {A}")
        assert "vm01: Replicating (replica, reversed)" in out, out
        out = sh(f"replicator replica-machine vm01 reverse {B}")
        assert f"replicating to https://127.0.0.1:{a_port}" in out, out
        term.poll(f"replicator status {B}", lambda o: "vm01: Replicating" in o and "never" not in o,
                  "the reverse replication's first cycle")
        sh(f"replicator machine vm01 cycle --wait {B}")
        snap5 = {n: held_bytes(b_failover[n]) for n in NAMES}
        out = sh(f"replicator replica-machines {A}")
        ids_a = disk_ids(out)
        assert set(ids_a) == set(NAMES) and ids_a == ids_b, out
        compare({n: replica_bytes(work / "site-a" / "replica", ids_a[n]) for n in NAMES}, snap5,
                "site A's replica of the reverse replication")

        # ---- failback: a planned failover the other way; site A's own disk files hold the machine again
        uris_b = nbd_uris(status(B))
        write(uris_b, 0x61, 14, "64k")
        sh(f"replicator machine vm01 planned-failover --wait {B}")
        assert "vm01: FailbackComplete" in status(B)
        snap6 = {n: held_bytes(b_failover[n]) for n in NAMES}
        out = sh(f"replicator replica-machine vm01 failover --planned {A}")
        assert "vm01: FailedOverWaitingCompletion" in out, out
        compare({n: held_bytes(a_disk[n]) for n in NAMES}, snap6, "failback")
        sh(f"replicator replica-machine vm01 accept-reverse {B}")
        out = sh(f"replicator replica-machine vm01 reverse {A}")
        assert f"replicating to https://127.0.0.1:{b_port}" in out, out
        out = term.poll(f"replicator status {A}", lambda o: "vm01: Replicating" in o, "vm01 to replicate from A")
        uris_a = nbd_uris(out)
        write(uris_a, 0x71, 16 - 2, "256k")
        sh(f"replicator machine vm01 cycle --wait {A}")
        snap7 = {n: held_bytes(a_disk[n]) for n in NAMES}
        out = sh(f"replicator replica-machines {B}")
        assert "vm01: Replicating (replica)" in out and "reversed" not in out.split("\n")[0], out
        compare({n: replica_bytes(work / "site-b" / "replica", ids_b[n]) for n in NAMES}, snap7,
                "site B's replica after the failback")

        # ---- unplanned failover at the latest point: what the last cycle shipped, not what came after it
        write(uris_a, 0x81, 1, "64k")                       # written after the last cycle: lost
        out = sh(f"replicator replica-machine vm01 failover {B}")
        assert "vm01: FailedOverWaitingCompletion" in out, out
        compare({n: held_bytes(b_failover[n]) for n in NAMES}, snap7, "unplanned failover")
        sh(f"replicator replica-machine vm01 commit-failover {B}")
        out = sh(f"replicator replica-machines {B}")
        assert "vm01: FailedOver (replica)" in out, out
        out = term.fails(f"replicator machine vm01 cycle {A}")
        assert "failed over" in out, out
        out = status(A)                                     # the former primary knows it is cut off
        assert "vm01: Error" in out and "health Critical" in out, out
        print(term.transcript())        # the whole session, shown by `pytest -rP`
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise AssertionError(f"{e}\n\n{term.transcript()}") from e
    finally:
        term.close()
