"""Two new files made durable together, as the queue's intake does for a message's body and
record: fdatasync side by side on two threads (the fallback) against writeback started on both
with sync_file_range, then both fdatasyncs on one thread (store/writeback.py), in one run.

    .venv/bin/python bench/syncpair.py [--rounds 3] [--writers 20] [--seconds 4]

Each round runs both ways for the same time on one fresh ext4 (bench/freshfs.py), in
alternating order; `writers` threads each write a 10 KiB body and a 300-byte record and sync
them, over and over. Prints pairs per second, CPU per pair (this process, the kernel's work in
its syscalls included) and the median time to make one pair durable; medians over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import freshfs
from common import table
from elemta.store import writeback

BODY, RECORD = os.urandom(10 * 1024), os.urandom(300)


def side_by_side(side: ThreadPoolExecutor) -> Callable[[int, int], None]:
    def sync(body: int, record: int) -> None:
        job = side.submit(os.fdatasync, record)
        os.fdatasync(body)
        job.result()
    return sync


def started_together(body: int, record: int) -> None:
    if not (writeback.start(body) and writeback.start(record)):
        raise RuntimeError("sync_file_range refused here: nothing to compare")
    os.fdatasync(body)
    os.fdatasync(record)


def run(where: Path, sync: Callable[[int, int], None], writers: int,
        seconds: float) -> tuple[float, float, float]:
    """(pairs/s, CPU us per pair, median ms per pair) for `writers` threads for `seconds`."""
    where.mkdir()
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def writer(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            i += 1
            t0 = time.monotonic()
            flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL
            body = os.open(where / f"{n}.{i}.body", flags, 0o600)
            record = os.open(where / f"{n}.{i}.meta", flags, 0o600)
            try:
                os.write(body, BODY)
                os.write(record, RECORD)
                sync(body, record)
            finally:
                os.close(body)
                os.close(record)
            with lock:
                latencies.append(time.monotonic() - t0)

    cpu0 = time.process_time()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = time.process_time() - cpu0
    n = len(latencies)
    return n / seconds, cpu / n * 1e6, statistics.median(latencies) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writers", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    side = ThreadPoolExecutor(args.writers)
    ways = {"side by side (two threads)": side_by_side(side),
            "writeback started (one thread)": started_together}
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
    for r in range(args.rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        with freshfs.fresh_dir() as where:
            for k, name in enumerate(order):
                got = run(where / f"r{r}.{k}", ways[name], args.writers, args.seconds)
                figures[name].append(got)
                print(f"syncpair round {r + 1}/{args.rounds} {name}: {got[0]:.0f} pairs/s, "
                      f"{got[1]:.0f} us CPU a pair, {got[2]:.2f} ms a pair", flush=True)
    side.shutdown()

    def med(name: str, i: int) -> float:
        return statistics.median(f[i] for f in figures[name])

    base, new = list(ways)
    rows = [["median of rounds", base, new, "ratio"]]
    for i, (label, fmt) in enumerate((("pairs per second", "{:.0f}"),
                                      ("CPU per pair (us)", "{:.0f}"),
                                      ("time per pair, median (ms)", "{:.2f}"))):
        rows.append([label, fmt.format(med(base, i)), fmt.format(med(new, i)),
                     f"{med(new, i) / med(base, i):.2f}x"])
    print(f"\nbody (10 KiB) and record (300 B) made durable together, {args.writers} writers, "
          f"{args.seconds:g} s per way and round, {args.rounds} alternating rounds on a fresh "
          "ext4")
    print(table(rows))


if __name__ == "__main__":
    main()
