"""A real Postfix as the smarthost elemta relays to: a throwaway instance on a loopback port.

Built like bench/postfix.py's durable instance (its own config, queue and data directories in
a temp dir, every command with `-c`, chroot off, only the services it needs), but it keeps
mail: the recipients of `relay.test` listed in USERS get a Maildir each through virtual(8);
any other address of relay.test is refused at RCPT by Postfix itself (550 5.1.1 User unknown
in virtual mailbox table), and ACCESS answers chosen recipients with a fixed reply through
check_recipient_access (a 451 and a 550 on demand). Logs go to maillog in the temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon import free_port, wait_until

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
DOMAIN = "relay.test"
USERS = ("alice", "bob", "carol", "tempfail", "reject")
ACCESS = {
    f"tempfail@{DOMAIN}": "451 4.7.1 Try again later, said the access map",
    f"reject@{DOMAIN}": "550 5.7.1 Not wanted here, said the access map",
}

# The services every throwaway Postfix here needs (bench/postfix.py adds its own); chroot off
# (column 5 = n) so nothing has to be copied into a jail; no pickup/maildrop.
SERVICES = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
proxymap  unix - - n - - proxymap
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
"""
MASTER_CF = SERVICES + """\
virtual   unix - n n - - virtual
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
maillog_file = {dir}/maillog
mail_owner = postfix
setgid_group = postdrop
myhostname = hub.test
mydomain = hub.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {dir}/mail
virtual_mailbox_maps = texthash:{dir}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_mailbox_limit = 0
message_size_limit = {max_size}
smtpd_recipient_restrictions = check_recipient_access texthash:{dir}/etc/access,
    permit_mynetworks, reject_unauth_destination
default_transport = error:no onward delivery from this test hub
disable_dns_lookups = yes
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
biff = no
smtpd_tls_security_level = none
smtp_tls_security_level = none
"""


def installed() -> bool:
    return os.access(POSTFIX, os.X_OK)


@dataclass
class Postfix:
    port: int
    dir: Path

    @property
    def log(self) -> str:
        try:
            return (self.dir / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def messages(self, user: str) -> list[bytes]:
        new = self.dir / "mail" / user / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []

    def wait_for(self, user: str, marker: bytes, timeout: float = 30) -> bytes:
        """The message of `user` that holds `marker`, once virtual(8) has stored it."""
        found: list[bytes] = []

        def got() -> bool:
            found[:] = [m for m in self.messages(user) if marker in m]
            return bool(found)
        wait_until(got, f"{user}@{DOMAIN} gets the message {marker!r}", timeout)
        assert len(found) == 1, found
        return found[0]


def _postfix(confdir: Path, *args: str) -> None:
    out = subprocess.run([POSTFIX, "-c", str(confdir), *args], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"postfix -c {confdir} {' '.join(args)}: exit {out.returncode}: "
                           f"{(out.stderr or out.stdout).strip()[-800:]}")


def _master_pid(queue: Path) -> int:
    pid = 0

    def written() -> bool:
        nonlocal pid
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((queue / "pid" / "master.pid").read_text().split()[0])
            os.kill(pid, 0)
            return True
        return False
    wait_until(written, "postfix master writes its pid file", 30)
    return pid


@contextlib.contextmanager
def running(port: int | None = None, max_size: int = 200 * 1024 * 1024) -> Iterator[Postfix]:
    """A Postfix smarthost on `port` (a free one if None), stopped and removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="elemta-test-postfix-", dir="/var/tmp"))
    work.chmod(0o755)  # the postfix user must reach the queue below it
    port = port or free_port()
    confdir = work / "etc"
    confdir.mkdir()
    uid, gid = 65534, 65534  # virtual(8) refuses uids below virtual_minimum_uid (100)
    (confdir / "main.cf").write_text(MAIN_CF.format(dir=work, domain=DOMAIN, uid=uid, gid=gid,
                                                    max_size=max_size))
    (confdir / "master.cf").write_text(MASTER_CF.format(port=port))
    (confdir / "vmailbox").write_text("".join(f"{u}@{DOMAIN} {u}/\n" for u in USERS))
    (confdir / "access").write_text("".join(f"{a} {r}\n" for a, r in ACCESS.items()))
    (work / "queue").mkdir(mode=0o755)
    mail = work / "mail"
    mail.mkdir()
    os.chown(mail, uid, gid)
    pid = 0
    try:
        _postfix(confdir, "check")
        _postfix(confdir, "start")
        pid = _master_pid(work / "queue")
        wait_until(lambda: _listening(port), f"postfix listens on 127.0.0.1:{port}", 30)
        yield Postfix(port, work)
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _postfix(confdir, "abort")
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # The daemons the master started exit when it does; their files go with the dir.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(port):
            time.sleep(0.05)
        shutil.rmtree(work, ignore_errors=True)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
