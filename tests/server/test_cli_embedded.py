"""End to end on the embedded model: ``rome-gateway serve`` as a process, then the SDK and the CLI."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench.common import free_port, gateway_command, wait_until_serving
from romegw_client import Client

pytestmark = pytest.mark.embedded


def test_serve_embedded_then_generate_paris(tmp_path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen([*gateway_command(), "serve", "--port", str(port)], stdout=f, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    try:
        wait_until_serving(target, proc, log, timeout=240)  # the first start converts the GGUF file (~40 s)
        with Client(target, timeout=5) as c:
            out = c.generate_text("The capital of France is", max_new_tokens=8)
            assert out.text.startswith(" Paris"), out.text
            info = c.model_info()
            assert info.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
            assert info.family == "llama" and info.num_layers == 30
        printed = subprocess.run(
            [*gateway_command(), "generate", "The capital of France is", "--max-new-tokens", "3", "--target", target],
            capture_output=True, text=True, timeout=120, env={**os.environ},
        )
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.startswith(" Paris")
        text = log.read_text()
        for fragment in ("model HuggingFaceTB/SmolLM2-135M-Instruct", "device=cpu", "dtype=float32",
                         "parameters", "loaded in", f"listening on 127.0.0.1:{port}"):
            assert fragment in text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert "stopped" in log.read_text()
