"""Server reflection under both names: grpc.reflection.v1 and v1alpha.

Clients have moved to v1 (grpcurl, Postman, grpcui try it first); older ones only know
v1alpha. grpcio-reflection ships only a v1alpha servicer; the two protocols are the same
messages under another package, so the one servicer answers both: the v1 method is
registered with the v1alpha messages' (wire-identical) codecs, and a v1 file descriptor
derived from the v1alpha one is added to the pool so that reflection can describe it.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1 = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def enable_reflection(server: grpc.aio.Server, service_names: list[str], pool) -> None:
    """Serve reflection v1 and v1alpha on `server`, listing `service_names` and both."""
    ensure_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer([*service_names, V1, V1ALPHA], pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
    }),))


def ensure_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default pool unless it is there."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name.removeprefix(old)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)
