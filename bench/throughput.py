"""elemta (durable: fsync before 250) against a plain aiosmtpd sink (discards), same run.

    .venv/bin/python bench/throughput.py [--rounds 3] [--messages 2000]

Workloads (Postfix's smtp-source as the client, 20 sessions, 10 KiB messages):
  1/conn    one message per connection
  100/conn  all of a session's messages over one connection (-d)
and one 50 MiB message (peak RSS growth of the server while it is received).
Rounds alternate between the servers; medians and the elemta/sink ratio are printed.
"""

from __future__ import annotations

import argparse

from common import (
    MiB,
    Server,
    aiosmtpd_sink,
    elemta,
    median,
    peak_rss,
    send_one_big,
    smtp_source,
    table,
)

SERVERS = {"elemta": lambda: elemta('[server]\nmax_message_size = "200MiB"'), "aiosmtpd-sink": aiosmtpd_sink}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--big-mib", type=int, default=50)
    args = ap.parse_args()

    rate: dict[tuple[str, str], list[float]] = {}
    rss: dict[str, list[float]] = {}
    for rnd in range(args.rounds):
        order = list(SERVERS) if rnd % 2 == 0 else list(reversed(SERVERS))
        for name in order:
            server: Server = SERVERS[name]()
            try:
                for label, per_conn in (("1/conn", False), ("100/conn", True)):
                    msgs = args.messages
                    elapsed = smtp_source(server.port, msgs, args.sessions, 10 * 1024, per_conn)
                    rate.setdefault((name, label), []).append(msgs / elapsed)
                with peak_rss(server.pid) as r:
                    send_one_big(server.port, args.big_mib * MiB)
                rss.setdefault(name, []).append((r[1] - r[0]) / MiB)
            finally:
                server.stop()
            print(f"round {rnd + 1}: {name} done", flush=True)

    base = "aiosmtpd-sink"
    rows = [["workload", "elemta", base, "ratio"]]
    for label in ("1/conn", "100/conn"):
        e, b = median(rate["elemta", label]), median(rate[base, label])
        rows.append([f"10 KiB {label} (msg/s)", f"{e:.0f}", f"{b:.0f}", f"{e / b:.2f}x"])
    e, b = median(rss["elemta"]), median(rss[base])
    rows.append([f"RSS growth, one {args.big_mib} MiB message (MiB)", f"{e:.1f}", f"{b:.1f}", ""])
    print(f"\n{args.rounds} alternating rounds, {args.messages} messages, {args.sessions} sessions; medians")
    print(table(rows))


if __name__ == "__main__":
    main()
