"""perftools.profiles.Profile (github.com/google/pprof/proto/profile.proto) as protobuf message
classes built at run time from descriptors (no protoc): an independent decoder for the tests of
elemta's hand-written pprof encoder. Needs `protobuf` (the test extra)."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_T = descriptor_pb2.FieldDescriptorProto

# name: [(field name, number, type, repeated, message type)]
_MESSAGES: dict[str, list[tuple[str, int, int, bool, str]]] = {
    "Profile": [
        ("sample_type", 1, _T.TYPE_MESSAGE, True, "ValueType"),
        ("sample", 2, _T.TYPE_MESSAGE, True, "Sample"),
        ("mapping", 3, _T.TYPE_MESSAGE, True, "Mapping"),
        ("location", 4, _T.TYPE_MESSAGE, True, "Location"),
        ("function", 5, _T.TYPE_MESSAGE, True, "Function"),
        ("string_table", 6, _T.TYPE_STRING, True, ""),
        ("drop_frames", 7, _T.TYPE_INT64, False, ""),
        ("keep_frames", 8, _T.TYPE_INT64, False, ""),
        ("time_nanos", 9, _T.TYPE_INT64, False, ""),
        ("duration_nanos", 10, _T.TYPE_INT64, False, ""),
        ("period_type", 11, _T.TYPE_MESSAGE, False, "ValueType"),
        ("period", 12, _T.TYPE_INT64, False, ""),
        ("comment", 13, _T.TYPE_INT64, True, ""),
        ("default_sample_type", 14, _T.TYPE_INT64, False, ""),
    ],
    "ValueType": [("type", 1, _T.TYPE_INT64, False, ""), ("unit", 2, _T.TYPE_INT64, False, "")],
    "Sample": [
        ("location_id", 1, _T.TYPE_UINT64, True, ""),
        ("value", 2, _T.TYPE_INT64, True, ""),
        ("label", 3, _T.TYPE_MESSAGE, True, "Label"),
    ],
    "Label": [("key", 1, _T.TYPE_INT64, False, ""), ("str", 2, _T.TYPE_INT64, False, ""),
              ("num", 3, _T.TYPE_INT64, False, ""), ("num_unit", 4, _T.TYPE_INT64, False, "")],
    "Mapping": [("id", 1, _T.TYPE_UINT64, False, ""), ("memory_start", 2, _T.TYPE_UINT64, False, ""),
                ("memory_limit", 3, _T.TYPE_UINT64, False, ""),
                ("file_offset", 4, _T.TYPE_UINT64, False, ""),
                ("filename", 5, _T.TYPE_INT64, False, ""), ("build_id", 6, _T.TYPE_INT64, False, ""),
                ("has_functions", 7, _T.TYPE_BOOL, False, "")],
    "Location": [
        ("id", 1, _T.TYPE_UINT64, False, ""), ("mapping_id", 2, _T.TYPE_UINT64, False, ""),
        ("address", 3, _T.TYPE_UINT64, False, ""),
        ("line", 4, _T.TYPE_MESSAGE, True, "Line"), ("is_folded", 5, _T.TYPE_BOOL, False, ""),
    ],
    "Line": [("function_id", 1, _T.TYPE_UINT64, False, ""), ("line", 2, _T.TYPE_INT64, False, ""),
             ("column", 3, _T.TYPE_INT64, False, "")],
    "Function": [("id", 1, _T.TYPE_UINT64, False, ""), ("name", 2, _T.TYPE_INT64, False, ""),
                 ("system_name", 3, _T.TYPE_INT64, False, ""),
                 ("filename", 4, _T.TYPE_INT64, False, ""),
                 ("start_line", 5, _T.TYPE_INT64, False, "")],
}


def _build() -> Any:
    f = descriptor_pb2.FileDescriptorProto(name="profile.proto", package="perftools.profiles",
                                           syntax="proto3")
    for name, fields in _MESSAGES.items():
        m = f.message_type.add(name=name)
        for fname, number, ftype, repeated, mtype in fields:
            field = m.field.add(name=fname, number=number, type=ftype,
                                label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL)
            if mtype:
                field.type_name = f".perftools.profiles.{mtype}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("perftools.profiles.Profile"))


Profile = _build()
