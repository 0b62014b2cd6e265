"""The pprof format for /debug/pprof/heap?format=pprof: a gzipped perftools.profiles.Profile.

Written by hand from profile.proto (github.com/google/pprof/proto/profile.proto) with a small
protobuf writer (varints and length-delimited fields), so `go tool pprof` and every pprof viewer
read elemta's tracemalloc profile without a new dependency. Sample types are those of a Go heap
profile's in-use half: inuse_objects (count) and inuse_space (bytes), the default.

tracemalloc frames carry a file and a line, not a function: the function of each line is found
by parsing the file (ast) once per profile, so a location reads
`elemta.smtp.server:Session._read_data` rather than a bare line number.
"""

from __future__ import annotations

import ast
import gzip
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Frame = tuple[str, int]  # (filename, line)


@dataclass(frozen=True)
class HeapSample:
    frames: tuple[Frame, ...]  # the allocation site first, its callers after
    size: int  # bytes in use
    count: int  # blocks in use
    labels: tuple[tuple[str, str], ...] = ()


# -- protobuf wire format ------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 fields: two's complement, ten bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class _Message:
    def __init__(self) -> None:
        self.buf = bytearray()

    def varint(self, field_no: int, value: int) -> _Message:
        """A varint field (int64, uint64, bool); zero is the default and is left out."""
        if value:
            self.buf += _varint(field_no << 3) + _varint(value)
        return self

    def packed(self, field_no: int, values: Sequence[int]) -> _Message:
        if values:
            self.data(field_no, b"".join(_varint(v) for v in values))
        return self

    def data(self, field_no: int, data: bytes) -> _Message:
        self.buf += _varint(field_no << 3 | 2) + _varint(len(data)) + data
        return self

    def message(self, field_no: int, m: _Message) -> _Message:
        return self.data(field_no, bytes(m.buf))


# -- function names ---------------------------------------------------------------------------------

# Function spans of the files seen, kept between requests: parsing a file costs ~10 ms, and the
# same few hundred files (elemta, asyncio, the standard library) appear in every profile.
MAX_CACHED_FILES = 1024
_SPANS: dict[tuple[str, int, int], list[tuple[int, int, str]]] = {}


@dataclass
class _Functions:
    """Innermost def/class around each line of a file, by parsing it (once per profile)."""

    spans: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)

    def _parse(self, filename: str) -> list[tuple[int, int, str]]:
        try:
            st = os.stat(filename)
        except OSError:
            return []
        key = (filename, st.st_mtime_ns, st.st_size)
        cached = _SPANS.get(key)
        if cached is None:
            cached = _SPANS[key] = self._spans(filename)
            if len(_SPANS) > MAX_CACHED_FILES:
                del _SPANS[next(iter(_SPANS))]
        return cached

    @staticmethod
    def _spans(filename: str) -> list[tuple[int, int, str]]:
        try:
            tree = ast.parse(Path(filename).read_bytes())
        except (OSError, SyntaxError, ValueError):
            return []
        spans: list[tuple[int, int, str]] = []

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = prefix + child.name
                    spans.append((child.lineno, child.end_lineno or child.lineno, name))
                    walk(child, name + ".")
                else:
                    walk(child, prefix)

        walk(tree, "")
        return spans

    def name(self, filename: str, line: int) -> tuple[str, int]:
        """(qualified name, its first line); ("<module>", 0) outside every def."""
        if filename not in self.spans:
            self.spans[filename] = self._parse(filename)
        best: tuple[int, int, str] | None = None
        for start, end, name in self.spans[filename]:
            if start <= line <= end and (best is None or start >= best[0]):
                best = (start, end, name)
        return (best[2], best[0]) if best else ("<module>", 0)


def module_name(filename: str) -> str:
    """'elemta.smtp.server' from .../site-packages/elemta/smtp/server.py; else the file's stem."""
    parts = Path(filename).with_suffix("").parts
    for anchor in ("site-packages", "dist-packages", "src"):
        if anchor in parts:
            return ".".join(parts[len(parts) - parts[::-1].index(anchor):])
    if "lib" in parts and len(parts) > parts.index("lib") + 2:  # /usr/lib/python3.11/asyncio/x.py
        return ".".join(parts[parts.index("lib") + 2:])
    return Path(filename).stem


# -- the profile ------------------------------------------------------------------------------------

def encode(samples: Iterable[HeapSample], *, time_nanos: int | None = None,
           comments: Sequence[str] = ()) -> bytes:
    """The gzipped Profile message for `samples`."""
    strings: dict[str, int] = {"": 0}

    def s(text: str) -> int:
        return strings.setdefault(text, len(strings))

    names = _Functions()
    functions: dict[tuple[str, str], int] = {}
    function_msgs: list[_Message] = []
    locations: dict[Frame, int] = {}
    location_msgs: list[_Message] = []
    profile = _Message()
    for type_, unit in (("inuse_objects", "count"), ("inuse_space", "bytes")):
        profile.message(1, _Message().varint(1, s(type_)).varint(2, s(unit)))
    for sample in samples:
        ids = []
        for filename, line in sample.frames:
            frame = (filename, line)
            loc = locations.get(frame)
            if loc is None:
                qualname, start = names.name(filename, line)
                key = (filename, qualname)
                fid = functions.get(key)
                if fid is None:
                    fid = functions[key] = len(functions) + 1
                    function_msgs.append(
                        _Message().varint(1, fid).varint(2, s(f"{module_name(filename)}:{qualname}"))
                        .varint(3, s(qualname)).varint(4, s(filename)).varint(5, start))
                loc = locations[frame] = len(locations) + 1
                location_msgs.append(_Message().varint(1, loc).message(
                    4, _Message().varint(1, fid).varint(2, line)))
            ids.append(loc)
        msg = _Message().packed(1, ids).packed(2, [sample.count, sample.size])
        for label, value in sample.labels:
            msg.message(3, _Message().varint(1, s(label)).varint(2, s(value)))
        profile.message(2, msg)
    for m in location_msgs:
        profile.message(4, m)
    for m in function_msgs:
        profile.message(5, m)
    comment_ids = [s(c) for c in comments]
    period_type = _Message().varint(1, s("space")).varint(2, s("bytes"))
    default_type = s("inuse_space")
    for text in strings:  # insertion order is index order; "" first
        profile.data(6, text.encode())
    profile.varint(9, time.time_ns() if time_nanos is None else time_nanos)
    profile.message(11, period_type)
    profile.varint(12, 1)  # tracemalloc traces every allocation: no sampling
    profile.packed(13, comment_ids)
    profile.varint(14, default_type)
    return gzip.compress(bytes(profile.buf), mtime=0)
