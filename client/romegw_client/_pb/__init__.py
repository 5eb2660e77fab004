"""Generated gRPC stubs (see client/gen_stubs.py)."""
