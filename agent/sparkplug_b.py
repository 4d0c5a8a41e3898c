"""The Sparkplug B payload (``org.eclipse.tahu.protobuf.Payload``) as protobuf message classes.

Built at import from a descriptor that states the part of the published ``sparkplug_b.proto``
(Eclipse Sparkplug 3.0, proto2) this agent writes and reads: ``Payload`` (timestamp, metrics,
seq, uuid, body) and ``Payload.Metric`` (name, alias, timestamp, datatype, the historical,
transient and null flags, and the scalar values of its ``value`` oneof). Field numbers and types
are the specification's, so any Sparkplug host decodes these payloads; the parts left out
(templates, data sets, property sets, metadata) are kept as unknown fields when a host sends
them. The descriptor lives in a pool of its own, so another Sparkplug library in the process
does not clash with it. ``tests/test_sparkplug.py`` checks the bytes against an independent host.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["DataType", "Metric", "Payload"]

_F = descriptor_pb2.FieldDescriptorProto


class DataType:
    """Sparkplug B metric data types (the ``datatype`` field)."""
    Int32 = 3
    Int64 = 4
    UInt32 = 7
    UInt64 = 8
    Float = 9
    Double = 10
    Boolean = 11
    String = 12
    DateTime = 13
    Text = 14


def _field(name: str, number: int, kind: int, label: int = _F.LABEL_OPTIONAL, type_name: str | None = None,
           oneof: int | None = None) -> _F:
    field = _F(name=name, number=number, type=kind, label=label)
    if type_name is not None:
        field.type_name = type_name
    if oneof is not None:
        field.oneof_index = oneof
    return field


def _file() -> descriptor_pb2.FileDescriptorProto:
    metric = descriptor_pb2.DescriptorProto(name="Metric", field=[
        _field("name", 1, _F.TYPE_STRING),
        _field("alias", 2, _F.TYPE_UINT64),
        _field("timestamp", 3, _F.TYPE_UINT64),
        _field("datatype", 4, _F.TYPE_UINT32),
        _field("is_historical", 5, _F.TYPE_BOOL),
        _field("is_transient", 6, _F.TYPE_BOOL),
        _field("is_null", 7, _F.TYPE_BOOL),
        _field("int_value", 10, _F.TYPE_UINT32, oneof=0),
        _field("long_value", 11, _F.TYPE_UINT64, oneof=0),
        _field("float_value", 12, _F.TYPE_FLOAT, oneof=0),
        _field("double_value", 13, _F.TYPE_DOUBLE, oneof=0),
        _field("boolean_value", 14, _F.TYPE_BOOL, oneof=0),
        _field("string_value", 15, _F.TYPE_STRING, oneof=0),
        _field("bytes_value", 16, _F.TYPE_BYTES, oneof=0),
    ], oneof_decl=[descriptor_pb2.OneofDescriptorProto(name="value")])
    payload = descriptor_pb2.DescriptorProto(name="Payload", nested_type=[metric], field=[
        _field("timestamp", 1, _F.TYPE_UINT64),
        _field("metrics", 2, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".org.eclipse.tahu.protobuf.Payload.Metric"),
        _field("seq", 3, _F.TYPE_UINT64),
        _field("uuid", 4, _F.TYPE_STRING),
        _field("body", 5, _F.TYPE_BYTES),
    ])
    return descriptor_pb2.FileDescriptorProto(name="inspection_agent/sparkplug_b.proto",
                                              package="org.eclipse.tahu.protobuf", syntax="proto2",
                                              message_type=[payload])


_pool = descriptor_pool.DescriptorPool()
_pool.Add(_file())
Payload = message_factory.GetMessageClass(_pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload"))
Metric = message_factory.GetMessageClass(_pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload.Metric"))
