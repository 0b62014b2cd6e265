"""Postfix as a benchmark opponent: a throwaway durable instance on loopback, and smtp-sink.

The durable instance lives entirely in a temp dir (its own config, queue and data
directories), listens on one free 127.0.0.1 port, queues every message the way Postfix
always does (cleanup fsyncs the queue file before smtpd answers 250) and then hands it to
the discard transport (or, for bench/e2e.py, to its lmtp transport). It never touches /etc/postfix or a port 25 instance: every postfix
command gets `-c <temp dir>`, and nothing in it listens anywhere else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from common import MiB, Server, popen_server, tree_pids, wait_port
from daemon import free_port
from postfixhub import SERVICES

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"

# The shared services (tests/postfixhub.py) plus showq and the lmtp transport.
MASTER_CF = SERVICES + """\
showq     unix n - n - - showq
lmtp      unix - - n - - lmtp
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
# No maillog_file: with it, the burst of log lines when a thousand idle sessions close at once
# wedged postlogd (its watchdog killed it) and then master, blocked writing to the dead log
# socket, in both rounds of a run here. Without it Postfix logs to syslog, which this machine
# does not run, so Postfix pays no logging cost in the bench (elemta logs one line a message).
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination = example.test
local_recipient_maps =
alias_maps =
alias_database =
local_transport = {transport}
default_transport = {transport}
relay_transport = {transport}
message_size_limit = {max_size}
mailbox_size_limit = 0
virtual_mailbox_limit = 0
# 1,000 idle sessions from one client: one smtpd process each.
default_process_limit = {processes}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_event_limit_exceptions = 127.0.0.0/8
# No DNS, no TLS, no biff: loopback only, like the other servers under test.
disable_dns_lookups = yes
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
biff = no
smtpd_tls_security_level = none
smtp_tls_security_level = none
"""


def installed() -> bool:
    return all(os.access(p, os.X_OK) for p in (POSTFIX, POSTCONF, SMTP_SINK))


def _postfix(confdir: Path, *args: str) -> None:
    out = subprocess.run([POSTFIX, "-c", str(confdir), *args], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"postfix -c {confdir} {' '.join(args)}: exit {out.returncode}: "
                           f"{(out.stderr or out.stdout).strip()[-800:]}")


def _master_pid(queue: Path, timeout: float = 30) -> int:
    pidfile = queue / "pid" / "master.pid"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, 0)
            return pid
        time.sleep(0.05)
    raise RuntimeError(f"postfix master did not write {pidfile}")


def _queued(queue: Path) -> int:
    """Messages still in the queue (incoming, active, deferred, hold): 0 when all discarded."""
    return sum(len(files) for sub in ("incoming", "active", "deferred", "hold", "maildrop")
               for _, _, files in os.walk(queue / sub))


def durable(processes: int = 1200, max_size: int = 200 * MiB, transport: str = "discard:",
            name: str = "postfix", main_extra: str = "", master_extra: str = "") -> Server:
    """A throwaway Postfix on a free loopback port that queues (fsync) and then discards, or
    hands every message to `transport` (e.g. "lmtp:inet:127.0.0.1:PORT": bench/e2e.py);
    `main_extra` / `master_extra` lines are appended (later main.cf lines win: bench/relay.py
    makes it relay)."""
    base = Path(os.environ.get("ELEMTA_BENCH_DIR", "/var/tmp"))
    work = Path(tempfile.mkdtemp(prefix="elemta-bench-postfix-", dir=base))
    # The queue is owned by root with postfix-owned subdirs; `postfix start` creates them,
    # but the parent must not be the 0700 mkdtemp dir or the postfix user cannot reach it.
    work.chmod(0o755)
    port = free_port()
    confdir = work / "etc"
    confdir.mkdir()
    (confdir / "main.cf").write_text(MAIN_CF.format(dir=work, max_size=max_size, processes=processes,
                                                    transport=transport) + main_extra)
    (confdir / "master.cf").write_text(MASTER_CF.format(port=port) + master_extra)
    queue = work / "queue"
    # postfix check creates the queue's subdirectories, but not the queue directory itself.
    queue.mkdir(mode=0o755)
    try:
        _postfix(confdir, "check")
        _postfix(confdir, "start")
        pid = _master_pid(queue)
        wait_port(port)
    except BaseException:
        with contextlib.suppress(Exception):
            _postfix(confdir, "abort")
        shutil.rmtree(work, ignore_errors=True)
        raise

    def stop() -> None:
        pids = tree_pids(pid)
        with contextlib.suppress(RuntimeError):
            _postfix(confdir, "abort")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)

    def settle(timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while _queued(queue) and time.monotonic() < deadline:
            time.sleep(0.02)

    def shed_idle(timeout: float = 20) -> None:
        # reload: every idle service process exits and is forked again on demand.
        _postfix(confdir, "reload")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_comm(p) == "smtpd" for p in tree_pids(pid)):
            time.sleep(0.05)

    return Server(name, port, pid, stop, settle, shed_idle)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """True while pid runs; a zombie counts as gone (the daemonised master's parent is
    init, which may be slow to reap it in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def sink() -> Server:
    """Postfix's smtp-sink: one process, accepts everything, discards it in memory."""
    port = free_port()
    # -u is required when run as root (it drops privileges after binding); -c/-p/-v off;
    # -m: its default cap is 256 concurrent sessions; backlog 2048 for 1,000 idle sessions.
    cmd = [SMTP_SINK, *(["-u", "nobody"] if os.geteuid() == 0 else []), "-m", "2048",
           f"127.0.0.1:{port}", "2048"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return popen_server("smtp-sink", port, proc)
