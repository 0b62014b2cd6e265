"""elemta's own memory, on a real daemon (issue 11 items 7 and 12).

With workers, pages shared after fork must be counted once (PSS, or the cgroup's own working
set when the cgroup holds only elemta), and every surface (/metrics, /api/stats, `elemta
stats`, STATUS=, the start log line) publishes elemta's own usage against the effective limit,
with the binding term named beside it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import Daemon, running
from httpclient import get, metric_values
from realcgroup import join, memory_cgroup

MiB = 1024 * 1024


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return out


def pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def settled_stats(d: Daemon, processes: int) -> dict[str, object]:
    """/api/stats from a monitor sample taken after every worker was up (sampled_at later than
    the moment the whole process tree was seen)."""
    deadline = time.monotonic() + 30
    while len(tree(d.proc.pid)) < processes:
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)
    seen = time.time()
    while True:
        stats = get(d, "/api/stats").json()
        if stats["memory"]["sampled_at"] > seen:
            return stats  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, "no monitor sample"
        time.sleep(0.05)


class Notify:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)

    def status_at_ready(self) -> str:
        while True:
            msg = dict(line.split("=", 1) for line in self.sock.recv(4096).decode().splitlines()
                       if "=" in line)
            if msg.get("READY") == "1":
                return msg["STATUS"]


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "budget", "binds"), [
    (1, 2 << 30, None),  # the defaults: whichever term binds on this host
    (4, 2 << 30, None),
    (4, 16 << 30, "host"),  # elemta's ~50 MiB are far less of 16 GiB than the host's use of RAM
    (1, 96 * MiB, "process"),  # elemta's own memory is the highest ratio
    (4, 96 * MiB, "process"),
])
def test_published_usage_is_elemtas_own_and_adds_up(tmp_path: Path, workers: int, budget: int,
                                                     binds: str | None) -> None:
    # This test's cgroup holds pytest and more: not elemta's own, so its usage is the PSS of
    # its processes, whatever the host's other programs use.
    notify = Notify(tmp_path / "n.sock")
    extra = (f'[server]\nworkers = {workers}\n[memory]\nmonitoring_interval = "200ms"\n'
             f"max_memory_usage = {budget}\n")
    with running(tmp_path / "d", extra, env={"NOTIFY_SOCKET": str(notify.path)}) as d:
        status = notify.status_at_ready()
        stats = settled_stats(d, workers + (workers > 1))
        actual = sum(pss(p) for p in tree(d.proc.pid))
        metrics = metric_values(get(d, "/metrics").body.decode())
        cli = subprocess.run([sys.executable, "-m", "elemta.cli", "stats", "--api",
                              f"http://127.0.0.1:{d.api_port}"], capture_output=True, text=True,
                             check=True).stdout
        mem = stats["memory"]
        assert isinstance(mem, dict)
        usage, limit, pct = mem["usage_bytes"], mem["limit_bytes"], mem["utilization_percent"]

        # elemta's own: the PSS of its processes, not the host's used memory nor summed RSS
        assert abs(usage - actual) <= 0.10 * actual, (usage, actual)
        assert mem["usage_source"] == "pss"
        assert abs(mem["process_pss_bytes"] - actual) <= 0.10 * actual
        # usage / limit is the utilization shown
        assert limit == budget and mem["limit_source"] == "config"
        assert pct == round(100 * usage / limit, 2)
        # the binding term is the highest ratio and is named with its own figures
        terms = mem["terms"]
        binding = mem["binding"]
        assert set(terms) == {"process", "host"} or set(terms) == {"process", "cgroup"}
        assert binding == max(terms.values(), key=lambda t: t["usage_bytes"] / t["ceiling_bytes"])
        assert binding["percent"] == round(100 * binding["usage_bytes"] / binding["ceiling_bytes"], 2)
        assert terms["process"]["usage_bytes"] == usage
        assert binds is None or binding["term"] == binds, terms

        # /metrics: the same sample's figures (the supervisor's snapshot changes only per tick)
        if metrics[("elemta_memory_usage_bytes", ())] == usage:
            assert metrics[("elemta_memory_utilization_percent", ())] == pct
        m_usage = metrics[("elemta_memory_usage_bytes", ())]
        m_limit = metrics[("elemta_memory_limit_bytes", (("source", "config"),))]
        assert m_limit == budget
        assert metrics[("elemta_memory_utilization_percent", ())] == round(100 * m_usage / m_limit, 2)
        assert abs(m_usage - actual) <= 0.10 * actual
        ratios = {dict(labels)["term"]: v for (name, labels), v in metrics.items()
                  if name == "elemta_memory_term_ratio"}
        assert set(ratios) == set(terms)
        top = max(ratios, key=lambda t: ratios[t])
        assert metrics[("elemta_memory_binding_term", (("term", top),))] == 1

        # elemta stats
        row = re.search(r"^memory usage +(\d+\.\d) MiB of (\d+\.\d) MiB \((\d+\.\d\d)%\)", cli, re.M)
        assert row is not None, cli
        shown_usage, shown_limit, shown_pct = (float(x) for x in row.groups())
        assert abs(shown_usage * MiB - actual) <= 0.10 * actual
        assert shown_limit == budget / MiB
        # shown usage / shown limit == shown percent, up to the rounding of what is shown
        # (0.05 MiB of usage, 0.005 points of percent)
        assert abs(shown_pct / 100 * shown_limit - shown_usage) <= 0.051 + 0.00005 * shown_limit
        assert re.search(rf"^binding term +{top} \d+\.\d\d% \(", cli, re.M), cli

        # STATUS= (at READY=1, before the workers' memory settled: the same shape)
        shown = f"{budget / MiB:.1f} MiB" if budget < 1 << 30 else f"{budget / (1 << 30):.1f} GiB"
        st = re.fullmatch(rf"accepting; memory (\d+\.\d)% of {shown} \(config\), (\w+) (\d+)% of "
                          r"(\S+ \w+) binding; 0 sessions; breaker closed", status)
        assert st is not None, status
        assert st.group(2) in terms and (binds is None or st.group(2) == binds), status

        # the start line's figures
        line = next(ln for ln in d.log.splitlines()
                    if f"memory limit {budget / MiB:.1f} MiB (config)" in ln)
        assert "(pss; " in line and " (binding); elemta " in line, line


@pytest.mark.root
@pytest.mark.slow
def test_four_workers_in_their_own_cgroup_count_shared_pages_once(tmp_path: Path) -> None:
    # A fresh cgroup holding only the daemon: its working set is the truth to match.
    with memory_cgroup(1024 * MiB) as cg, running(
            tmp_path / "d", '[server]\nworkers = 4\n[memory]\nmonitoring_interval = "200ms"\n',
            preexec_fn=join(cg)) as d:
        stats = settled_stats(d, 5)
        ws = cg.working_set()
        procs = tree(d.proc.pid)
        assert sorted(int(p) for p in cg.procs.read_text().split()) == sorted(procs)
        mem = stats["memory"]
        assert isinstance(mem, dict)
        assert abs(mem["usage_bytes"] - ws) <= 0.10 * ws, (mem["usage_bytes"], ws)
        assert mem["usage_source"] == "cgroup"
        # The PSS figure (what a daemon without a cgroup of its own publishes) agrees roughly:
        # it also counts shared-library pages, which the kernel charged to whichever cgroup
        # first read them (5-12% of the working set here, depending on the machine's load).
        assert abs(mem["process_pss_bytes"] - ws) <= 0.20 * ws, (mem["process_pss_bytes"], ws)
        # while summing RSS counts the shared pages once per process
        assert mem["process_rss_bytes"] > 1.5 * ws
        assert mem["limit_bytes"] == 1024 * MiB and mem["limit_source"] == cg.source
        assert mem["utilization_percent"] == round(100 * mem["usage_bytes"] / (1024 * MiB), 2)
        assert mem["binding"]["term"] in ("cgroup", "process")
