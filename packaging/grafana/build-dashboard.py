#!/usr/bin/env python3
"""Writes packaging/grafana/elemta.json, the Grafana dashboard the package installs under
/usr/share/elemta/grafana/ (schemaVersion 39: Grafana 10.4 / 11; import it, pick the Prometheus
data source). Panels read the metrics of /metrics and the recording rules of
packaging/prometheus/elemta-alerts.yml (load those rules too).

    python3 packaging/grafana/build-dashboard.py > packaging/grafana/elemta.json

Kept as code so a panel is one line; tests/integration/test_monitoring_assets.py checks that the
JSON is this script's output and that every metric it names is exported by a live daemon.
"""

from __future__ import annotations

import json
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'

# (title, unit, [(expr, legend)], width, description); rows of 24 grid units.
Panel = tuple[str, str, list[tuple[str, str]], int, str]

ROWS: list[tuple[str, list[Panel]]] = [
    ("Memory", [
        ("Memory utilization and thresholds", "percentunit", [
            (f"elemta:memory_binding:ratio{{{SEL}}}", "binding term {{instance}}"),
            (f"elemta_memory_term_ratio{{{SEL}}}", "{{term}} {{instance}}"),
            (f"elemta_memory_threshold_ratio{{{SEL}}}", "{{threshold}} threshold"),
        ], 12, "Each term's usage over its ceiling; the highest binds and decides the state. "
               "Dashed: memory_warning_threshold, gc_threshold, memory_critical_threshold."),
        ("Effective limit (by source) and elemta's usage", "bytes", [
            (f"elemta_memory_limit_bytes{{{SEL}}}", "limit ({{source}})"),
            (f"elemta_memory_usage_bytes{{{SEL}}}", "elemta's own memory"),
            (f"elemta_session_memory_bytes{{{SEL}}}", "session buffers"),
        ], 12, "The lowest of max_memory_usage, the cgroup limit and RAM; the legend names "
               "its source."),
        ("cgroup working set vs limit", "bytes", [
            (f"elemta_cgroup_memory_working_set_bytes{{{SEL}}}", "working set"),
            (f"elemta_cgroup_memory_current_bytes{{{SEL}}}", "current (with page cache)"),
            (f"elemta_cgroup_memory_max_bytes{{{SEL}}}", "limit"),
        ], 8, "memory.current minus clean page cache, against the lowest limit up to "
              "the root."),
        ("Memory pressure (PSI)", "percent", [
            (f"elemta_memory_pressure_some_avg10{{{SEL}}}", "some avg10"),
            (f"elemta_memory_pressure_full_avg10{{{SEL}}}", "full avg10"),
        ], 8, "Share of time tasks of elemta's cgroup waited for memory."),
        ("Forced GC and cgroup events", "short", [
            (f"increase(elemta_gc_runs_total{{{SEL}}}[$__rate_interval])", "forced GC runs"),
            (f"increase(elemta_cgroup_memory_events_total{{{SEL}}}[$__rate_interval])",
             "cgroup {{event}}"),
        ], 8, "gc.collect + malloc_trim runs above gc_threshold; memory.events (v1: failcnt, "
              "oom_kill)."),
    ]),
    ("Load", [
        ("Sessions vs max_connections", "short", [
            (f"elemta_sessions_active{{{SEL}}}", "sessions"),
            (f"elemta_sessions_max{{{SEL}}}", "max_connections"),
        ], 8, ""),
        ("Tasks vs max_goroutines", "short", [
            (f"elemta_goroutines_current{{{SEL}}}", "asyncio tasks + threads"),
            (f"elemta_goroutines_max{{{SEL}}}", "max_goroutines"),
        ], 8, ""),
        ("Event-loop heartbeat age", "s", [
            (f"elemta_event_loop_heartbeat_age_seconds{{{SEL}}}", "heartbeat age"),
            (f"elemta_event_loop_stall_after_seconds{{{SEL}}}", "stalled above"),
        ], 8, "/health reports the loop stalled above the second line."),
    ]),
    ("SMTP", [
        ("Replies by class", "reqps", [
            (f"sum by (class) (rate(elemta_smtp_replies_total{{{SEL}}}[$__rate_interval]))",
             "{{class}}"),
        ], 8, ""),
        ("452 and 552 share of replies", "percentunit", [
            (f"elemta:smtp_replies_452:ratio_rate5m{{{SEL}}}", "452 {{instance}}"),
            (f"elemta:smtp_replies_552:ratio_rate5m{{{SEL}}}", "552 {{instance}}"),
        ], 8, "452 4.3.1: memory refusals (retry later); 552 5.3.4: a session past "
              "per_connection_memory_limit."),
        ("Messages and bytes accepted", "short", [
            (f"rate(elemta_messages_accepted_total{{{SEL}}}[$__rate_interval])", "messages/s"),
            (f"rate(elemta_message_size_bytes_sum{{{SEL}}}[$__rate_interval])", "bytes/s"),
            (f"sum by (reason) (rate(elemta_connections_rejected_total{{{SEL}}}"
             "[$__rate_interval]))", "refused connections/s ({{reason}})"),
        ], 8, ""),
    ]),
    # Only with a queued transport ([delivery] transport = "lmtp:..."): empty otherwise.
    ("Queue and delivery", [
        ("Queued messages by state", "short", [
            (f"elemta_queue_messages{{{SEL}}}", "{{state}} {{instance}}"),
        ], 8, "active: being delivered, also counted in the state of its record."),
        ("Queue bytes", "bytes", [
            (f"elemta_queue_bytes{{{SEL}}}", "{{instance}}"),
        ], 8, "Bytes of queued message bodies; queue_minfree keeps the disk from filling."),
        ("Oldest queued message vs stuck_queue_age", "s", [
            (f"elemta_queue_oldest_message_age_seconds{{{SEL}}}", "oldest {{instance}}"),
            (f"elemta_queue_stuck_age_seconds{{{SEL}}}", "stuck_queue_age"),
        ], 8, "Above the dashed line /health warns and ElemtaQueueMessageTooOld fires."),
        ("Deliveries by transport and result", "reqps", [
            (f"sum by (transport, result) (rate(elemta_deliveries_total{{{SEL}}}"
             "[$__rate_interval]))", "{{transport}} {{result}}"),
        ], 8, "Recipient deliveries per second."),
        ("Delivery duration quantiles", "s", [
            (f"histogram_quantile({q}, sum by (le) (rate("
             f"elemta_delivery_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))", f"p{p}")
            for q, p in (("0.5", "50"), ("0.9", "90"), ("0.99", "99"))
        ], 8, "Time one delivery attempt took."),
        ("Delivery concurrency", "short", [
            (f'elemta_delivery_concurrency{{{SEL}, state="running"}}', "running"),
            (f'elemta_delivery_concurrency{{{SEL}, state="limit"}}', "limit (memory governor)"),
        ], 8, "The limit is concurrency at normal memory use, half at the warning threshold, "
              "0 at critical."),
    ]),
]

STATS: list[tuple[str, str, str]] = [
    ("Health", f'elemta_health_status{{{SEL}}} == 1', "{{status}}"),
    ("Memory state", f'elemta_memory_state{{{SEL}}} == 1', "{{state}}"),
    ("Binding term", f'elemta_memory_binding_term{{{SEL}}} == 1', "{{term}}"),
    ("Limit source", f"elemta_memory_limit_bytes{{{SEL}}}", "{{source}}"),
    ("Circuit breaker open", f"elemta_circuit_breaker_open{{{SEL}}}", "{{instance}}"),
    ("Usage source", f'elemta_memory_usage_source{{{SEL}}} == 1', "{{source}}"),
]


def timeseries(pid: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int,
               w: int, description: str) -> dict[str, Any]:
    overrides = []
    if any("threshold_ratio" in e or "_max" in e or "stall_after" in e or "limit" in e
           or "stuck_age" in e for e, _ in targets):
        overrides.append({
            "matcher": {"id": "byRegexp",
                        "options": ".*(threshold|max_|limit|stalled|stuck_queue_age).*"},
            "properties": [{"id": "custom.lineStyle",
                            "value": {"fill": "dash", "dash": [10, 10]}}],
        })
    return {
        "id": pid, "type": "timeseries", "title": title, "description": description,
        "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 0}},
                        "overrides": overrides},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi"}},
        "targets": [{"datasource": DS, "refId": chr(ord("A") + i), "expr": e,
                     "legendFormat": legend} for i, (e, legend) in enumerate(targets)],
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for i, (title, expr, legend) in enumerate(STATS):
        panels.append({
            "id": pid, "type": "stat", "title": title, "datasource": DS,
            "gridPos": {"x": 4 * i, "y": y, "w": 4, "h": 4},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "textMode": "name" if "==" in expr else "value",
                        "colorMode": "background", "graphMode": "none"},
            "fieldConfig": {"defaults": {"unit": "short"}, "overrides": []},
            "targets": [{"datasource": DS, "refId": "A", "expr": expr, "legendFormat": legend,
                         "instant": True}],
        })
        pid += 1
    y += 4
    for row_title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for title, unit, targets, w, description in row:
            if x + w > 24:
                x, y = 0, y + 8
            panels.append(timeseries(pid, title, unit, targets, x, y, w, description))
            pid, x = pid + 1, x + w
        y += 8
    var = {"datasource": DS, "refresh": 2, "includeAll": True, "multi": True,
           "current": {"text": "All", "value": "$__all"}}
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "uid": "elemta-overview",
        "title": "elemta",
        "description": "elemta SMTP daemon: memory governor, load, SMTP replies, queue "
                       "(needs the recording rules of elemta-alerts.yml)",
        "tags": ["elemta", "smtp"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            {"name": "job", "label": "Job", "type": "query", "query":
             "label_values(elemta_build_info, job)", **var},
            {"name": "instance", "label": "Instance", "type": "query", "query":
             'label_values(elemta_build_info{job=~"$job"}, instance)', **var},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    print(json.dumps(dashboard(), indent=2))
