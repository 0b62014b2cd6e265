#!/usr/bin/env python3
"""`make flood-test`: the memory flood against the package as installed, under its own systemd.

Boots the release's VM (vmhost.py) with the .deb installed, a `MemoryMax=384M` drop-in and the
socket opened to the network; from the host, through a loopback port forwarded to the guest's
port 25, 200 clients connect and go into DATA at once, each with one message of 5-20 MiB, and
stream their bodies 16 at a time (under emulation the VM takes 1-3 MiB/s in all, so 200 bodies
at once would complete none); at the deadline (360 s) the rest hang up, mid-message or before
it, as careless clients do. A prober opens a connection every half second. Once the flood is under way a ballast in elemta.service's cgroup holds anonymous memory
until the working set passes 93% of the limit, for HOLD seconds after the first 452 4.3.1. Then:
no OOM kill (memory.events oom_kill 0, same MainPID), 452 4.3.1 while critical, every 250
stored intact (sha256 of the body in the Maildir), mail accepted again after the flood.

Known defect (trixie, kernel 6.12): the working set counts freshly written page cache as active,
so elemta may keep refusing after the flood; reported as such (with the figures), not hidden.

Usage: tests/system/flood.py DEB RELEASE [--clients N] [--deadline S]
Exit 0 when all holds; 1 otherwise; 77 when it cannot run here.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import secrets
import shutil
import smtplib
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from vmhost import CannotRun, Vm, prepare

MiB = 1 << 20
SIZES_MIB = (5, 20)
FRACTION = 0.93  # the ballast: working set up to this share of memory.max (critical is 0.90)
HOLD = 10.0  # seconds of critical pressure after the first 452
STALL = 120.0  # a client that makes no progress for this long reports a stall (TimeoutError)
LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?-_=+*/%&#@\r\n"
BLOCK = LINE * (MiB // len(LINE))
BLOCK_STORED = BLOCK.replace(b"\r\n", b"\n")


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[int, str] = field(default_factory=dict)  # seq -> sha256[:16] of the stored body
    replies: dict[str, int] = field(default_factory=dict)  # final reply (or where it stopped)
    greetings: dict[str, int] = field(default_factory=dict)  # the prober's
    bytes_sent: int = 0
    in_data: int = 0  # clients that reached DATA (354)
    finished: int = 0  # client threads done, however
    critical: dict[str, int] = field(default_factory=dict)  # greetings while the ballast held

    def count(self, table: dict[str, int], key: str) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1


def _reply(f: BinaryIO) -> bytes:
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


def send_one(port: int, seq: int, mib: int, tally: Tally, deadline: float, slots: threading.Semaphore,
             connecting: threading.Semaphore, phase: list[str]) -> None:
    """One message of `mib` MiB, its 250 recorded with the body's hash. The session goes into DATA
    at once, then waits for one of the streaming slots; at `deadline` it hangs up wherever it is.
    `phase` says where it is (for the report of a client that fails)."""
    head = (f"From: flood@example.test\r\nTo: postmaster@localhost\r\nSubject: flood {seq}\r\n"
            f"X-Power-Seq: {seq}\r\n\r\n").encode()
    first = f"flood {seq} {secrets.token_hex(8)}\r\n".encode()
    sha = hashlib.sha256(first.replace(b"\r\n", b"\n"))
    with connecting:  # qemu's forwarded port listens with a backlog of 1: a few at a time
        s = socket.create_connection(("127.0.0.1", port), timeout=STALL)
        f = s.makefile("rb")
        phase[0] = "greeting"
        try:
            greeting = _reply(f)
        except BaseException:
            s.close()
            raise
    with s:
        if not greeting.startswith(b"220"):
            tally.count(tally.replies, "greeting " + greeting[:9].decode(errors="replace").strip())
            return
        for cmd in (b"EHLO flood.test", b"MAIL FROM:<flood@example.test>",
                    b"RCPT TO:<postmaster@localhost>", b"DATA"):
            phase[0] = cmd.split()[0].decode()
            s.sendall(cmd + b"\r\n")
            r = _reply(f)
            if r[:1] not in (b"2", b"3"):
                tally.count(tally.replies, cmd.split()[0].decode() + " " + r[:9].decode(errors="replace").strip())
                return
        phase[0] = "waiting in DATA for a slot"
        with tally.lock:
            tally.in_data += 1
        if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            tally.count(tally.replies, "hung up in DATA at the deadline, before sending")
            return
        try:
            s.sendall(head + first)
            for n in range(mib):
                phase[0] = f"MiB {n} of {mib}"
                if time.monotonic() > deadline:
                    tally.count(tally.replies, "hung up in DATA at the deadline, mid-message")
                    return
                s.sendall(BLOCK)
                sha.update(BLOCK_STORED)
                with tally.lock:
                    tally.bytes_sent += len(BLOCK)
            phase[0] = "final reply"
            s.sendall(b".\r\n")
            r = _reply(f)
        finally:
            slots.release()
        tally.count(tally.replies, "DATA " + r[:9].decode(errors="replace").strip())
        if r.startswith(b"250"):
            with tally.lock:
                tally.acked[seq] = sha.hexdigest()[:16]
        s.sendall(b"QUIT\r\n")


def client(port: int, seq: int, tally: Tally, deadline: float, slots: threading.Semaphore,
           connecting: threading.Semaphore, rng: random.Random) -> None:
    phase = ["connect"]
    try:
        send_one(port, seq, rng.randint(*SIZES_MIB), tally, deadline, slots, connecting, phase)
    except (OSError, ConnectionError) as exc:
        where = phase[0] if not phase[0].startswith("MiB") else "streaming"
        tally.count(tally.replies, f"error {type(exc).__name__} at {where}")
    finally:
        with tally.lock:
            tally.finished += 1


def prober(port: int, tally: Tally, stop: threading.Event, holding: threading.Event) -> None:
    """A new connection every half second: elemta must always greet (220, or 452 when critical)."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                line = s.makefile("rb").readline()
            code = line[:3].decode(errors="replace") or "closed"
        except OSError:
            code = "unanswered"
        tally.count(tally.greetings, code)
        if holding.is_set():
            tally.count(tally.critical, code)
        stop.wait(0.5)


class Control:
    """guest-serve.sh's control server (flood mode)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=300)
        self.f = self.sock.makefile("rw")

    def ask(self, command: str) -> list[str]:
        self.f.write(command + "\n")
        self.f.flush()
        out: list[str] = []
        for line in self.f:
            if line.strip() == "END":
                return out
            out.append(line.rstrip("\n"))
        raise ConnectionError(f"control connection closed during {command!r}")

    def stats(self) -> dict[str, str]:
        return dict(line.split(None, 1) if " " in line else line.split("=", 1) for line in self.ask("stats"))


def until(check: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.2)  # polling counters the client threads update; no event to wait on
    return False


def accepted(port: int) -> str:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            smtp.sendmail("after@example.test", ["postmaster@localhost"], "Subject: after the flood\r\n\r\nok\r\n")
        return "250"
    except smtplib.SMTPResponseException as exc:
        err = exc.smtp_error
        return f"{exc.smtp_code} {err.decode(errors='replace') if isinstance(err, bytes) else err}"
    except smtplib.SMTPRecipientsRefused as exc:
        code, msg = next(iter(exc.recipients.values()))
        return f"{code} {msg.decode(errors='replace')}"
    except (OSError, smtplib.SMTPException) as exc:
        return f"error {exc}"


def run(deb: Path, release: str, clients: int, streams: int, deadline_s: float, seed: int) -> int:
    try:
        image, work = prepare(deb, release, "flood")
    except CannotRun as exc:
        print(f"flood-test: SKIP: {exc}")
        return 77
    start = time.monotonic()
    vm = Vm(image, work, 0)
    failures: list[str] = []
    try:
        try:
            report = vm.wait_ready()
        except RuntimeError as exc:
            print(f"flood-test ({release}): FAIL: {exc}; last console lines:\n{vm.console_tail()}")
            return 1
        print(f"flood-test ({release}): {report.boot}; installed in {report.installed}s; ready after "
              f"{time.monotonic() - start:.0f}s; {clients} clients in DATA at once, each with one message of "
              f"{SIZES_MIB[0]}-{SIZES_MIB[1]} MiB, {streams} streaming at a time, deadline {deadline_s:.0f}s, "
              f"seed {seed}", flush=True)
        control = Control(vm.control_port)
        before = control.stats()
        rng = random.Random(seed)
        tally = Tally()
        stop, holding = threading.Event(), threading.Event()
        t0 = time.monotonic()
        deadline = t0 + deadline_s
        slots, connecting = threading.Semaphore(streams), threading.Semaphore(4)
        threads = [threading.Thread(target=client, args=(vm.port, i + 1, tally, deadline, slots, connecting,
                                                         random.Random(rng.randrange(1 << 30))))
                   for i in range(clients)]
        probe = threading.Thread(target=prober, args=(vm.port, tally, stop, holding))
        for t in threads:
            t.start()
        probe.start()
        # Under way: every client in DATA (or done), the first streams past their first MiB.
        until(lambda: tally.in_data + tally.finished >= clients and tally.bytes_sent >= streams * MiB, 300)
        t_ballast, sent_then, in_data = time.monotonic(), tally.bytes_sent, tally.in_data
        held = control.ask(f"ballast {FRACTION}")
        holding.set()
        got_452 = until(lambda: tally.critical.get("452", 0) > 0, 120)
        t_452 = time.monotonic()
        time.sleep(HOLD)  # the pressure lasts HOLD seconds after the first 452: load, not sync
        during = control.stats()
        holding.clear()
        released = control.ask("release")
        if "ELEMTA_FLOOD_DEBUG" in os.environ:
            time.sleep(30)
            print("\n".join(control.ask("debug")), flush=True)
        crit = dict(tally.critical)
        greeted = tally.greetings.get("220", 0)
        greeted_again = until(lambda: tally.greetings.get("220", 0) > greeted, 120)
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic() + 60))
        flood_s = time.monotonic() - t0
        stop.set()
        probe.join(30)
        # Recovery: mail accepted again within a bound after the flood.
        t_rec = time.monotonic()
        outcome = ""
        while time.monotonic() - t_rec < 120:
            outcome = accepted(vm.port)
            if outcome == "250":
                break
            time.sleep(1)  # a retry, as a client would; the condition is elemta's next sample
        recovered_after = time.monotonic() - t_rec
        after = control.stats()
        listing = control.ask("manifest")
        stored: dict[int, list[str]] = {}
        for line in listing:
            parts = line.split()
            if parts[0] == "M" and parts[1].isdigit():
                stored.setdefault(int(parts[1]), []).append(parts[2])
        lost = sorted(s for s in tally.acked if s not in stored)
        damaged = sorted(s for s, sha in tally.acked.items() if s in stored and stored[s] != [sha])
        oom = int(after["oom_kill"]) - int(before["oom_kill"])
        print(f"flood-test ({release}): ballast {held[0] if held else '?'} MiB after {t_ballast - t0:.0f}s "
              f"({in_data} clients in DATA, {sent_then >> 20} MiB sent by then); first 452 greeting {t_452 - t_ballast:.0f}s later; "
              f"during: current {int(during['current']) >> 20} MiB of {int(during['limit']) >> 20} MiB, "
              f"memory.events max {during['max_events']}; {released[0] if released else ''}", flush=True)
        print(f"flood-test ({release}): {clients} clients, {tally.bytes_sent >> 20} MiB sent in {flood_s:.0f}s; "
              f"replies {dict(sorted(tally.replies.items()))}; prober greetings {dict(sorted(tally.greetings.items()))}, "
              f"while the ballast held {dict(sorted(crit.items()))}; acknowledged {len(tally.acked)}, stored "
              f"{len(stored)}, intact {len(tally.acked) - len(lost) - len(damaged)}, lost {len(lost)}, damaged "
              f"{len(damaged)}; oom_kill {before['oom_kill']} -> {after['oom_kill']}, MainPID "
              f"{before.get('MainPID')} -> {after.get('MainPID')}, NRestarts {after.get('NRestarts', '?')}; "
              f"journal: critical lines {after['critical_lines']}, breaker opened {after['breaker_opened']}, "
              f"closed {after['breaker_closed']}; after the flood: {outcome} in {recovered_after:.0f}s "
              f"(active_file {int(after['active_file']) >> 20} MiB, inactive_file "
              f"{int(after['inactive_file']) >> 20} MiB, {int(after['mail_free']) >> 20} MiB free for mail); "
              f"{time.monotonic() - start:.0f}s in all", flush=True)
        if oom:
            failures.append(f"{oom} OOM kill(s)")
        if before.get("MainPID") != after.get("MainPID"):
            failures.append(f"MainPID {before.get('MainPID')} -> {after.get('MainPID')}")
        if not got_452 or "452" not in crit:
            failures.append("no 452 greeting while the ballast held memory")
        if lost or damaged:
            failures.append(f"lost {lost[:10]}, damaged {damaged[:10]}")
        if len(tally.acked) < min(streams, clients // 4):
            failures.append(f"only {len(tally.acked)} messages acknowledged: too few to prove anything")
        if tally.greetings.get("unanswered") or tally.greetings.get("closed"):
            failures.append("a connection got no greeting")
        if not greeted_again:
            failures.append("no 220 greeting within 120s of the ballast's release")
        known = ""
        if outcome != "250":
            active, limit = int(after["active_file"]), int(after["limit"])
            if "452" in outcome and active > limit // 4:
                known = (f"KNOWN DEFECT (working set counts active clean page cache): still {outcome} "
                         f"{recovered_after:.0f}s after the flood, active_file {active >> 20} MiB of a "
                         f"{limit >> 20} MiB limit")
            else:
                failures.append(f"mail still refused {recovered_after:.0f}s after the flood: {outcome}")
        verdict = "FAIL: " + "; ".join(failures) if failures else ("XFAIL: " + known if known else "PASS")
        print(f"flood-test ({release}): {verdict}", flush=True)
        return 1 if failures else 0
    finally:
        vm.kill()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("deb", type=Path)
    ap.add_argument("release", choices=["bookworm", "trixie"])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--streams", type=int, default=16, help="clients streaming their body at once")
    ap.add_argument("--deadline", type=float, default=360.0, help="seconds; the rest hang up then")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    return run(a.deb.resolve(), a.release, a.clients, a.streams, a.deadline, seed)


if __name__ == "__main__":
    sys.exit(main())
