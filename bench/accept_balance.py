"""Accept balance and throughput, workers = 2: the shared listening socket against one
SO_REUSEPORT socket per worker (ELEMTA_ACCEPT=reuseport), on workload a (10 KiB, one message
per connection, 20 sessions), alternating rounds.

    .venv/bin/python bench/accept_balance.py [ROUNDS] [MESSAGES] ['EXTRA [server] LINE']
"""

from __future__ import annotations

import re
import shutil
import signal
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import daemon as harness
from common import smtp_source, spool_dir, tree_cpu

KiB = 1024


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    extra = sys.argv[3] if len(sys.argv) > 3 else ""
    res: dict[str, list[tuple[float, float]]] = {}
    for r in range(rounds):
        for mode in ["shared", "reuseport"][:: 1 if r % 2 == 0 else -1]:
            work = spool_dir()
            d = harness.start(work, "[server]\nworkers = 2\n" + extra, env={"ELEMTA_ACCEPT": mode})
            smtp_source(d.port, 100, 20, 10 * KiB, False)  # warm-up
            cpu0 = tree_cpu(d.proc.pid)
            elapsed = smtp_source(d.port, n, 20, 10 * KiB, False)
            cpu = tree_cpu(d.proc.pid) - cpu0
            d.stop(signal.SIGTERM)
            counts = [int(c) for c in re.findall(
                r"worker \d+: (\d+) connections accepted since start", d.log)]
            share = max(counts) / sum(counts) if counts else float("nan")
            print(f"round {r + 1} {mode:9s}: {n / elapsed:7.0f} msg/s, CPU per msg "
                  f"{cpu / n * 1000:.2f} ms, accepted per worker {counts} (max share "
                  f"{share:.2f})", flush=True)
            res.setdefault(mode, []).append((n / elapsed, share))
            shutil.rmtree(work, ignore_errors=True)
    for mode, v in res.items():
        print(f"{mode}: median {statistics.median(x[0] for x in v):.0f} msg/s, median max "
              f"share {statistics.median(x[1] for x in v):.3f}")


if __name__ == "__main__":
    main()
