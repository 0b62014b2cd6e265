"""The published memory figures add up, whichever term binds (issue 11 item 12).

A Governor fed one constructed Sample per case (the pure effective() decision behind it), and
every surface rendered from its snapshot: /metrics, /api/stats, `elemta stats`, STATUS=, the
state-change log event. Expectations are written out by hand per case, not computed by the code
under test: elemta's own usage against the effective limit (usage / limit == utilization), and
the binding term named with its own usage and ceiling.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakecgroup import MOUNTS_V1, V1_SENTINEL, proc, v1_group, write
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from elemta import config
from elemta.memory.governor import Governor, effective
from elemta.memory.sampler import Sample, Sampler, parse_pss
from elemta.memory.snapshot import CgroupFigures
from elemta.observe import report, statsview, systemd
from elemta.observe.metrics import SmtpStats, build_registry

MiB = 1024 * 1024
GiB = 1024 * MiB


class FixedSampler(Sampler):
    """Always the same Sample: the governor's decision on it is what is tested."""

    def __init__(self, sample: Sample) -> None:  # no /proc, no cgroup files
        self.fixed = sample
        self.root = Path("/nonexistent")
        self.pressure_path = None

    def sample(self) -> Sample:
        return self.fixed

    def rescan(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Case:
    sample: Sample
    usage: int  # elemta's own memory, expected
    usage_source: str
    limit: int
    limit_source: str
    binding: str
    binding_usage: int
    binding_ceiling: int
    terms: tuple[str, ...]
    state: str


def s(pss: int, *, cg: CgroupFigures | None = None, own: bool = False, total: int = 16 * GiB,
      available: int = 12 * GiB) -> Sample:
    return Sample(taken_at=0.0, wall_time=0.0, process_rss=pss * 2, process_pss=pss,
                  host_total=total, host_available=available, cgroup=cg, cgroup_own=own,
                  pressure=None)


def v1(working_set: int, limit: int | None) -> CgroupFigures:
    return CgroupFigures(1, "/x", working_set + 10 * MiB, limit, working_set, 10 * MiB)


CASES = {
    # elemta itself near its configured budget; the host is fine
    "process": Case(s(1946 * MiB), 1946 * MiB, "pss", 2 * GiB, "config", "process",
                    1946 * MiB, 2 * GiB, ("process", "host"), "critical"),
    # a shared cgroup (a container with other processes) near its limit; elemta is small
    "cgroup-shared": Case(s(100 * MiB, cg=v1(960 * MiB, GiB)), 100 * MiB, "pss", GiB,
                          "cgroup-v1", "cgroup", 960 * MiB, GiB, ("process", "cgroup"),
                          "critical"),
    # elemta's own cgroup: its working set is elemta's usage, and the cgroup term binds
    "cgroup-own": Case(s(650 * MiB, cg=v1(800 * MiB, GiB), own=True), 800 * MiB, "cgroup", GiB,
                       "cgroup-v1", "cgroup", 800 * MiB, GiB, ("process", "cgroup"), "warning"),
    # no cgroup limit, the host nearly full: the example of a 33 MiB daemon
    "host": Case(s(33 * MiB, cg=v1(40 * MiB, None), total=24 * GiB, available=1228 * MiB),
                 33 * MiB, "pss", 2 * GiB, "config", "host", 24 * GiB - 1228 * MiB, 24 * GiB,
                 ("process", "host"), "critical"),
}


def scrape(g: Governor) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = build_registry(lambda: g.snapshot, SmtpStats(), lambda: 0.0)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sm in family.samples:
            out[(sm.name, tuple(sorted(sm.labels.items())))] = sm.value
    return out


@pytest.mark.parametrize("name", CASES)
def test_published_figures_add_up(name: str, caplog: pytest.LogCaptureFixture) -> None:
    c = CASES[name]
    cfg = config.build({"memory": {"max_memory_usage": 2 * GiB}})
    with caplog.at_level(logging.INFO, logger="elemta.memory"):
        g = Governor(cfg, FixedSampler(c.sample), tasks=lambda: 5)
        snap = g.snapshot
    pct = round(100 * c.usage / c.limit, 2)
    term_pct = round(100 * c.binding_usage / c.binding_ceiling, 2)

    # the snapshot
    assert (snap.usage, snap.usage_source.value, snap.limit, snap.limit_source.value) == (
        c.usage, c.usage_source, c.limit, c.limit_source)
    assert snap.utilization_percent == pct
    assert (snap.binding.term.value, snap.binding.usage, snap.binding.ceiling) == (
        c.binding, c.binding_usage, c.binding_ceiling)
    assert tuple(t.term.value for t in snap.terms) == c.terms
    assert snap.state.value == c.state

    # /metrics
    m = scrape(g)
    assert m[("elemta_memory_usage_bytes", ())] == c.usage
    assert m[("elemta_memory_limit_bytes", (("source", c.limit_source),))] == c.limit
    assert m[("elemta_memory_utilization_percent", ())] == pct
    assert m[("elemta_memory_usage_source", (("source", c.usage_source),))] == 1
    for term in c.terms:
        assert m[("elemta_memory_binding_term", (("term", term),))] == (term == c.binding)
    key = (("term", c.binding),)
    assert m[("elemta_memory_term_usage_bytes", key)] == c.binding_usage
    assert m[("elemta_memory_term_ceiling_bytes", key)] == c.binding_ceiling
    assert m[("elemta_memory_term_ratio", key)] == pytest.approx(c.binding_usage / c.binding_ceiling)
    assert max(v for (n, _), v in m.items() if n == "elemta_memory_term_ratio") == m[
        ("elemta_memory_term_ratio", key)]

    # /api/stats
    inputs = report.Inputs(snapshot=snap, smtp=SmtpStats().counts(), heartbeat_age=0.0,
                           draining=False, started=0.0, profiling=False)
    doc = report.stats(inputs)
    mem = doc["memory"]
    assert (mem["usage_bytes"], mem["limit_bytes"], mem["utilization_percent"]) == (
        c.usage, c.limit, pct)
    assert mem["binding"] == {"term": c.binding, "usage_bytes": c.binding_usage,
                              "ceiling_bytes": c.binding_ceiling, "percent": term_pct}
    assert list(mem["terms"]) == list(c.terms)
    _, health = report.health(inputs)
    assert health["binding"]["term"] == c.binding
    if c.state != "normal":
        assert health["reasons"][0].startswith(f"memory {c.state}: {c.binding} {term_pct}% of "
                                               f"{c.binding_ceiling} bytes (binding)")

    # elemta stats
    rows = dict(statsview.rows(doc))
    assert rows["memory usage"].startswith(
        f"{c.usage / MiB:.1f} MiB of {c.limit / MiB:.1f} MiB ({pct:.2f}%)")
    assert rows["binding term"] == (f"{c.binding} {term_pct:.2f}% ({c.binding_usage / MiB:.1f} "
                                    f"MiB of {c.binding_ceiling / MiB:.1f} MiB)")

    # STATUS=
    status = systemd.status_text("accepting", 0, snap)
    assert f"memory {100 * c.usage / c.limit:.1f}% of " in status
    assert f", {c.binding} {100 * c.binding_usage / c.binding_ceiling:.0f}% of " in status
    assert " binding; 0 sessions" in status

    # the log event of the state change (and the start line's figures)
    if c.state != "normal":
        record = next(r for r in caplog.records if r.getMessage().startswith(
            f"Memory {c.state} threshold exceeded"))
        fields = record.__dict__["elemta_fields"]
        assert (fields["current_usage"], fields["max_usage"], fields["utilization_percent"]) == (
            c.usage, c.limit, pct)
        assert (fields["binding_term"], fields["binding_usage"], fields["binding_ceiling"],
                fields["binding_percent"]) == (c.binding, c.binding_usage, c.binding_ceiling,
                                               term_pct)
        assert f"{c.binding} {term_pct}% of " in record.getMessage()


def test_pss_from_smaps_rollup() -> None:
    text = ("55e798f2f000-7fff6ee0b000 ---p 00000000 00:00 0   [rollup]\nRss:  11220 kB\n"
            "Pss:   5659 kB\nPss_Dirty:  4716 kB\nPss_Anon:  4716 kB\n")
    assert parse_pss(text) == 5659 * 1024
    assert parse_pss("Rss: 1 kB\n") is None


def test_admission_samples_follow_own_growth_between_rescans() -> None:
    # The monitor's rescan reads PSS; admission samples add this process's RSS change since.
    sampler = Sampler()
    try:
        sampler.rescan()
        first = sampler.sample().process_pss
        ballast = bytearray(64 * MiB)
        for i in range(0, len(ballast), 4096):
            ballast[i] = 1  # touch every page
        grown = sampler.sample().process_pss
        assert 56 * MiB < grown - first < 72 * MiB, (first, grown)
        del ballast
    finally:
        sampler.close()


def test_a_cgroup_is_elemtas_own_only_when_every_process_in_it_is(tmp_path: Path) -> None:
    # The fake tree stands in for /sys; the daemon's process tree is this process alone.
    proc(tmp_path, "4:memory:/svc\n", MOUNTS_V1, rss=20 * MiB)
    base = tmp_path / "sys/fs/cgroup/memory"
    write(base / "memory.limit_in_bytes", V1_SENTINEL)
    v1_group(base / "svc", usage=30 * MiB, limit=str(GiB), clean=0)
    procs = base / "svc/cgroup.procs"

    def own() -> tuple[bool, str]:
        sampler = Sampler(tmp_path)
        try:
            sampler.rescan()
            sample = sampler.sample()
            return sample.cgroup_own, effective(sample, 2 * GiB).usage_source.value
        finally:
            sampler.close()

    write(procs, f"{os.getpid()}\n")
    assert own() == (True, "cgroup")
    write(procs, f"{os.getpid()}\n1\n")  # another program shares the cgroup
    assert own() == (False, "pss")
    write(procs, f"{os.getpid()}\n")
    write(base / "svc/sub/cgroup.procs", "1\n")  # ... or a sub-cgroup of it
    assert own() == (False, "pss")
    write(base / "svc/sub/cgroup.procs", "")
    assert own() == (True, "cgroup")
    procs.unlink()  # unreadable: not known to be its own
    assert own() == (False, "pss")
