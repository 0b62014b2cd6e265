"""/debug/pprof/heap?format=pprof of a real daemon (one process, and workers): a gzipped
perftools Profile that protobuf's own decoder reads, naming elemta's allocation sites for the
sessions held open mid-DATA."""

from __future__ import annotations

import gzip
import re
import smtplib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from daemon import Daemon, running, wait_until
from httpclient import get

pytest.importorskip("google.protobuf", reason="protobuf (the test extra) decodes the profile")
from profile_proto import Profile


@contextmanager
def sessions_in_data(d: Daemon, n: int) -> Iterator[None]:
    held = []
    try:
        for _ in range(n):
            s = smtplib.SMTP(d.host, d.port, timeout=30)
            s.ehlo("c.test")
            s.mail("a@example.org")
            s.rcpt("heap@example.test")
            s.putcmd("data")
            assert s.getreply()[0] == 354
            s.send(b"Subject: heap\r\n\r\n" + b"x" * 998 + b"\r\n")
            held.append(s)
        wait_until(lambda: get(d, "/api/stats").json()["sessions"]["current"] == n,
                   f"{n} sessions")
        yield
    finally:
        for s in held:
            s.close()


def decode(d: Daemon, query: str = "") -> tuple[Any, list[str], dict[int, str]]:
    # Generous: a profile of every traced site takes seconds, more on a loaded machine.
    r = get(d, "/debug/pprof/heap?format=pprof" + query, timeout=180)
    assert r.status == 200, r.body[:500]
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.body[:2] == b"\x1f\x8b"  # gzip, as go tool pprof expects
    p = Profile.FromString(gzip.decompress(r.body))
    st = list(p.string_table)
    names = {f.id: st[f.name] for f in p.function}
    return p, st, names


def sites(p: Any, names: dict[int, str]) -> dict[str, int]:
    """Bytes in use by the leaf function of each sample."""
    loc = {x.id: names[x.line[0].function_id] for x in p.location}
    out: dict[str, int] = {}
    for s in p.sample:
        leaf = loc[s.location_id[0]]
        out[leaf] = out.get(leaf, 0) + s.value[1]
    return out


def test_pprof_names_the_sessions_allocation_sites(tmp_path: Path) -> None:
    with running(tmp_path, "[api]\nenable_profiling = true\n") as d, sessions_in_data(d, 6):
        p, st, names = decode(d)
        text = get(d, "/debug/pprof/heap?top=50", timeout=180).body.decode()
    assert st[0] == "" and st[p.default_sample_type] == "inuse_space"
    assert [st[t.type] for t in p.sample_type] == ["inuse_objects", "inuse_space"]
    by_site = sites(p, names)
    smtp = {n: b for n, b in by_site.items() if n.startswith("elemta.smtp.")}
    assert smtp, sorted(by_site)[:50]
    # The same allocation sites the text format shows: every elemta.smtp file:line of the
    # text report's top 50 is a location of the profile (its top 1000).
    text_sites = {(f, int(n)) for f, n in
                  re.findall(r'File "[^"]*/elemta/smtp/(\w+)\.py", line (\d+)', text)}
    locations = {(st[f.filename].rsplit("/", 1)[-1][:-3], line.line)
                 for f in p.function for x in p.location for line in x.line
                 if line.function_id == f.id and "/elemta/smtp/" in st[f.filename]}
    assert text_sites and text_sites <= locations, (text_sites - locations)


def test_pprof_bad_format_is_400(tmp_path: Path) -> None:
    with running(tmp_path, "[api]\nenable_profiling = true\n") as d:
        r = get(d, "/debug/pprof/heap?format=svg")
    assert r.status == 400 and r.body == b"format must be text or pprof\n"


def test_pprof_with_workers_labels_each_sample_by_worker(tmp_path: Path) -> None:
    extra = "[server]\nworkers = 2\n[api]\nenable_profiling = true\n"
    with running(tmp_path, extra) as d, sessions_in_data(d, 6):
        p, st, names = decode(d)
        one, st1, _names1 = decode(d, "&worker=2")
        assert get(d, "/debug/pprof/heap?format=pprof&worker=3", timeout=60).status == 400
    workers = {st[lb.str] for s in p.sample for lb in s.label if st[lb.key] == "worker"}
    assert workers == {"1", "2"}
    assert any(n.startswith("elemta.smtp.") for n in sites(p, names))
    assert {st1[lb.str] for s in one.sample for lb in s.label} == {"2"}
