#!/usr/bin/env python3
"""`make power-test`: power cuts prove that elemta's 250 means the message is on disk.

Boots the release's VM (tests/system/qemu.sh, the system test's boot) with the .deb installed and
started; a client here on the host sends messages with distinct bodies through a loopback port
forwarded to the guest's port 25 and records every 250 with the hash of the body it sent; at a
random moment qemu is killed with SIGKILL (a power cut: the guest's page cache and whatever qemu
had not yet written out are gone), and the VM boots again from the same disk. That boot lists the
Maildir (tests/system/guest-serve.sh), and the listing is checked here: every message ever
acknowledged is present and intact (its body's hash), and no file in new/ is torn or unknown.
Messages present without a 250 (stored, but the reply was lost in the cut) are fine and counted.
The same boot then serves the next cut, so N cuts take N + 1 boots.

Disk: a raw copy of the base image (vmhost.prepare says why not a qcow2 overlay), cache=none
(O_DIRECT on the host file). The guest sees a volatile write cache ("write back") and so sends
flushes; qemu honours each one (fdatasync of the host file). cache=unsafe would drop them, and a
lost message would prove nothing about elemta. What a SIGKILL of qemu loses: the guest's page
cache. What it does not lose: data qemu already wrote to the host file; a real disk may lose its
whole unflushed cache, so this is the weaker cut of the two for data written but never flushed,
and the same for the commit order under test (fdatasync before rename, fsync of new/ before 250).

Usage: tests/system/power.py DEB RELEASE [--cuts N] [--seed S] [--clients K]
Exit 0 when nothing acknowledged was lost or torn; 1 otherwise; 77 when it cannot run here.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import secrets
import shutil
import smtplib
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmhost import CannotRun, Report, Vm, prepare

CUT_AFTER = (2.0, 20.0)  # seconds of mail flow before the cut, uniformly at random
# Sizes of the message bodies: mostly small, some large enough to be mid-write at the cut.
SIZES = [(0.70, 200, 16 << 10), (0.25, 64 << 10, 512 << 10), (0.05, 1 << 20, 4 << 20)]


@dataclass
class Sent:
    seq: int
    cut: int
    sha: str  # sha256 of the body as stored (LF line ends), first 16 hex digits
    acked: bool = False
    reply: str = ""  # the 250 after DATA ("... queued as QUEUEID": the file name has it)
    acked_at: float = 0.0  # time.monotonic() when the 250 was read


@dataclass
class Ledger:
    """Every message the client started to send, by sequence number."""

    messages: dict[int, Sent] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_seq: int = 1

    def new(self, cut: int, sha: str) -> Sent:
        with self.lock:
            sent = Sent(self.next_seq, cut, sha)
            self.messages[sent.seq] = sent
            self.next_seq += 1
            return sent


def body_for(rng: random.Random) -> str:
    low, high = rng.choices([(lo, hi) for _, lo, hi in SIZES], [w for w, _, _ in SIZES])[0]
    size = rng.randint(low, high)
    # Hex lines: no leading dot (no dot-stuffing), nothing a transfer could rewrite.
    line_count = max(1, size // 77)
    lines = [f"power {secrets.token_hex(8)}"]  # distinct bodies, whatever the seed
    lines += [rng.randbytes(38).hex() for _ in range(line_count)]
    return "\n".join(lines) + "\n"


def message(release: str, seq: int, body: str) -> str:
    head = (f"From: power@example.test\nTo: postmaster@localhost\n"
            f"Subject: power-cut {release} {seq}\nX-Power-Seq: {seq}\n"
            f"Message-ID: <power-{seq}-{secrets.token_hex(4)}@example.test>\n\n")
    return (head + body).replace("\n", "\r\n")


def send(smtp: smtplib.SMTP, text: str) -> str:
    """One transaction, as smtplib's sendmail but keeping the final reply (its queue id)."""
    smtp.ehlo_or_helo_if_needed()
    for code, resp in (smtp.mail("power@example.test"), smtp.rcpt("postmaster@localhost")):
        if code not in (250, 251):
            smtp.rset()
            raise smtplib.SMTPResponseException(code, resp)
    code, resp = smtp.data(text.encode("ascii"))  # 354 missing: SMTPDataError
    if code != 250:
        smtp.rset()
        raise smtplib.SMTPResponseException(code, resp)
    return resp.decode("ascii", "replace")


def client(port: int, release: str, cut: int, ledger: Ledger, stop: threading.Event,
           cut_done: threading.Event, seed: int, errors: list[str]) -> None:
    """Send until the cut. A 250 read after the kill still counts: the guest sent it before."""
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=300) as smtp:
                while not stop.is_set():
                    body = body_for(rng)
                    sent = ledger.new(cut, hashlib.sha256(body.encode()).hexdigest()[:16])
                    try:
                        reply = send(smtp, message(release, sent.seq, body))
                    except smtplib.SMTPResponseException as exc:  # e.g. 452: not acknowledged
                        if not cut_done.is_set():
                            errors.append(f"seq {sent.seq}: {exc.smtp_code} {exc.smtp_error!r}")
                        continue
                    sent.reply, sent.acked_at, sent.acked = reply, time.monotonic(), True
        except (OSError, smtplib.SMTPException) as exc:
            if cut_done.is_set():
                return
            errors.append(f"connection: {exc}")
            time.sleep(0.5)  # the guest is up (it said READY): a refused connection is a failure


@dataclass
class CutResult:
    cut: int
    after: float  # seconds of mail flow before the kill
    sent: int
    acked: int
    present: int  # of this cut's messages, files in new/ after the reboot
    intact: int  # of this cut's acknowledged messages, present with the body that was sent
    unacked_present: int
    lost: list[int]  # acknowledged (in any cut so far) and missing or changed
    torn: list[str]  # files in new/ that are no message the client sent whole
    tmp_left: int
    cleaned: int
    seconds: float  # wall time of this cut: flow, kill, boot to READY


def check(cut: int, ledger: Ledger, listing: Report) -> tuple[int, int, int, list[int], list[str]]:
    found: dict[int, list[str]] = {}
    torn: list[str] = []
    for seq, sha, size in listing.files:
        if not seq.isdigit() or int(seq) not in ledger.messages:
            torn.append(f"seq={seq} size={size}")
            continue
        found.setdefault(int(seq), []).append(sha)
    for n, shas in found.items():
        want = ledger.messages[n].sha
        if any(s != want for s in shas) or len(shas) > 1:
            torn.append(f"seq={n} sha={','.join(shas)} want {want}")
    intact_seqs = {seq for seq, shas in found.items() if shas == [ledger.messages[seq].sha]}
    mine = [m for m in ledger.messages.values() if m.cut == cut]
    present = sum(1 for m in mine if m.seq in found)
    intact = sum(1 for m in mine if m.acked and m.seq in intact_seqs)
    unacked_present = sum(1 for m in mine if not m.acked and m.seq in found)
    lost = sorted(m.seq for m in ledger.messages.values() if m.acked and m.seq not in intact_seqs)
    return present, intact, unacked_present, lost, torn


def describe(ledger: Ledger, seqs: list[int], killed_at: dict[int, float], listing: Report) -> str:
    """The lost messages with their 250 (its queue id names the file), its time before the cut
    and, if elemta found it in tmp/ at start, that file: its move into new/ did not last."""
    out = []
    for seq in seqs:
        m = ledger.messages[seq]
        before = killed_at.get(m.cut, m.acked_at) - m.acked_at
        qid = m.reply.rsplit(" ", 1)[-1]
        in_tmp = [t for t in listing.tmp_at_start if f"_{qid}." in t]
        out.append(f"seq {seq} (cut {m.cut}, {m.reply!r} {before:.2f}s before the cut; "
                   f"in tmp/ at start: {in_tmp or 'no'})")
    return "[" + "; ".join(out) + "]"


def run(deb: Path, release: str, cuts: int, seed: int, clients: int) -> int:
    try:
        image, work = prepare(deb, release, "power")
    except CannotRun as exc:
        print(f"power-test: SKIP: {exc}")
        return 77
    rng = random.Random(seed)
    keep = os.environ.get("ELEMTA_VM_KEEP") == "1"
    start = time.monotonic()
    vm: Vm | None = None
    try:
        print(f"power-test ({release}): {cuts} cuts, seed {seed}, {clients} clients, disk cache=none, "
              f"work {work}", flush=True)
        ledger = Ledger()
        results: list[CutResult] = []
        errors: list[str] = []
        killed_at: dict[int, float] = {}
        t_boot = time.monotonic()
        vm = Vm(image, work, 0)
        for cut in range(1, cuts + 1):
            try:
                listing = vm.wait_ready()
            except RuntimeError as exc:
                print(f"power-test ({release}): FAIL: boot {cut - 1}: {exc}; last console lines:\n{vm.console_tail()}")
                return 1
            if cut == 1:
                print(f"power-test ({release}): {listing.boot}; installed in {listing.installed}s; "
                      f"ready after {time.monotonic() - t_boot:.0f}s", flush=True)
            t_cut = time.monotonic()
            stop, cut_done = threading.Event(), threading.Event()
            threads = [threading.Thread(target=client, args=(vm.port, release, cut, ledger, stop, cut_done,
                                                             rng.randrange(1 << 30), errors))
                       for _ in range(clients)]
            for t in threads:
                t.start()
            after = rng.uniform(*CUT_AFTER)
            time.sleep(after)  # the random moment of the cut, not a synchronisation
            cut_done.set()  # first: the clients' errors from here on are the cut's
            vm.kill()
            killed_at[cut] = time.monotonic()
            stop.set()
            for t in threads:
                t.join(timeout=60)
            vm = Vm(image, work, cut)
            try:
                listing = vm.wait_ready()
            except RuntimeError as exc:
                print(f"power-test ({release}): FAIL: boot after cut {cut}: {exc}; last console lines:\n{vm.console_tail()}")
                return 1
            present, intact, unacked_present, lost, torn = check(cut, ledger, listing)
            mine = [m for m in ledger.messages.values() if m.cut == cut]
            r = CutResult(cut, after, len(mine), sum(m.acked for m in mine), present, intact,
                          unacked_present, lost, torn, len(listing.tmp), listing.cleaned,
                          time.monotonic() - t_cut)
            results.append(r)
            # A cut with nothing acknowledged proves nothing: the client or the guest is broken.
            verdict = "ok" if not (lost or torn) and r.acked else "FAIL"
            print(f"power-test ({release}) cut {cut}: killed after {after:4.1f}s: sent {r.sent}, "
                  f"acknowledged {r.acked}, present {r.present}, intact {r.intact}/{r.acked}, "
                  f"present without 250 {r.unacked_present}, lost {len(lost)}, torn in new/ {len(torn)}, "
                  f"tmp/ files removed at start-up {r.cleaned}, kept {r.tmp_left}; {r.seconds:.0f}s: {verdict}"
                  + (f" lost {describe(ledger, lost[:10], killed_at, listing)} torn {torn[:5]}" if lost or torn else ""),
                  flush=True)
        acked = sum(m.acked for m in ledger.messages.values())
        failed = [r for r in results if r.lost or r.torn or not r.acked]
        total_files = len(listing.files)
        print(f"power-test ({release}): {len(results)} cuts, {len(ledger.messages)} sent, {acked} acknowledged, "
              f"{total_files} files in new/ at the end, {sum(r.unacked_present for r in results)} stored without "
              f"250; lost {len(results[-1].lost) if results else 0}, failed cuts {len(failed)}; "
              f"{time.monotonic() - start:.0f}s" + ("" if not errors else f"; client errors before cuts: {errors[:3]}"))
        return 1 if failed else 0
    finally:
        if vm is not None:
            vm.kill()
        if keep:
            print(f"power-test ({release}): kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("deb", type=Path)
    ap.add_argument("release", choices=["bookworm", "trixie"])
    ap.add_argument("--cuts", type=int, default=5)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--clients", type=int, default=4)
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    return run(a.deb.resolve(), a.release, a.cuts, seed, a.clients)


if __name__ == "__main__":
    sys.exit(main())
