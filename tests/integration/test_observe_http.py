"""The admin HTTP endpoint of a real daemon: real HTTP requests, real SMTP traffic."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import Daemon, free_port, running, start, write_config
from httpclient import get, metric_values


def api(d: Daemon) -> str:
    return f"http://127.0.0.1:{d.api_port}"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """The shared fixture's daemon, with a 4 KiB message size limit to provoke 552."""
    with running(tmp_path, "[server]\nmax_message_size = 4096\n") as d:
        yield d


def test_endpoints_and_content_types(daemon: Daemon) -> None:
    metrics = get(daemon, "/metrics")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.body.decode()
    assert 'elemta_build_info{python="' in text
    assert "elemta_event_loop_heartbeat_age_seconds" in text

    health = get(daemon, "/health")
    assert health.status == 200
    assert health.headers["content-type"] == "application/json"
    assert health.json()["status"] in ("ok", "warning")

    stats = get(daemon, "/api/stats")
    assert stats.status == 200
    assert stats.headers["content-type"] == "application/json"
    doc = stats.json()
    assert doc["version"]
    assert doc["uptime_seconds"] >= 0
    assert set(doc["smtp"]) >= {"connections", "replies", "messages_accepted"}

    head = get(daemon, "/health", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) > 0


def test_openmetrics_negotiation(daemon: Daemon) -> None:
    r = get(daemon, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.body.rstrip().endswith(b"# EOF")


def test_metric_families_unique_and_process_collectors_once(daemon: Daemon) -> None:
    text = get(daemon, "/metrics").body.decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert "process_resident_memory_bytes" in names
    assert "python_gc_objects_collected" in names
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        # No unbounded labels: no peer addresses or mail addresses anywhere.
        assert "127.0.0.1" not in line and "@" not in line, line


def test_bad_requests_get_404_405_never_a_traceback(daemon: Daemon) -> None:
    r = get(daemon, "/nope")
    assert r.status == 404
    r = get(daemon, "/metrics", method="POST")
    assert r.status == 405
    assert r.headers["allow"] == "GET, HEAD"
    r = get(daemon, "/health", method="BREW")
    assert r.status == 405
    r = get(daemon, "/debug/pprof/heap")
    assert r.status == 404  # profiling is off by default
    with socket.create_connection(("127.0.0.1", daemon.api_port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1 junk\r\n\r\n")
        answer = s.recv(4096)
    # A request line http.server cannot parse gets its 400 page (no status line: HTTP/0.9).
    assert b"400" in answer
    assert b"Traceback" not in answer
    assert get(daemon, "/health").status == 200
    assert "Traceback" not in daemon.log


def _session(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=10)


def test_smtp_traffic_counted_same_in_metrics_and_stats(daemon: Daemon) -> None:
    body = "Subject: hello\r\n\r\n" + "line of text\r\n" * 20
    with _session(daemon.port) as c:
        c.sendmail("sender@client.test", ["alice@example.test", "bob@example.test"], body)
    with _session(daemon.port) as c:
        c.ehlo()
        c.mail("sender@client.test")
        code, _ = c.rcpt("someone@elsewhere.test")
        assert code == 550
        c.rset()
    with _session(daemon.port) as c:  # no SIZE= on MAIL: refused after the final dot
        c.ehlo()
        c.mail("sender@client.test")
        c.rcpt("alice@example.test")
        code, _ = c.data(("x" * 70 + "\r\n") * 80)
        assert code == 552

    stored = list((daemon.maildir / "example.test" / "alice" / "new").iterdir())
    assert len(stored) == 1
    size = stored[0].stat().st_size

    stats = get(daemon, "/api/stats").json()
    smtp = stats["smtp"]
    assert smtp["connections"]["accepted"] == 3
    assert smtp["messages_accepted"] == 1
    assert smtp["recipients_accepted"] == 2
    assert smtp["bytes_accepted"] == size
    replies = smtp["replies"]
    assert replies["552 5.3.4"] == 1
    assert replies["550 5.7.1"] == 1
    assert replies["250 2.1.5"] == 3  # alice, bob; alice again in the oversized one
    assert replies["354"] == 2
    assert replies["220"] == 3
    assert replies["221 2.0.0"] == 3
    assert sum(smtp["replies_by_class"].values()) == sum(replies.values())

    m = metric_values(get(daemon, "/metrics").body.decode())
    assert m[("elemta_connections_accepted_total", ())] == smtp["connections"]["accepted"]
    assert m[("elemta_messages_accepted_total", ())] == smtp["messages_accepted"]
    assert m[("elemta_message_recipients_accepted_total", ())] == smtp["recipients_accepted"]
    assert m[("elemta_message_size_bytes_sum", ())] == smtp["bytes_accepted"]
    assert m[("elemta_message_size_bytes_count", ())] == smtp["messages_accepted"]
    for key, n in replies.items():
        code, _, enhanced = key.partition(" ")
        labels = (("class", code[0] + "xx"), ("code", code), ("enhanced", enhanced))
        assert m[("elemta_smtp_replies_total", labels)] == n, key
    counted = sum(v for (name, _), v in m.items() if name == "elemta_smtp_replies_total")
    assert counted == sum(replies.values())


def test_connection_rejected_counted_by_reason(tmp_path: Path) -> None:
    d = start(tmp_path, "[server]\nmax_connections = 1\n")
    try:
        with _session(d.port) as first:
            assert first.noop()[0] == 250
            with socket.create_connection(("127.0.0.1", d.port), timeout=10) as second:
                greeting = second.makefile("rb").readline()
            assert greeting.startswith(b"421 4.7.0")
        stats = get(d, "/api/stats").json()["smtp"]
        assert stats["connections"] == {"accepted": 1, "rejected": {"max_connections": 1}}
        m = metric_values(get(d, "/metrics").body.decode())
        assert m[("elemta_connections_rejected_total", (("reason", "max_connections"),))] == 1
        assert m[("elemta_connections_rejected_total", (("reason", "memory"),))] == 0
        assert m[("elemta_smtp_replies_total",
                  (("class", "4xx"), ("code", "421"), ("enhanced", "4.7.0")))] == 1
    finally:
        d.stop()


def test_health_503_while_event_loop_is_blocked(tmp_path: Path) -> None:
    """The test-only hook makes SIGUSR2 block the loop (time.sleep in a loop callback)."""
    d = start(tmp_path, env={"ELEMTA_TEST_BLOCK_LOOP_SECONDS": "9"})
    try:
        assert get(d, "/health").status == 200
        d.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 8.5
        seen = None
        while time.monotonic() < deadline:
            r = get(d, "/health")
            if r.status == 503:
                seen = r
                break
            time.sleep(0.2)
        assert seen is not None, "a blocked loop was reported healthy"
        body = seen.json()
        assert body["status"] == "unhealthy"
        assert any("event loop stalled" in reason for reason in body["reasons"])
        assert body["event_loop_heartbeat_age_seconds"] > 5
        # /metrics and /api/stats still answer from the HTTP thread, and tell the same story.
        assert get(d, "/api/stats").json()["event_loop"]["heartbeat_age_seconds"] > 5
        deadline = time.monotonic() + 15
        while get(d, "/health").status != 200:
            assert time.monotonic() < deadline, "health did not recover after the loop resumed"
            time.sleep(0.2)
        with _session(d.port) as c:
            assert c.noop()[0] == 250
    finally:
        d.stop()


def test_heap_profile_when_enabled(tmp_path: Path) -> None:
    d = start(tmp_path, "[api]\nenable_profiling = true\n")
    try:
        r = get(d, "/debug/pprof/heap?top=5")
        assert r.status == 200
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        text = r.body.decode()
        assert text.startswith("# elemta heap profile (tracemalloc")
        assert 1 <= text.count(" bytes in ") <= 5
        assert 'File "' in text
        diff = get(d, "/debug/pprof/heap?diff=1").body.decode()
        assert "difference since the previous request" in diff
        assert get(d, "/debug/pprof/heap?top=many").status == 400
        assert get(d, "/api/stats").json()["profiling"] == {"enabled": True, "tracing": True}
    finally:
        d.stop()


def test_profiling_off_costs_nothing(daemon: Daemon) -> None:
    assert get(daemon, "/debug/pprof/heap").status == 404
    # tracemalloc.is_tracing() inside the daemon, as it reports it.
    assert get(daemon, "/api/stats").json()["profiling"] == {"enabled": False, "tracing": False}


def test_api_port_busy_is_a_clean_start_failure(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = tmp_path / "busy.toml"
        write_config(tmp_path, free_port(), port).rename(cfg)
        proc = subprocess.run([sys.executable, "-m", "elemta.cli", "serve", "--config", str(cfg)],
                              capture_output=True, text=True, timeout=30,
                              env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})
    assert proc.returncode == 1
    err = proc.stderr
    assert "cannot start" in err and "Address already in use" in err
    assert "Traceback" not in err


def test_stats_cli_table_and_json(daemon: Daemon) -> None:
    with _session(daemon.port) as c:
        c.sendmail("sender@client.test", ["alice@example.test"], "Subject: x\r\n\r\nhi\r\n")
    cmd = [sys.executable, "-m", "elemta.cli", "stats"]
    table = subprocess.run([*cmd, "--api", api(daemon)], capture_output=True, text=True,
                           timeout=30)
    assert table.returncode == 0, table.stderr
    lines = dict(line.split(None, 1) for line in table.stdout.splitlines()
                 if line.split(None, 1)[0] in ("version", "messages", "connections", "tasks"))
    assert lines["messages"].startswith("1 accepted, 1 recipients,")
    assert lines["connections"].startswith("1 accepted, 0 rejected")
    # Aligned: every value starts in the same column.
    starts = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in table.stdout.splitlines()}
    assert len(starts) == 1
    raw = subprocess.run([*cmd, "--api", api(daemon), "--json"], capture_output=True, text=True,
                         timeout=30)
    assert raw.returncode == 0
    doc = json.loads(raw.stdout)
    assert doc["smtp"]["messages_accepted"] == 1
    by_config = subprocess.run([*cmd, "--config", str(daemon.config_path), "--json"],
                               capture_output=True, text=True, timeout=30)
    assert json.loads(by_config.stdout)["smtp"]["messages_accepted"] == 1


def test_stats_cli_unreachable_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "elemta.cli", "stats", "--api",
                        f"http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"elemta: cannot reach http://127.0.0.1:{port}/api/stats")


def test_json_logs_on_stderr(daemon: Daemon) -> None:
    with _session(daemon.port) as c:
        c.sendmail("sender@client.test", ["alice@example.test"], "Subject: x\r\n\r\nhi\r\n")
    daemon.stop()
    records = [json.loads(line) for line in daemon.log.splitlines()]
    assert all({"time", "level", "logger", "msg"} <= set(r) for r in records)
    assert {r["level"] for r in records} <= {"DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"}
    accepted = [r for r in records if r.get("event") == "message_accepted"]
    assert len(accepted) == 1
    a = accepted[0]
    stored = next((daemon.maildir / "example.test" / "alice" / "new").iterdir())
    assert a["queue_id"] in stored.read_text()
    assert a["sender"] == "sender@client.test"
    assert a["recipients"] == 1
    assert a["size"] == stored.stat().st_size
    assert a["message_id"] == "fdb523c707984adda0b95fcd5a8c5e4c"
    assert any("admin HTTP listening on" in r["msg"] for r in records)


def test_http_stays_loopback_by_default() -> None:
    from elemta.config import ApiConfig

    assert ApiConfig().listen.host in ("127.0.0.1", "::1")
