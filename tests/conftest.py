"""Shared fixtures: a real tokenizer, tiny random models of each family built
from configs, the embedded model, and a real in-process gRPC server."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from rome_engine.engine import Engine, EngineLimits
from rome_engine.loading import LoadedModel, ensure_embedded_folder, load_model, wrap_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (byte-level BPE, 49152 tokens); from the folder
    ``$ROMEGW_TOKENIZER`` where set (the GPU machine has no embedded model: bench/gpu.sh)."""
    folder = os.environ.get("ROMEGW_TOKENIZER")
    tok = AutoTokenizer.from_pretrained(folder or ensure_embedded_folder())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(family: str, vocab_size: int):
    """A tiny random config of a supported family (4 layers, width 64)."""
    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if family == "gpt2":
        return GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=256, **common)
    if family == "gptj":
        return GPTJConfig(n_layer=4, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(
            num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=256, **common,
        )
    # rotary models have no position table: a long context lets tests run long streams
    kw = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 128, "max_position_embeddings": 1 << 20, **common}
    if family == "llama":
        return LlamaConfig(**kw)
    if family == "mistral":
        return MistralConfig(**kw)
    if family == "qwen2":
        return Qwen2Config(**kw)
    raise ValueError(family)


def make_tiny(family: str, tokenizer, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32)
    return wrap_model(model, tokenizer, model_id=f"tiny-{family}", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer) -> LoadedModel:
    return make_tiny("gpt2", tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> LoadedModel:
    return make_tiny("llama", tokenizer)


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, float32 on the CPU (shared: tests must leave it unchanged)."""
    return load_model(None, device="cpu", dtype="float32")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose ``schema=`` is new, dropped after the test (skipped without a server)."""
    from tests.pg import fresh_schema_url

    with fresh_schema_url() as url:
        yield url


@pytest.fixture
def serve(tmp_path_factory) -> Iterator[Callable[..., object]]:
    """Start a real gRPC server on a free loopback port: ``srv = serve(loaded, limits=...)``.

    ``edits=True`` gives it an edit manager over ``edit_store`` (default: a fresh
    temporary folder) with ROME caches under ``cache_dir`` (default: a fresh one;
    pass ``default_cache_dir()`` to share statistics of the embedded model).
    """
    from romegw_server.main import ServerConfig, ServerThread, build_engine

    started: list[ServerThread] = []

    def start(
        loaded: LoadedModel,
        limits: EngineLimits | None = None,
        *,
        edits: bool = False,
        edit_store: Path | None = None,
        cache_dir: Path | None = None,
        **extra: object,
    ) -> ServerThread:
        config = ServerConfig(
            host=extra.pop("host", "127.0.0.1"),
            port=0,
            limits=limits or EngineLimits(),
            edit_store=edit_store or tmp_path_factory.mktemp("edits"),
            cache_dir=cache_dir or tmp_path_factory.mktemp("cache"),
            **extra,
        )
        engine = build_engine(loaded, config) if edits else Engine(loaded, config.limits)
        srv = ServerThread(engine, config).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop(grace=0.5)
        srv.engine.close()
        if srv.engine.edits is not None:  # leave shared models as they were found
            srv.engine.edits.activate([], 0)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in name order: equal digests, bit-identical weights."""
    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class BackgroundStream:
    """A Generate stream read to its end on a thread; ``start()`` returns once its first chunk came.

        stream = BackgroundStream(srv.target, "Once upon a time", max_new_tokens=300).start()
        ...                       # the stream is running meanwhile
        out = stream.join(120)    # the whole Completion
    """

    def __init__(self, target: str, prompt: str, *, max_new_tokens: int, timeout: float = 600) -> None:
        self.target, self.prompt, self.max_new_tokens, self.timeout = target, prompt, max_new_tokens, timeout
        self.started = threading.Event()
        self.result: object = None
        self._thread = threading.Thread(target=self._read)

    def _read(self) -> None:
        from romegw_client import Client, Completion

        with Client(self.target, timeout=self.timeout) as c:
            chunks = []
            for chunk in c.generate(self.prompt, max_new_tokens=self.max_new_tokens):
                chunks.append(chunk)
                self.started.set()
            self.result = Completion.join(chunks)

    def start(self, wait: float = 60) -> BackgroundStream:
        self._thread.start()
        assert self.started.wait(wait), "the background stream produced no chunk"
        return self

    def join(self, timeout: float) -> object:
        self._thread.join(timeout)
        return self.result
