"""``mixrank.v1.RankingService`` on Serve's gRPC server: the servicer function named in
``grpc_options.grpc_servicer_functions`` of deploy/serve.yaml (the Helm chart renders that
entry from the same file).

Serve's gRPC proxy (and, in direct-ingress mode, each replica's own gRPC server) registers
the service through this function and keeps each method's ``request_deserializer``, replacing
only the handler and the response serializer. With the generated
``ranking_pb2_grpc.add_RankingServiceServicer_to_server`` the proxy decodes every request with
``RankRequest.FromString``, and a body protobuf cannot decode fails right there, before any
code of ours runs: the client sees ``UNKNOWN`` ("Unexpected DecodeError") with no JSON body.

Here every method takes its request as the bytes on the wire (no deserializer). The replica
decodes them (``serving.request.proto_dict``: the C reader, protobuf where it is unsure), so
malformed bytes become a ``RequestError`` 400 ``invalid_proto`` -> ``INVALID_ARGUMENT`` with
the JSON error body in the details, like every other refused request. The bytes also cross from
the proxy to the replica as they are: no decode in the proxy, no encode for the pickle, no
re-encode for the C reader.
"""

from __future__ import annotations

import grpc

from serving.proto import ranking_pb2

SERVICE = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"]


def add_RankingServiceServicer_to_server(servicer, server) -> None:
    """Register every method of ``mixrank.v1.RankingService`` on ``server`` with a
    pass-through request deserializer: ``servicer.<Method>(request_bytes, context)``.
    Responses are serialized as the generated code does (Serve replaces that serializer and
    sends the bytes the replica serialized)."""
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=None,  # the handler gets the raw bytes
            response_serializer=getattr(ranking_pb2, m.output_type.name).SerializeToString,
        )
        for m in SERVICE.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    add_registered = getattr(server, "add_registered_method_handlers", None)
    if add_registered is not None:  # grpcio >= 1.62, as the generated code does
        add_registered(SERVICE.full_name, handlers)
