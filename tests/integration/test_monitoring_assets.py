"""The packaged Prometheus rules (and Grafana dashboard): promtool accepts them, their unit tests
fire and stay silent as they should, and every metric they name is one a real daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import free_port, running, wait_until
from httpclient import get
from realcgroup import MiB, join, memory_cgroup

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "prometheus" / "elemta-alerts.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "elemta-alerts-test.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "elemta.json"
MAN8 = ROOT / "man" / "elemta.8"

# Series names: elemta's own, Prometheus' `up`, and the recording rules' level:metric:operations.
_METRIC = re.compile(r"\b(elemta_[a-z0-9_]+|elemta:[a-z0-9_:]+)\b")
_ALERT = re.compile(r"^\s*- alert: (\w+)$", re.M)
_RECORD = re.compile(r"^\s*- record: (\S+)$", re.M)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not installed: apt-get install prometheus (scripts/bootstrap does)")
    return path


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_promtool_check_rules() -> None:
    out = run_promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_test_rules() -> None:
    out = run_promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def _alerts() -> list[str]:
    return _ALERT.findall(RULES.read_text())


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    tests = RULE_TESTS.read_text()
    for alert in _alerts():
        cases = re.findall(rf"alertname: {alert}\n\s+eval_time: \S+.*\n\s+exp_alerts:(.*)", tests)
        assert any(c.strip() == "[]" for c in cases), f"{alert}: no case where it stays silent"
        assert any(c.strip() == "" for c in cases), f"{alert}: no case where it fires"


@pytest.mark.parametrize("alert", _alerts())
def test_unit_tests_catch_an_alert_that_never_fires(alert: str, tmp_path: Path) -> None:
    """The firing case really depends on the rule: with its expression replaced by one that is
    never true, promtool test rules must fail."""
    text = RULES.read_text()
    start = text.index(f"- alert: {alert}\n")
    head, rest = text[:start], text[start:]
    body = re.sub(r"expr: (\|\n(?:\s{10,}.*\n)+|.*\n)", "expr: vector(0) > 1\n", rest, count=1)
    (tmp_path / "elemta-alerts.yml").write_text(head + body)
    tests = RULE_TESTS.read_text().replace("../../packaging/prometheus/elemta-alerts.yml",
                                           "elemta-alerts.yml")
    (tmp_path / "t.yml").write_text(tests)
    out = run_promtool("test", "rules", "t.yml", cwd=tmp_path)
    report = out.stdout + out.stderr
    assert out.returncode != 0 and f"alertname: {alert}," in report, report


def test_rules_follow_the_mixin_conventions() -> None:
    text = RULES.read_text()
    man = MAN8.read_text()
    blocks = re.split(r"\n\s+- alert: ", text)[1:]
    assert len(blocks) == len(_alerts()) >= 10
    for block in blocks:
        name = block.split("\n", 1)[0]
        assert re.fullmatch(r"Elemta[A-Z][A-Za-z0-9]+", name), name
        severity = re.search(r"severity: (\w+)", block)
        assert severity is not None and severity.group(1) in ("warning", "critical"), name
        assert re.search(r"summary: \S", block), name
        description = re.search(r"description: >-\n((?: {12}.*\n)+)", block)
        assert description is not None and "{{ $labels.instance }}" in description.group(1), name
        url = re.search(r"runbook_url: man:elemta\(8\)#(\w+)", block)
        assert url is not None and url.group(1) == name, name
        # The runbook it points to: a subsection of ALERTS in elemta(8).
        assert re.search(rf"^\.SS {name}$", man, re.M), f"elemta.8 has no .SS {name}"


def _names_used() -> set[str]:
    names = set(_METRIC.findall(RULES.read_text()))
    if DASHBOARD.exists():
        doc = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
        names |= {n for e in exprs for n in _METRIC.findall(e)}
    return names


def test_dashboard_is_valid_grafana_json_built_by_its_script() -> None:
    built = subprocess.run([sys.executable, str(ROOT / "packaging" / "grafana" /
                                                 "build-dashboard.py")],
                           capture_output=True, text=True, check=True).stdout
    doc = json.loads(DASHBOARD.read_text())
    assert json.loads(built) == doc, "elemta.json is stale: rerun build-dashboard.py"
    assert doc["schemaVersion"] == 39 and doc["uid"] and doc["title"] == "elemta"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["type"] == "row" or p["targets"], p["title"]
    titles = " ".join(p["title"] for p in doc["panels"])
    for wanted in ("thresholds", "limit", "cgroup working set", "PSI", "GC", "max_goroutines",
                   "Sessions", "Replies by class", "452 and 552", "Messages and bytes",
                   "heartbeat", "Queued messages by state", "Queue bytes",
                   "Oldest queued message vs stuck_queue_age", "Deliveries by transport and result",
                   "Delivery duration", "Delivery concurrency"):
        assert wanted in titles, wanted


def test_every_metric_in_the_rules_and_dashboard_is_exported(tmp_path: Path) -> None:
    # In a real memory cgroup with a limit, so the cgroup figures exist as under systemd; with a
    # queued transport, so the queue and delivery series exist: an LMTP port nobody listens on,
    # where the one message sent is deferred (a delivery result, a duration, an oldest age).
    extra = (f'[delivery]\ntransport = "lmtp:127.0.0.1:{free_port()}"\n'
             f'queue_dir = "{tmp_path / "queue"}"\n')
    with (memory_cgroup(512 * MiB) as cg,
          running(tmp_path, extra, preexec_fn=join(cg)) as daemon):
        daemon.send("user@example.test")
        wait_until(lambda: "elemta_deliveries_total{" in get(daemon, "/metrics").body.decode(),
                   "the deferral counted", timeout=30)
        text = get(daemon, "/metrics").body.decode()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                if line and not line.startswith("#")}
    recorded = set(_RECORD.findall(RULES.read_text()))
    used = _names_used()
    assert {"elemta_memory_term_ratio", "elemta_health_status",
            "elemta_cgroup_memory_working_set_bytes", "elemta:smtp_replies_452:ratio_rate5m",
            "elemta_queue_messages", "elemta_deliveries_total"} <= used
    missing = sorted(n for n in used if n not in exported and n not in recorded)
    assert not missing, f"named in the rules/dashboard but not in a daemon's /metrics: {missing}"
