"""observe/pprof.py's hand-written encoder, read back by protobuf's own decoder."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("google.protobuf", reason="protobuf (the test extra) decodes the profile")
from elemta.observe.pprof import HeapSample, _varint, encode, module_name
from profile_proto import Profile

HERE = str(Path(__file__).resolve())


def _site() -> int:
    return 1  # a known function on a known line of this file, for the profile below


SITE_LINE = _site.__code__.co_firstlineno + 1


def test_varints_as_protobuf_writes_them() -> None:
    assert _varint(0) == b"\x00" and _varint(1) == b"\x01" and _varint(300) == b"\xac\x02"
    assert _varint(-1) == b"\xff" * 9 + b"\x01"


def test_profile_decodes_with_the_proto_definitions() -> None:
    samples = [
        HeapSample(((HERE, SITE_LINE), (HERE, 1)), size=4096, count=2),
        HeapSample(((HERE, SITE_LINE),), size=100, count=1, labels=(("worker", "3"),)),
    ]
    p = Profile.FromString(gzip.decompress(encode(samples, time_nanos=123, comments=["hi"])))
    st = list(p.string_table)
    assert st[0] == ""
    assert [(st[v.type], st[v.unit]) for v in p.sample_type] == [
        ("inuse_objects", "count"), ("inuse_space", "bytes")]
    assert st[p.default_sample_type] == "inuse_space" and p.time_nanos == 123
    assert (st[p.period_type.type], st[p.period_type.unit], p.period) == ("space", "bytes", 1)
    assert [st[c] for c in p.comment] == ["hi"]
    assert [list(s.value) for s in p.sample] == [[2, 4096], [1, 100]]
    locations = {loc.id: loc for loc in p.location}
    functions = {f.id: f for f in p.function}
    leaf = locations[p.sample[0].location_id[0]]
    fn = functions[leaf.line[0].function_id]
    assert leaf.line[0].line == SITE_LINE
    assert st[fn.name] == f"{module_name(HERE)}:_site" and st[fn.system_name] == "_site"
    assert st[fn.filename] == HERE and fn.start_line == SITE_LINE - 1
    caller = functions[locations[p.sample[0].location_id[1]].line[0].function_id]
    assert st[caller.name].endswith(":<module>")
    assert p.sample[1].location_id[0] == p.sample[0].location_id[0]  # one location per site
    (label,) = p.sample[1].label
    assert (st[label.key], st[label.str]) == ("worker", "3")


def test_module_names() -> None:
    assert module_name("/usr/lib/python3/dist-packages/elemta/smtp/server.py") == \
        "elemta.smtp.server"
    assert module_name("/usr/lib/python3.11/asyncio/streams.py") == "asyncio.streams"
    assert module_name("/work/src/elemta/cli.py") == "elemta.cli"
