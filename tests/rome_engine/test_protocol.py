"""``Engine`` implements ``EngineClient``, the interface the server is typed against."""

from __future__ import annotations

import inspect
import subprocess
import sys

from rome_engine.engine import Engine, EngineLimits
from rome_engine.protocol import EngineClient


def test_the_engine_implements_the_protocol(tiny_llama) -> None:
    engine = Engine(tiny_llama, EngineLimits(max_batch_size=0))
    try:
        assert isinstance(engine, EngineClient)
        for name in ("generate", "trace"):  # streams: async iterators, as the protocol says
            assert inspect.isasyncgenfunction(getattr(Engine, name))
        for name in ("score", "apply_edits", "revert_edit", "list_edits", "get_edit", "export_edits", "import_edits"):
            assert inspect.iscoroutinefunction(getattr(Engine, name))
            assert inspect.iscoroutinefunction(getattr(EngineClient, name))
    finally:
        engine.close()


def test_the_protocol_loads_no_torch() -> None:
    code = "import rome_engine.protocol, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
