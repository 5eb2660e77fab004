"""Generate: single-stream tokens/s through the gateway vs plain ``model.generate``.

Both run greedy on the same model, prompt and length, in the same process
and run; the gateway is driven through the client SDK over loopback.
"""

from __future__ import annotations

import time

import torch

from rome_engine.engine import Engine, EngineLimits
from rome_engine.loading import LoadedModel
from romegw_client import Client
from romegw_server.main import ServerConfig, ServerThread

PROMPT = "The history of the city of Rome begins"


def hf_generate_tps(loaded: LoadedModel, n_tokens: int, repeats: int) -> float:
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(loaded.device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
        rates.append(n_tokens / (time.perf_counter() - t0))
    return max(rates)


def gateway_tps(target: str, n_tokens: int, repeats: int) -> tuple[float, float]:
    """(tokens/s, time to first token in s) of one stream; the EOS is never reached on this prompt
    within n_tokens for the embedded model, and completion_tokens is what is counted."""
    rates, ttfts = [], []
    with Client(target) as c:
        for _ in range(repeats):
            t0 = time.perf_counter()
            first = None
            count = 0
            for chunk in c.generate(PROMPT, max_new_tokens=n_tokens):
                if first is None:
                    first = time.perf_counter() - t0
                count = chunk.completion_tokens or count
            rates.append(count / (time.perf_counter() - t0))
            ttfts.append(first or 0.0)
    return max(rates), min(ttfts)


def run(loaded: LoadedModel, *, n_tokens: int = 64, repeats: int = 3) -> dict:
    hf_generate_tps(loaded, 4, 1)  # warm-up
    engine = Engine(loaded, EngineLimits())
    with ServerThread(engine, ServerConfig(host="127.0.0.1", port=0)) as srv:
        gateway_tps(srv.target, 4, 1)  # warm-up
        gw, ttft = gateway_tps(srv.target, n_tokens, repeats)
    engine.close()
    hf = hf_generate_tps(loaded, n_tokens, repeats)
    return {"tokens": n_tokens, "gateway_tps": gw, "gateway_ttft_s": ttft, "hf_generate_tps": hf, "ratio": gw / hf}
