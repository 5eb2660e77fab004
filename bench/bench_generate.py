"""Generate: tokens/s through the gateway vs plain ``model.generate``, in the same run.

The gateway is a ``rome-gateway serve`` process (as in production: its own
interpreter, not sharing a GIL with the benchmark's client threads), reached
through the client SDK over loopback.

- one stream: the gateway vs ``model.generate`` (greedy, same prompt, same length);
- N concurrent streams (1, 4, 8, 16): the gateway's aggregate tokens/s vs single-stream ``model.generate``
  and vs ``model.generate`` on the same N prompts batched by hand (left padding) - the best a user could do;
  p50/p95 time to first token and inter-token latency of the gateway's streams.
"""

from __future__ import annotations

import threading
import time

import torch

from bench.common import percentile, served
from rome_engine.loading import LoadedModel
from romegw_client import Client

PROMPTS = [
    "The history of the city of Rome begins",
    "The best way to learn a new language is",
    "Once upon a time, in a small village,",
    "The main ingredients of a good bread are",
    "In the morning, the market square",
    "Scientists have recently discovered that",
    "The old lighthouse keeper looked at",
    "A short guide to the planets of",
]


def prompt(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)]


def hf_single_tps(loaded: LoadedModel, n_tokens: int, repeats: int) -> float:
    ids = loaded.tokenizer(prompt(0), return_tensors="pt")["input_ids"].to(loaded.device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
        rates.append(n_tokens / (time.perf_counter() - t0))
    return max(rates)


def hf_batched_tps(loaded: LoadedModel, n_streams: int, n_tokens: int) -> float:
    tok = loaded.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = tok([prompt(i) for i in range(n_streams)], return_tensors="pt", padding=True).to(loaded.device)
    finally:
        tok.padding_side = side
    t0 = time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(
            **batch, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return n_streams * n_tokens / (time.perf_counter() - t0)


def gateway_concurrent(target: str, n_streams: int, n_tokens: int) -> dict:
    ttfts: list[float] = []
    gaps: list[float] = []
    counts: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n_streams)

    def one(i: int) -> None:
        with Client(target, timeout=600) as c:
            barrier.wait()
            t0 = last = time.perf_counter()
            first, n = None, 0
            mine: list[float] = []
            for chunk in c.generate(prompt(i), max_new_tokens=n_tokens):
                now = time.perf_counter()
                if chunk.token_ids:
                    if first is None:
                        first = now - t0
                    else:
                        mine.append(now - last)
                    last = now
                    n += len(chunk.token_ids)
            with lock:
                ttfts.append(first or float("nan"))
                gaps.extend(mine)
                counts.append(n)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "streams": n_streams,
        "tokens": sum(counts),
        "tokens_per_s": sum(counts) / wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "itl_p50": percentile(gaps, 50),
        "itl_p95": percentile(gaps, 95),
    }


def run(
    loaded: LoadedModel, *, n_tokens: int = 64, repeats: int = 3, concurrency: tuple[int, ...] = (1, 4, 8, 16)
) -> dict:
    hf_single_tps(loaded, 4, 1)  # warm-up
    # the baseline first: measured after a server has run in this process it reads 10x slower here
    hf_single = hf_single_tps(loaded, n_tokens, repeats)
    out: dict = {"tokens": n_tokens, "concurrent": []}
    with served("--max-concurrent-streams", str(max(concurrency) + 2)) as (target, _proc):
        gateway_concurrent(target, 1, 4)  # warm-up
        single = [gateway_concurrent(target, 1, n_tokens) for _ in range(repeats)]
        out["gateway_tps"] = max(s["tokens_per_s"] for s in single)
        out["gateway_ttft_s"] = min(s["ttft_p50"] for s in single)
        for n in concurrency:
            # alternate the two, best of each: this machine's speed drifts by 10-20% between runs
            rows, batched = [], []
            for _ in range(min(repeats, 2)):
                rows.append(gateway_concurrent(target, n, n_tokens))
                batched.append(hf_batched_tps(loaded, n, n_tokens))
            row = max(rows, key=lambda r: r["tokens_per_s"])
            row["hf_batched_tps"] = max(batched)
            out["concurrent"].append(row)
    out["hf_generate_tps"] = hf_single
    out["ratio"] = out["gateway_tps"] / out["hf_generate_tps"]
    return out
