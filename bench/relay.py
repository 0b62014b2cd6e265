"""Relay throughput: SMTP in, SMTP out to a discarding sink, elemta beside Postfix.

    .venv/bin/python bench/relay.py [--rounds 3] [--quick] [--workers N|auto ...]

Both servers take mail for relay.test from smtp-source and relay it over SMTP to one
smtp-sink (Postfix's in-memory discarding server), each queueing durably first (elemta's
queue: fdatasync of the body and fsync of the record; Postfix: its queue file). A round sends
the same load to each server in alternating order and times it from the first connection
until the server's queue is empty again (every message relayed), so the figure is end-to-end
relay throughput, not just intake. The table shows medians over rounds and elemta / postfix.
The elemta column is the shipped default configuration (workers = "auto"); --workers adds
columns with [server] workers set (workers=1 by default). On a shared, loaded machine the
ratios are rough.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import postfix
from common import MiB, Server, alternating_rounds, median, popen_server, smtp_source, spool_dir, table
from daemon import start as start_elemta

RELAY_DOMAIN = "relay.test"


@dataclass
class Relay:
    server: Server
    queued: Callable[[], int]  # messages still in its queue

    def stop(self) -> None:
        self.server.stop()


def _count(root: Path, subdirs: tuple[str, ...]) -> int:
    return sum(len(files) for sub in subdirs for _, _, files in os.walk(root / sub))


def elemta_relay(sink_port: int, workers: str = "") -> Relay:
    """elemta relaying to the sink; `workers` "" keeps the shipped default."""
    work = spool_dir()
    count = workers if workers.isdigit() else f'"{workers}"'
    extra = ((f'[server]\nworkers = {count}\n' if workers else "")
             + f'[delivery]\nrelay_domains = ["{RELAY_DOMAIN}"]\n'
             f'relay_transport = "smtp:[127.0.0.1]:{sink_port}"\nsmtp_tls = "none"\n'
             f'queue_dir = "{work / "queue"}"\n')
    d = start_elemta(work, extra, builtin_workers=not workers)
    server = popen_server("elemta", d.port, d.proc, lambda: shutil.rmtree(work, ignore_errors=True))
    return Relay(server, lambda: _count(work / "queue", ("incoming", "deferred")))


def postfix_relay(sink_port: int) -> Relay:
    # Postfix logs its deliveries to a file through postlogd, as elemta logs each of its own
    # (bench/postfix.py leaves logging off for the idle-session burst, which this bench has not).
    main = (f"relay_domains = {RELAY_DOMAIN}\nrelay_transport = smtp:[127.0.0.1]:{sink_port}\n"
            "smtp_tls_security_level = none\nmaillog_file = ${data_directory}/maillog\n")
    master = ("smtp      unix - - n - - smtp\nrelay     unix - - n - - smtp\n"
              "postlog   unix-dgram n - n - 1 postlogd\n")
    server = postfix.durable(processes=200, main_extra=main, master_extra=master)
    queue = next(Path(p) for p in _postfix_queues(server.pid))
    return Relay(server, lambda: _count(queue, ("incoming", "active", "deferred", "maildrop")))


def _postfix_queues(master_pid: int) -> list[str]:
    """The queue directory of the instance whose master is `master_pid` (from its cwd)."""
    return [os.readlink(f"/proc/{master_pid}/cwd")]


def one_run(r: Relay, messages: int, sessions: int, size: int) -> float:
    """Messages per second, intake to the last message relayed."""
    t0 = time.perf_counter()
    smtp_source(r.server.port, messages, sessions, size, per_connection=False,
                to=f"bench@{RELAY_DOMAIN}")
    deadline = time.monotonic() + 600
    while r.queued() and time.monotonic() < deadline:
        time.sleep(0.01)
    if r.queued():
        raise RuntimeError(f"{r.server.name}: {r.queued()} message(s) still queued after 600 s")
    return messages / (time.perf_counter() - t0)


def run(rounds: int, quick: bool, workers: list[str]) -> None:
    """The relay table: elemta (shipped default, then each `workers` value) beside Postfix."""
    if not postfix.installed():
        print("relay throughput: skipped (postfix or smtp-sink not installed)")
        return
    loads = [("10 KiB", 10 * 1024, 300 if quick else 2000, 20),
             ("1 MiB", MiB, 20 if quick else 100, 10)]
    sink = postfix.sink()
    t_start = time.monotonic()
    try:
        factories: dict[str, Callable[[], Relay]] = {"elemta": lambda: elemta_relay(sink.port)}
        for w in workers:
            factories[f"elemta workers={w}"] = partial(elemta_relay, sink.port, w)
        factories["postfix"] = lambda: postfix_relay(sink.port)
        results = alternating_rounds(
            rounds, factories,
            lambda r: {label: one_run(r, messages, sessions, size)
                       for label, size, messages, sessions in loads},
            lambda got: ", ".join(f"{label} {rate:.1f} msg/s" for label, rate in got.items()),
            label="relay round")
    finally:
        sink.stop()
    elemtas = [n for n in factories if n != "postfix"]
    rows = [["relay throughput (msg/s, median)", *factories, *(f"{e} / postfix" for e in elemtas)]]
    for label, *_ in loads:
        rate = {n: median(results[(n, label)]) for n in factories if (n, label) in results}
        p = rate.get("postfix", 0.0)
        rows.append([f"{label} messages", *(f"{rate.get(n, 0.0):.1f}" for n in factories),
                     *(f"{rate.get(e, 0.0) / p:.2f}x" if p else "-" for e in elemtas)])
    print(f"\nrelay (SMTP in, durable queue, SMTP out to one smtp-sink): {rounds} alternating "
          f"rounds, {loads[0][2]} x 10 KiB over {loads[0][3]} sessions and {loads[1][2]} x 1 MiB "
          f"over {loads[1][3]}, each timed until the queue is empty; "
          f"{time.monotonic() - t_start:.0f} s")
    print(table(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer messages (rough figures)")
    ap.add_argument("--workers", nargs="*", default=["1"],
                    help="elemta columns besides the shipped default: [server] workers N or auto "
                         "(default: 1)")
    args = ap.parse_args()
    run(args.rounds, args.quick, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
