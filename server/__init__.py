"""romegw_server: the gRPC front of rome-gateway (installed from the ``server/`` folder).

Modules: convert (protobuf <-> engine types), servicer (the RPC handlers),
interceptors (engine errors -> gRPC statuses), main (wiring, health,
reflection, shutdown), cli (the ``rome-gateway`` command: ``serve`` and the
in-process jobs here, the client commands from ``romegw_client.cli``).
"""
