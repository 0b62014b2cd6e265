"""/health, /metrics and /api/stats of a real daemon whose memory governor is running."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from daemon import Daemon, running
from httpclient import Sample, get, metric_values

GUIDE_NAMES = ("elemta_memory_usage_bytes", "elemta_memory_utilization_percent",
               "elemta_gc_runs_total", "elemta_goroutines_current")


def same_sample(d: Daemon) -> tuple[dict[str, object], dict[Sample, float]]:
    """/api/stats and /metrics read from one governor sample (retried until they are)."""
    for _ in range(50):
        before = get(d, "/api/stats").json()
        metrics = metric_values(get(d, "/metrics").body.decode())
        after = get(d, "/api/stats").json()
        if before["memory"]["sampled_at"] == after["memory"]["sampled_at"]:
            return after, metrics
        time.sleep(0.05)
    raise AssertionError("the governor resampled between every pair of requests")


def test_metrics_match_api_stats_after_smtp_traffic(tmp_path: Path) -> None:
    with running(tmp_path, "[memory]\nmonitoring_interval = \"2s\"\n") as d:
        for i in range(3):
            d.send(["alice@example.test", "bob@example.test"], f"Subject: {i}\r\n\r\nhi\r\n")
        stats, m = same_sample(d)
        for name in GUIDE_NAMES:
            assert (name, ()) in m, name
        mem = stats["memory"]
        assert isinstance(mem, dict)
        assert m[("elemta_memory_usage_bytes", ())] == mem["usage_bytes"]
        assert m[("elemta_memory_utilization_percent", ())] == mem["utilization_percent"]
        assert m[("elemta_memory_limit_bytes", (("source", mem["limit_source"]),))] == mem["limit_bytes"]
        assert m[("elemta_memory_state", (("state", mem["state"]),))] == 1
        assert m[("elemta_gc_runs_total", ())] == mem["gc"]["runs"]
        tasks, sessions = stats["tasks"], stats["sessions"]
        assert isinstance(tasks, dict) and isinstance(sessions, dict)
        assert m[("elemta_goroutines_current", ())] == tasks["current"]
        assert m[("elemta_goroutines_max", ())] == tasks["max"]
        assert m[("elemta_sessions_active", ())] == sessions["current"]
        assert m[("elemta_circuit_breaker_open", ())] == (stats["breaker"] != "closed")
        cg = mem["cgroup"]
        if cg is not None:
            assert m[("elemta_cgroup_memory_current_bytes", ())] == cg["current_bytes"]
            assert m[("elemta_cgroup_memory_working_set_bytes", ())] == cg["working_set_bytes"]
            for event, n in cg["events"].items():
                if event not in ("under_oom", "oom_kill_disable"):  # v1 flags, not counts
                    assert m[("elemta_cgroup_memory_events_total", (("event", event),))] == n
        smtp = stats["smtp"]
        assert isinstance(smtp, dict)
        assert smtp["messages_accepted"] == 3
        assert smtp["recipients_accepted"] == 6
        assert m[("elemta_messages_accepted_total", ())] == 3
        assert get(d, "/health").status == 200


def test_health_503_when_memory_critical(tmp_path: Path) -> None:
    # A 1 MiB budget is below any Python process's RSS: the governor is critical at once.
    extra = ('[memory]\nmax_memory_usage = "1MiB"\nper_connection_memory_limit = "512KiB"\n'
             'monitoring_interval = "200ms"\n')
    with running(tmp_path, extra) as d:
        r = get(d, "/health")
        assert r.status == 503
        body = r.json()
        assert body["status"] == "unhealthy"
        assert body["memory_state"] == "critical"
        assert any(reason.startswith("memory critical") for reason in body["reasons"])
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            greeting = s.makefile("rb").readline()
        assert greeting.startswith(b"452 4.3.1")
        deadline = time.monotonic() + 10
        while True:
            stats = get(d, "/api/stats").json()
            if stats["smtp"]["connections"]["rejected"].get("memory") == 1:
                break
            assert time.monotonic() < deadline, stats["smtp"]
            time.sleep(0.05)
        assert stats["memory"]["state"] == "critical"
        assert stats["memory"]["limit_bytes"] == 1 << 20
        assert stats["memory"]["limit_source"] == "config"
        m = metric_values(get(d, "/metrics").body.decode())
        assert m[("elemta_memory_state", (("state", "critical"),))] == 1
        assert m[("elemta_connections_rejected_total", (("reason", "memory"),))] == 1
        assert m[("elemta_smtp_replies_total",
                  (("class", "4xx"), ("code", "452"), ("enhanced", "4.3.1")))] >= 1
