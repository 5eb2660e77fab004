"""Where one decode step's time goes: the weight-reading floor vs the model's forward vs the loop.

Per generated token, on the embedded model (float32):

- floor: one matrix-vector product with every weight matrix of the model (the
  work a decode step cannot avoid: it reads every weight once), nothing else;
- forward: one cached forward pass of the model for one token (Hugging Face code);
- rome-gateway: the engine's decode loop (``generate_tokens``), per token;
- model.generate: per token.

Then a torch.profiler table of the decode loop's operators, to show what the
rest of the time is.

    python bench/profile_decode.py [--tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_generate import hf_single_tps, prompt
from bench.bench_memory import weight_bytes
from rome_engine.generation import SamplingParams, cache_kwarg, generate_tokens
from rome_engine.loading import LoadedModel, load_model

PROMPT = prompt(0)  # bench_generate's single-stream prompt


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def floor_seconds(loaded: LoadedModel, repeats: int = 5) -> float:
    """One GEMV per 2-D weight: y = W x with x of the matrix's input width (tied matrices once)."""
    mats = {id(p): p for p in loaded.model.parameters() if p.dim() == 2}.values()
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in mats]

    def step() -> None:
        for w, x in zip(mats, xs, strict=True):
            torch.nn.functional.linear(x, w)

    step()
    return best_of(step, repeats)


@torch.inference_mode()
def forward_seconds(loaded: LoadedModel, repeats: int = 5) -> float:
    model = loaded.model
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    kw = cache_kwarg(model)
    past = getattr(out, kw)
    step = torch.tensor([[int(out.logits[0, -1].argmax())]])

    def one() -> None:  # the cache grows by a token per call: a few tokens more than the prompt
        model(input_ids=step, use_cache=True, **{kw: past})

    one()
    return best_of(one, repeats)


def loop_seconds_per_token(loaded: LoadedModel, tokens: int) -> float:
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    params = SamplingParams(max_new_tokens=tokens)
    list(generate_tokens(loaded, ids, SamplingParams(max_new_tokens=4)))
    t0 = time.perf_counter()
    list(generate_tokens(loaded, ids, params))
    return (time.perf_counter() - t0) / tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--top", type=int, default=15, help="rows of the operator table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(None, device="cpu", dtype="float32")
    n_bytes = weight_bytes(loaded)
    floor = floor_seconds(loaded)
    fwd = forward_seconds(loaded)
    hf_single_tps(loaded, 4, 1)  # warm-up
    hf = 1 / hf_single_tps(loaded, args.tokens, 1)
    ours = loop_seconds_per_token(loaded, args.tokens)
    print(f"torch threads {torch.get_num_threads()}; weights {n_bytes / 2**20:.0f} MiB")
    print(f"{'per token':40s} {'ms':>8s} {'tok/s':>8s}")
    for label, s in [
        ("floor: one GEMV per weight matrix", floor),
        ("one cached forward (HF model code)", fwd),
        ("rome-gateway decode loop", ours),
        ("model.generate", hf),
    ]:
        print(f"{label:40s} {s * 1000:8.1f} {1 / s:8.1f}")
    print(f"weights read at {n_bytes / floor / 1e9:.1f} GB/s by the floor loop")

    ids = loaded.tokenizer(PROMPT)["input_ids"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        list(generate_tokens(loaded, ids, SamplingParams(max_new_tokens=16)))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
