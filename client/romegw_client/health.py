"""The standard gRPC health check (grpc.health.v1), without grpcio-health-checking.

The two messages are declared in a private descriptor pool, so this module
never clashes with the grpc_health package a server process may also import.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _build_messages() -> tuple[type, type]:
    f = descriptor_pb2.FileDescriptorProto(name="romegw_client/health_check.proto", package="grpc.health.v1")
    req = f.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    resp = f.message_type.add(name="HealthCheckResponse")
    # the status enum travels as a varint; an int32 reads the same bytes
    resp.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
                   label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    classes = message_factory.GetMessages([f], pool=pool)
    return classes["grpc.health.v1.HealthCheckRequest"], classes["grpc.health.v1.HealthCheckResponse"]


HealthCheckRequest, HealthCheckResponse = _build_messages()


def check_method(channel: object) -> object:
    """A unary callable for Health/Check on a sync or aio channel."""
    return channel.unary_unary(  # type: ignore[attr-defined]
        CHECK_METHOD,
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )
