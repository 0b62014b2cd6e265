"""The dashboard's series, plotted from a live scrape (Grafana itself is in neither Debian nor
PyPI nor npm as a server, so it cannot be rendered here).

    sudo .venv/bin/pip install matplotlib    # test venv only, not a dependency of elemta
    sudo .venv/bin/python bench/dashboard_plots.py [--limit 64MiB] [--out PATH]

Starts a daemon in a real memory cgroup, drives it with `elemta loadtest` in rising steps while
scraping /metrics every 0.5 s, and draws the panels of packaging/grafana/elemta.json from the
same metrics (rates and the 452/552 shares over 2 s windows instead of Prometheus' 5 m).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import contextlib

from daemon import running
from elemta.units import parse_size
from httpclient import get, metric_values
from realcgroup import join, memory_cgroup

Series = dict[str, list[tuple[float, float]]]


def scrape(d: object, stop: threading.Event, out: list[tuple[float, dict]]) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(OSError):
            out.append((time.monotonic() - t0, metric_values(get(d, "/metrics").body.decode())))
        stop.wait(0.5)


def value(sample: dict, name: str, **labels: str) -> float | None:
    total, found = 0.0, False
    for (n, lab), v in sample.items():
        if n == name and all(dict(lab).get(k) == val for k, val in labels.items()):
            total, found = total + v, True
    return total if found else None


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", default="64MiB")
    ap.add_argument("--steps", default="100,300,500,700,900")
    ap.add_argument("--out", default="packaging/grafana/elemta-dashboard.png")
    args = ap.parse_args()
    samples: list[tuple[float, dict]] = []
    stop = threading.Event()
    with TemporaryDirectory() as tmp, memory_cgroup(parse_size(args.limit)) as cg, \
            running(Path(tmp), preexec_fn=join(cg)) as d:
        t = threading.Thread(target=scrape, args=(d, stop, samples))
        t.start()
        time.sleep(2)
        for n in (int(s) for s in args.steps.split(",")):
            subprocess.run([sys.executable, "-m", "elemta.cli", "loadtest", f"127.0.0.1:{d.port}",
                            "-n", str(n), "-m", "2", "--duration", "4s", "--size",
                            "2KiB:60,10KiB:30,100KiB:10", "--json"],
                           capture_output=True, timeout=300)
            time.sleep(1)
        time.sleep(3)
        stop.set()
        t.join()

    ts = [s[0] for s in samples]

    def line(ax: object, name: str, label: str, dashed: bool = False, scale: float = 1.0,
             **labels: str) -> None:
        ys = [value(s, name, **labels) for _, s in samples]
        ax.plot(ts, [y * scale if y is not None else float("nan") for y in ys],  # type: ignore[attr-defined]
                "--" if dashed else "-", label=label, linewidth=1)

    def rate(name: str, window: float = 2.0, **labels: str) -> list[float]:
        out = []
        for i, (t, s) in enumerate(samples):
            j = i
            while j > 0 and t - samples[j - 1][0] <= window:
                j -= 1
            a, b = value(samples[j][1], name, **labels), value(s, name, **labels)
            dt = t - samples[j][0]
            out.append((b - a) / dt if a is not None and b is not None and dt > 0 else 0.0)
        return out

    fig, axes = plt.subplots(4, 3, figsize=(18, 16))
    ax = axes.flat
    MiB = 1 / 1048576
    p = next(ax)
    p.set_title("Memory utilization and thresholds (ratio)")
    for term in ("process", "cgroup", "host"):
        line(p, "elemta_memory_term_ratio", term, term=term)
    for th in ("warning", "gc", "critical"):
        line(p, "elemta_memory_threshold_ratio", f"{th} threshold", True, threshold=th)
    p = next(ax)
    p.set_title("Effective limit and elemta's usage (MiB)")
    line(p, "elemta_memory_limit_bytes", "limit", True, MiB)
    line(p, "elemta_memory_usage_bytes", "elemta's own memory", False, MiB)
    line(p, "elemta_session_memory_bytes", "session buffers", False, MiB)
    p = next(ax)
    p.set_title("cgroup working set vs limit (MiB)")
    line(p, "elemta_cgroup_memory_working_set_bytes", "working set", False, MiB)
    line(p, "elemta_cgroup_memory_current_bytes", "current", False, MiB)
    line(p, "elemta_cgroup_memory_max_bytes", "limit", True, MiB)
    p = next(ax)
    p.set_title("Memory pressure, PSI avg10 (%)")
    line(p, "elemta_memory_pressure_some_avg10", "some")
    line(p, "elemta_memory_pressure_full_avg10", "full")
    p = next(ax)
    p.set_title("Forced GC runs (left) and cgroup events (right, cumulative)")
    line(p, "elemta_gc_runs_total", "forced GC runs")
    right = p.twinx()
    right.plot([], [])  # next colour, so the two axes' lines differ
    line(right, "elemta_cgroup_memory_events_total", "cgroup failcnt/max", event="failcnt")
    line(right, "elemta_cgroup_memory_events_total", "cgroup oom_kill", event="oom_kill")
    right.legend(fontsize=7, loc="lower right")
    p = next(ax)
    p.set_title("Sessions vs max_connections")
    line(p, "elemta_sessions_active", "sessions")
    line(p, "elemta_sessions_max", "max_connections", True)
    p = next(ax)
    p.set_title("Tasks vs max_goroutines")
    line(p, "elemta_goroutines_current", "asyncio tasks + threads")
    line(p, "elemta_goroutines_max", "max_goroutines", True)
    p = next(ax)
    p.set_title("Event-loop heartbeat age (s)")
    line(p, "elemta_event_loop_heartbeat_age_seconds", "heartbeat age")
    line(p, "elemta_event_loop_stall_after_seconds", "stalled above", True)
    p = next(ax)
    p.set_title("Replies by class (per second)")
    for cls in ("2xx", "3xx", "4xx", "5xx"):
        p.plot(ts, rate("elemta_smtp_replies_total", **{"class": cls}), label=cls, linewidth=1)
    p = next(ax)
    p.set_title("452 and 552 share of replies")
    total = rate("elemta_smtp_replies_total")
    for code in ("452", "552"):
        part = rate("elemta_smtp_replies_total", code=code)
        p.plot(ts, [a / b if b else 0.0 for a, b in zip(part, total, strict=True)], label=code,
               linewidth=1)
    p = next(ax)
    p.set_title("Messages (per s) and MiB accepted (per s)")
    p.plot(ts, rate("elemta_messages_accepted_total"), label="messages/s", linewidth=1)
    p.plot(ts, [v * MiB for v in rate("elemta_message_size_bytes_sum")], label="MiB/s",
           linewidth=1)
    p.plot(ts, rate("elemta_connections_rejected_total", reason="memory"),
           label="refused connections/s (memory)", linewidth=1)
    p = next(ax)
    p.set_title("Memory state (1 = current)")
    for st in ("normal", "warning", "critical"):
        line(p, "elemta_memory_state", st, state=st)
    line(p, "elemta_circuit_breaker_open", "breaker open", True)
    for a in axes.flat:
        a.legend(fontsize=7, loc="upper left")
        a.set_xlabel("seconds", fontsize=8)
        a.grid(alpha=0.3)
    fig.suptitle(f"elemta dashboard series from a live scrape: a daemon in a {args.limit} "
                 f"memory cgroup under elemta loadtest steps {args.steps} sessions", fontsize=12)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"{args.out}: {len(samples)} scrapes over {ts[-1]:.0f}s")


if __name__ == "__main__":
    main()
