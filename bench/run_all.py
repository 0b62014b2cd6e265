"""`make bench`: elemta beside aiosmtpd, Postfix and smtp-sink, in one run, one table.

    .venv/bin/python bench/run_all.py [--rounds 3] [--quick] [--elemta-variant SNIPPET ...]

Servers (columns):
  elemta[ VARIANT]  durable: fsync of the Maildir file before 250; one column per variant
  aiosmtpd-sink     aiosmtpd's own server with its Sink handler (parses, discards): the baseline
  smtp-sink         Postfix's smtp-sink (in memory, discards): what a loopback client can push
  postfix           a throwaway Postfix on loopback that queues durably (fsync) and discards
Rows: see throughput.py. Each round runs every server once, in alternating order; the
table shows medians over rounds and, per elemta column, elemta / aiosmtpd-sink and
elemta / postfix (for rates higher is better for elemta, for CPU and memory lower is).

An elemta variant is a config snippet on top of the shipped defaults: `key=value` lines
(';' separates lines) under [server], or with their own [section] headers, e.g.
--elemta-variant 'workers=1'. A variant whose keys the installed elemta's `check-config`
refuses is skipped and says so. Without --elemta-variant: "elemta default" (the shipped
default config: [server] workers = "auto", pin_workers = true; the column prints what auto
decided) and "elemta workers=1" (one process).

Before the main table, bench/datapath.py prints its own two tables (--no-datapath skips
them): CPU per MiB of DATA, elemta's chunked decoder beside aiosmtpd's line loop, in-process
and between real servers.

After them, bench/e2e.py's end-to-end table (--no-e2e skips it): 10 KiB messages received by
SMTP and delivered over LMTP into one real Dovecot, elemta beside Postfix's lmtp transport.
Then bench/relay.py's relay table (--no-relay skips it): 10 KiB and 1 MiB messages relayed
through each server's durable queue to one smtp-sink, elemta (default, workers=1) beside Postfix.

Governor rows come from bench/governor.py when it exists: it should define
    bench_rows(rounds: int, quick: bool) -> list[tuple[str, str]]
returning (row label, printed figure) pairs; they are added under the first elemta column.
Until it does, its admission_cost(calls), reaction(runs) and overhead(rounds, messages,
sessions) are called (with its own defaults) and print their own tables before the main one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import datapath
import e2e
import postfix
import relay
from common import Server, aiosmtpd_sink, alternating_rounds, elemta, median, table
from throughput import Sizes, measure

# Production-like elemta for the bench: default config except a size limit that lets the
# 50 MiB message in (the default limit is exactly 50 MiB, and the body is a little over).
ELEMTA_BASE = '[server]\nmax_message_size = "200MiB"'
BASELINE, POSTFIX = "aiosmtpd-sink", "postfix"

ROWS: tuple[tuple[str, str, str], ...] = (
    # key, label, format
    ("small_1_rate", "a: 10 KiB 1/conn, 20 sessions (msg/s)", "{:.0f}"),
    ("small_100_rate", "b: 10 KiB 100/conn, 20 sessions (msg/s)", "{:.0f}"),
    ("mib_rate", "c: 1 MiB, 4 sessions (msg/s)", "{:.1f}"),
    ("small_1_cpu_msg_ms", "a: CPU per msg (ms)", "{:.2f}"),
    ("small_100_cpu_msg_ms", "b: CPU per msg (ms)", "{:.2f}"),
    ("mib_cpu_mib_ms", "c: CPU per MiB (ms)", "{:.1f}"),
    ("big_rss_mib", "RSS growth, one {big} MiB message (MiB)", "{:.1f}"),
    ("idle_rss_kib", "RSS per idle session, {idle} after EHLO (KiB)", "{:.1f}"),
    ("idle_pss_kib", "PSS per idle session, {idle} after EHLO (KiB)", "{:.1f}"),
)


def elemta_snippet(variant: str) -> str:
    """'workers=1;event_loop="auto"' -> TOML under [server] (or the variant's own sections)."""
    lines = [ln.strip() for ln in variant.split(";") if ln.strip()]
    if lines and not lines[0].startswith("["):
        lines.insert(0, "[server]")
    return "\n".join(lines)


def check_config(snippet: str) -> str | None:
    """None when the installed elemta accepts ELEMTA_BASE + snippet, else its complaint."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from daemon import write_config

    with tempfile.TemporaryDirectory(prefix="elemta-bench-check-") as tmp:
        path = write_config(Path(tmp), 2525, 8080, ELEMTA_BASE + "\n" + snippet,
                            builtin_workers=True)
        out = subprocess.run([sys.executable, "-m", "elemta.cli", "check-config", "--config", str(path)],
                             capture_output=True, text=True, timeout=60)
    if out.returncode == 0:
        return None
    return (out.stderr.strip() or f"exit {out.returncode}").splitlines()[0]


def elemta_variants(requested: list[str]) -> dict[str, Callable[[], Server]]:
    variants = requested or ["", "workers=1"]
    out: dict[str, Callable[[], Server]] = {}
    for v in variants:
        snippet = elemta_snippet(v)
        name = f"elemta {v}".strip() if v else "elemta default"
        problem = check_config(snippet)
        if problem is not None:
            print(f"{name}: refused by check-config ({problem}), skipped")
            continue
        cfg = ELEMTA_BASE + "\n" + snippet
        out[name] = partial(elemta, cfg, name)
    return out


def servers(args: argparse.Namespace) -> dict[str, Callable[[], Server]]:
    out = elemta_variants(args.elemta_variant)
    out[BASELINE] = aiosmtpd_sink
    if postfix.installed():
        out["smtp-sink"] = postfix.sink
        out[POSTFIX] = postfix.durable
    else:
        print("postfix: not installed, skipped")
    return out


def governor_rows(rounds: int, quick: bool) -> list[tuple[str, str]]:
    try:
        governor = importlib.import_module("governor")
    except ModuleNotFoundError as exc:
        if exc.name != "governor":
            raise
        print("governor: not available yet")
        return []
    bench_rows = getattr(governor, "bench_rows", None)
    if callable(bench_rows):
        rows: list[tuple[str, str]] = bench_rows(rounds, quick)
        return rows
    # Before it offers bench_rows: its own measurements, printing their own tables here.
    calls: tuple[tuple[str, Callable[[Callable[..., None]], None]], ...] = (
        ("admission_cost", lambda f: f(2000 if quick else 20000)),
        ("reaction", lambda f: f(3 if quick else 5)),
        ("overhead", lambda f: f(2 if quick else 4, 500 if quick else 1000, 10)),
    )
    ran = False
    for name, call in calls:
        fn = getattr(governor, name, None)
        if callable(fn):
            ran = True
            try:
                call(fn)
            except Exception as exc:
                print(f"governor: {name} failed: {exc}"[:600])
    if not ran:
        print("governor: bench/governor.py has no bench_rows(rounds, quick), skipped")
    return []


def ratio(e: float, other: float) -> str:
    if not other > 0 or e != e:  # no baseline figure, or a zero one (nothing to divide by)
        return "-"
    r = e / other
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, --quick 2)")
    ap.add_argument("--quick", action="store_true", help="smaller counts: a rough table in about 3 minutes")
    ap.add_argument("--messages", type=int, help="messages per 10 KiB workload (default 5000)")
    ap.add_argument("--mib-messages", type=int, help="messages in the 1 MiB workload (default 300)")
    ap.add_argument("--idle", type=int, help="idle sessions held open (default 1000)")
    ap.add_argument("--big-mib", type=int, default=50, help="size of the one big message (MiB)")
    ap.add_argument("--elemta-variant", action="append", default=[], metavar="SNIPPET",
                    help="elemta config snippet for one more elemta column ('' = defaults); repeatable")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only these servers (column names); repeatable")
    ap.add_argument("--no-governor", action="store_true", help="skip the governor rows")
    ap.add_argument("--no-datapath", action="store_true", help="skip bench/datapath.py's tables")
    ap.add_argument("--no-e2e", action="store_true", help="skip bench/e2e.py's LMTP table")
    ap.add_argument("--no-relay", action="store_true", help="skip bench/relay.py's table")
    ap.add_argument("--e2e-messages", type=int, help="messages per end-to-end round (default "
                    "2000, --quick 300)")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    sizes = Sizes(big_mib=args.big_mib)
    if args.quick:
        sizes = replace(sizes, messages=500, big_messages=40, idle=300)
    sizes = replace(sizes, messages=args.messages or sizes.messages,
                    big_messages=args.mib_messages or sizes.big_messages, idle=args.idle or sizes.idle)

    factories = servers(args)
    if args.only:
        factories = {k: v for k, v in factories.items() if k in args.only}
    t_start = time.monotonic()
    figures = alternating_rounds(
        rounds, factories, lambda server: measure(server, sizes),
        lambda got: (f"{got['small_1_rate']:.0f} / {got['small_100_rate']:.0f} / "
                     f"{got['mib_rate']:.1f} msg/s, big +{got['big_rss_mib']:.1f} MiB, "
                     f"idle {got['idle_pss_kib']:.1f} KiB PSS"))

    gov = [] if args.no_governor else governor_rows(rounds, args.quick)
    if not args.no_datapath:
        datapath.run(args.quick)

    names = list(factories)
    elemtas = [n for n in names if n.startswith("elemta")]
    header = ["median of rounds", *names]
    for e in elemtas:
        if BASELINE in names:
            header.append(f"{e} / {BASELINE}")
        if POSTFIX in names:
            header.append(f"{e} / {POSTFIX}")
    rows = [header]
    for key, label, fmt in ROWS:
        med = {n: median(figures.get((n, key), [])) for n in names}
        row = [label.format(big=sizes.big_mib, idle=sizes.idle),
               *(fmt.format(med[n]) if med[n] == med[n] else "-" for n in names)]
        for e in elemtas:
            for other in (BASELINE, POSTFIX):
                if other in names:
                    row.append(ratio(med[e], med[other]))
        rows.append(row)
    for label, figure in gov:
        rows.append([label, *(figure if n in elemtas[:1] else "" for n in names),
                     *([""] * (len(header) - 1 - len(names)))])
    print(f"\n{rounds} alternating rounds; {sizes.messages} x 10 KiB per workload, "
          f"{sizes.big_messages} x 1 MiB, {sizes.idle} idle sessions; CPU and memory summed over each "
          f"server's process tree; {os.cpu_count()} CPUs; {time.monotonic() - t_start:.0f} s")
    print(table(rows))
    if not args.no_e2e:
        print()
        e2e.run(rounds, args.e2e_messages or (300 if args.quick else 2000))
    if not args.no_relay:
        relay.run(rounds, args.quick, ["1"])


if __name__ == "__main__":
    main()
