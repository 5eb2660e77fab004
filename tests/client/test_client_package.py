"""The client SDK is its own distribution: grpcio + protobuf, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import tomllib

from romegw_client import GatewayError, InvalidArgument, from_rpc_error

ROOT = Path(__file__).resolve().parents[2]

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'rome_engine', 'numpy'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import romegw_client
from romegw_client import Client, AsyncClient
c = Client('127.0.0.1:1')
c.close()
assert 'torch' not in sys.modules
print('ok')
"""


def test_client_imports_with_torch_absent() -> None:
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_client_distribution_depends_on_grpcio_and_protobuf_only() -> None:
    meta = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in meta["project"]["dependencies"]}
    assert deps == {"grpcio", "protobuf"}
    assert meta["project"]["name"] == "romegw-client"


def test_rpc_errors_become_typed_exceptions() -> None:
    class FakeError(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self) -> str:
            return "top_p must be in (0, 1]"

    exc = from_rpc_error(FakeError())
    assert isinstance(exc, InvalidArgument) and isinstance(exc, GatewayError)
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.message == "top_p must be in (0, 1]"
    assert "INVALID_ARGUMENT" in str(exc)
