"""End to end: 10 KiB messages received by SMTP and delivered over LMTP into one real Dovecot,
elemta (transport lmtp) beside a throwaway Postfix using its lmtp transport (postfix.durable),
in alternating rounds.

    .venv/bin/python bench/e2e.py [--rounds 3] [--messages 2000] [--quick]

(bench/run_all.py runs it too, after its main table.) One Dovecot (tests/dovecot.py) serves
every server and round. Per round and server: smtp-source sends `messages` messages to
alice@example.test, one per connection over 20 sessions; the rate is messages per second
from smtp-source's start (first connect) to the last message's file in Dovecot's Maildir;
CPU per message is the MTA's process tree from then until its queue is empty (and, apart,
Dovecot's, which both MTAs cause alike). Needs root, Postfix, smtp-source and Dovecot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import dovecot
import postfix
from common import Server, alternating_rounds, elemta, median, smtp_source, table, tree_cpu

KiB = 1024
USER = f"alice@{dovecot.DOMAIN}"
SESSIONS = 20
# elemta with the LMTP transport: the default config otherwise (the harness adds the ports,
# maildir, [delivery] domains and recipients = "any", as postfix.py accepts any recipient).
ELEMTA_VARIANTS = ("workers=1", 'workers="auto"')
ROWS = (("rate", "end to end, 10 KiB (msg/s)", "{:.0f}"),
        ("cpu_msg_ms", "MTA CPU per msg (ms)", "{:.2f}"),
        ("dovecot_cpu_msg_ms", "Dovecot CPU per msg (ms)", "{:.2f}"))


def delivered(dc: dovecot.Dovecot) -> int:
    box = dc.dir / "mail" / USER
    return sum(len(os.listdir(box / sub)) for sub in ("new", "cur") if (box / sub).is_dir())


def wait_delivered(dc: dovecot.Dovecot, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while delivered(dc) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {delivered(dc)} of {count} messages reached Dovecot")
        time.sleep(0.005)


def measure(server: Server, dc: dovecot.Dovecot, messages: int) -> dict[str, float]:
    assert dc.proc is not None
    n0 = delivered(dc)  # warm-up: imports, first forks, the first LMTP connections
    smtp_source(server.port, 20, 2, 10 * KiB, False, to=USER)
    wait_delivered(dc, n0 + 20)
    server.settle()
    n0, cpu0, dcpu0 = delivered(dc), tree_cpu(server.pid), tree_cpu(dc.proc.pid)
    t0 = time.perf_counter()
    smtp_source(server.port, messages, SESSIONS, 10 * KiB, False, to=USER)
    wait_delivered(dc, n0 + messages)
    elapsed = time.perf_counter() - t0
    server.settle()
    cpu, dcpu = tree_cpu(server.pid) - cpu0, tree_cpu(dc.proc.pid) - dcpu0
    return {"rate": messages / elapsed, "cpu_msg_ms": cpu / messages * 1000,
            "dovecot_cpu_msg_ms": dcpu / messages * 1000}


def servers(dc: dovecot.Dovecot) -> dict[str, Callable[[], Server]]:
    out: dict[str, Callable[[], Server]] = {}
    for v in ELEMTA_VARIANTS:
        name = f"elemta {v}"
        out[name] = partial(elemta, f'[server]\n{v}\n[delivery]\ntransport = "{dc.tcp}"', name)
    out["postfix"] = partial(postfix.durable, transport=f"lmtp:inet:127.0.0.1:{dc.port}")
    return out


def available() -> str | None:
    """None when everything this workload needs is here, else what is missing."""
    if os.geteuid() != 0:
        return "needs root (Dovecot delivers as the mail user)"
    if dovecot.version() is None:
        return "Dovecot not installed (scripts/bootstrap)"
    if not postfix.installed():
        return "Postfix not installed"
    return None


def run(rounds: int, messages: int) -> None:
    missing = available()
    if missing is not None:
        print(f"end-to-end LMTP workload: skipped ({missing})")
        return
    dc = dovecot.make()
    t_start = time.monotonic()
    try:
        dc.start()
        factories = servers(dc)
        figures = alternating_rounds(
            rounds, factories, lambda server: measure(server, dc, messages),
            lambda got: f"{got['rate']:.0f} msg/s, {got['cpu_msg_ms']:.2f} ms CPU/msg",
            label="e2e round")
        dc.stop()
        dc.check_log()
    finally:
        dc.kill()
        shutil.rmtree(dc.dir, ignore_errors=True)
    names = list(factories)
    elemtas = [n for n in names if n.startswith("elemta")]
    rows = [["median of rounds", *names, *(f"{e} / postfix" for e in elemtas)]]
    for key, label, fmt in ROWS:
        med = {n: median(figures.get((n, key), [])) for n in names}
        rows.append([label, *(fmt.format(med[n]) if med[n] == med[n] else "-" for n in names),
                     *(f"{med[e] / med['postfix']:.2f}x" if med["postfix"] > 0 else "-"
                       for e in elemtas)])
    print(f"\nend to end into Dovecot over LMTP: {rounds} alternating rounds, {messages} x 10 KiB "
          f"each, one per connection, {SESSIONS} sessions; CPU summed over each process tree; "
          f"{os.cpu_count()} CPUs; {time.monotonic() - t_start:.0f} s")
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3)")
    ap.add_argument("--messages", type=int, default=None, help="messages per round (2000)")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 300 messages")
    args = ap.parse_args()
    run(args.rounds or (2 if args.quick else 3), args.messages or (300 if args.quick else 2000))


if __name__ == "__main__":
    main()
