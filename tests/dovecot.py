"""A real, throwaway Dovecot LMTP server for tests (recipe: /work/shared/notes/dovecot-lmtp.md).

Its directory is 0755 and not under pytest's tmp_path (0700 parents: Dovecot's auth process
runs as `dovecot` and could not read the users file); mail is owned by `mail` (uid 8), because
Dovecot refuses to deliver as root. Users: alice, bob, carol (1 KiB quota), dave, all
@example.test; anything else is "User doesn't exist" (550 5.1.1).

Start: `dovecot -F` and wait for master.pid (written once the listeners are bound, so the port
is ours, not another server's) and the 220 greeting. Stop: SIGTERM; the log must hold no
`Error:` or `Fatal:` line (most misconfigurations do not stop start-up, they turn into 4xx).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon import free_port, wait_until

USERS = ("alice", "bob", "carol", "dave")
DOMAIN = "example.test"
QUOTA_USER = "carol"



def users_file(quota_field: str) -> str:
    """passwd-file lines; field 8 holds userdb extras (a 1 KiB quota for QUOTA_USER)."""
    return "".join(f"{u}@{DOMAIN}:::::::" + (quota_field if u == QUOTA_USER else "") + "\n"
                   for u in USERS)


QUOTA_23 = "userdb_quota_rule=*:storage=1K"
QUOTA_24 = "userdb_quota_storage_size=1K"

CONFIG_23 = """\
base_dir = @DIR@/run
state_dir = @DIR@/state
log_path = @DIR@/dovecot.log
protocols = lmtp
# No stats process to talk to: under load its handshake timed out ("Error: conn ...stats-writer")
stats_writer_socket_path =
hostname = lmtp.test
ssl = no
mail_uid = mail
mail_gid = mail
first_valid_uid = 8
mail_location = maildir:@DIR@/mail/%u
mail_plugins = quota
@EXTRA@
passdb {
  driver = passwd-file
  args = @DIR@/users
}
userdb {
  driver = passwd-file
  args = @DIR@/users
}
plugin {
  quota = maildir:User quota
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = @PORT@
  }
  unix_listener @DIR@/lmtp.sock {
    mode = 0666
  }
}
"""

# Dovecot 2.4 (Debian 13) renamed most of the above. Checked with trixie's 2.4.1-4 in a chroot
# (LHLO, 250 per recipient, 550 5.1.1 unknown, 552 5.2.2 over quota, files in mail/<user>/new):
# without mail_inbox_path the INBOX was mail/<user>/.INBOX/, and the default
# quota_storage_grace of 10 MiB let carol's 3 KB message through her 1 KiB quota.
CONFIG_24 = """\
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
base_dir = @DIR@/run
state_dir = @DIR@/state
log_path = @DIR@/dovecot.log
protocols = lmtp
hostname = lmtp.test
ssl = no
mail_uid = mail
mail_gid = mail
first_valid_uid = 8
mail_driver = maildir
mail_path = @DIR@/mail/%{user}
mail_inbox_path = @DIR@/mail/%{user}
stats_writer_socket_path =
@EXTRA@
mail_plugins {
  quota = yes
}
quota "User quota" {
  driver = count
  quota_storage_grace = 0
}
passdb passwd-file {
  passwd_file_path = @DIR@/users
}
userdb passwd-file {
  passwd_file_path = @DIR@/users
}
service lmtp {
  inet_listener lmtp {
    listen = 127.0.0.1
    port = @PORT@
  }
  unix_listener @DIR@/lmtp.sock {
    mode = 0666
  }
}
"""


def version() -> tuple[int, int] | None:
    exe = shutil.which("dovecot") or ("/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot")
                                      else None)
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.match(r"(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def require() -> None:
    """Skip only where Dovecot cannot be there: not root (cannot install it, cannot run it
    with its own users). As root a missing Dovecot is a setup error: run scripts/bootstrap."""
    if version() is not None:
        if os.geteuid() != 0:
            pytest.skip("Dovecot LMTP tests need root (Dovecot drops to the mail user)")
        return
    if os.geteuid() != 0:
        pytest.skip("dovecot-core/dovecot-lmtpd not installed and not root to install them "
                    "(scripts/bootstrap installs them as root)")
    pytest.fail("dovecot is not installed: run scripts/bootstrap as root "
                "(apt-get install dovecot-core dovecot-lmtpd)")


@dataclass
class Dovecot:
    dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    extra: str = ""
    expected_errors: list[str] = field(default_factory=list)  # log lines a test provokes

    @property
    def socket_path(self) -> str:
        return str(self.dir / "lmtp.sock")

    @property
    def tcp(self) -> str:
        return f"lmtp:127.0.0.1:{self.port}"

    @property
    def unix(self) -> str:
        return f"lmtp:unix:{self.socket_path}"

    @property
    def log(self) -> str:
        try:
            return (self.dir / "dovecot.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        pid_file = self.dir / "run" / "master.pid"
        pid_file.unlink(missing_ok=True)
        proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.dir / "dovecot.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.proc = proc

        def up() -> bool:
            if proc.poll() is not None:  # bad config or port taken: exit 89, reason on stderr
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"dovecot exited {proc.returncode}: {err}")
            try:
                if pid_file.read_text().strip() != str(proc.pid):
                    return False
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    return s.recv(100).startswith(b"220 ")
            except OSError:
                return False

        try:
            wait_until(up, "dovecot's 220 greeting", timeout=30)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> int:
        """SIGTERM and wait (1-6 s: Dovecot waits for its children)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        if self.proc.stderr:
            self.proc.stderr.close()
        return rc

    def kill(self) -> None:
        """SIGKILL to the master and every child in its process group's session."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def children(self) -> list[int]:
        """Pids of the master's children (lmtp, auth, ...)."""
        assert self.proc is not None
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def lmtp_children(self) -> list[int]:
        pids = []
        for pid in self.children():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if cmd.startswith(b"dovecot/lmtp"):
                pids.append(pid)
        return pids

    def messages(self, user: str) -> list[bytes]:
        """What Dovecot stored for `user` (local part or address), oldest first by file name."""
        box = self.dir / "mail" / (user if "@" in user else f"{user}@{DOMAIN}")
        files: list[Path] = []
        for sub in ("new", "cur"):
            if (box / sub).is_dir():
                files.extend((box / sub).iterdir())
        return [f.read_bytes() for f in sorted(files, key=lambda f: f.name)]

    def check_log(self) -> None:
        bad = [line for line in self.log.splitlines()
               if ("Error:" in line or "Fatal:" in line)
               and not any(e in line for e in self.expected_errors)]
        assert not bad, "dovecot logged errors:\n" + "\n".join(bad)


def make(extra: str = "") -> Dovecot:
    """A configured, not yet started Dovecot in a fresh 0755 directory."""
    v = version()
    d = Path(tempfile.mkdtemp(prefix="elemta-dovecot-"))
    os.chmod(d, 0o755)
    for sub in ("run", "state", "mail"):
        (d / sub).mkdir()
    shutil.chown(d / "mail", "mail", "mail")
    new = v is not None and v >= (2, 4)
    (d / "users").write_text(users_file(QUOTA_24 if new else QUOTA_23))
    os.chmod(d / "users", 0o644)
    port = free_port()
    template = CONFIG_24 if new else CONFIG_23
    (d / "dovecot.conf").write_text(
        template.replace("@DIR@", str(d)).replace("@PORT@", str(port)).replace("@EXTRA@", extra))
    return Dovecot(d, port, extra=extra)


@contextmanager
def running(extra: str = "") -> Iterator[Dovecot]:
    """A started Dovecot, stopped and removed afterwards; fails the test on logged errors."""
    require()
    dc = make(extra)
    try:
        dc.start()
        yield dc
        dc.stop()
        dc.check_log()
    finally:
        dc.kill()
        shutil.rmtree(dc.dir, ignore_errors=True)
