"""The generated gRPC stubs of the gateway's wire contract, under a public name.

The modules themselves are generated from ``proto/`` into ``_pb/`` (``client/gen_stubs.py``,
git-ignored); this module is the one both the SDK and the server import them by:

    from romegw_client.pb import gateway_pb2 as pb, gateway_pb2_grpc as pb_grpc
"""

from ._pb import gateway_pb2, gateway_pb2_grpc

__all__ = ["gateway_pb2", "gateway_pb2_grpc"]
