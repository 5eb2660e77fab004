"""Causal tracing: the batched grid against the per-position reference, in one run.

Both compute the same (T, L) grid of restored probabilities with the same noise
draws (the script checks that they agree); the reference runs one forward pass
per (token, layer) cell with the noise samples as the batch.

    python bench/bench_trace.py                    # embedded model, mlp grid, 10 samples
    python bench/bench_trace.py --kind hidden --samples 5
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rome_engine.loading import LoadedModel, load_model
from rome_engine.tracing import NoiseCache, TraceRequest, trace, trace_per_position


def run(
    loaded: LoadedModel,
    *,
    samples: int = 10,
    kinds: tuple[str, ...] = ("hidden", "mlp"),
    fact: tuple[str, str] = ("The Eiffel Tower is in", "The Eiffel Tower"),
) -> dict[str, dict[str, object]]:
    """The suite's trace section: the full grid of each kind, batched vs per-position."""
    out = {}
    for kind in kinds:
        r = compare(loaded, TraceRequest(fact[0], fact[1], kind=kind, samples=samples))
        out[kind] = {
            "batched_s": r["batched_s"],
            "batched_passes": r["batched_forward_passes"],
            "per_position_s": r["per_position_s"],
            "per_position_passes": r["per_position_forward_passes"],
            "max_abs_diff": r["max_abs_diff"],
        }
    return out


def compare(loaded: LoadedModel, req: TraceRequest, *, max_batch_rows: int = 128) -> dict[str, object]:
    noise = NoiseCache()
    noise.get(loaded)  # computed once, outside both timings
    t0 = time.perf_counter()
    batched = trace(loaded, req, noise_cache=noise, max_batch_rows=max_batch_rows)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = trace_per_position(loaded, req, noise_cache=noise)
    reference_s = time.perf_counter() - t0
    return {
        "tokens": len(batched.tokens),
        "layers": batched.scores.shape[1],
        "samples": req.samples,
        "batched_s": batched_s,
        "batched_forward_passes": batched.forward_passes,
        "per_position_s": reference_s,
        "per_position_forward_passes": reference.forward_passes,
        "speedup": reference_s / batched_s,
        "max_abs_diff": float((batched.scores - reference.scores).abs().max()),
        "peak": batched.peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="folder or hub id (default: the embedded model)")
    parser.add_argument("--prompt", default="The Eiffel Tower is in")
    parser.add_argument("--subject", default="The Eiffel Tower")
    parser.add_argument("--kind", default="mlp", choices=["hidden", "mlp", "attn"])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--max-batch-rows", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    loaded = load_model(args.model, device=args.device, dtype="float32")
    req = TraceRequest(args.prompt, args.subject, kind=args.kind, samples=args.samples)
    r = compare(loaded, req, max_batch_rows=args.max_batch_rows)
    print(
        f"model {loaded.model_id} on {loaded.device}; {args.kind} grid of {r['tokens']} tokens x {r['layers']} layers"
    )
    print(f"samples {r['samples']}, max batch rows {args.max_batch_rows}")
    print(f"batched:      {r['batched_s']:8.2f} s  ({r['batched_forward_passes']} forward passes)")
    print(f"per-position: {r['per_position_s']:8.2f} s  ({r['per_position_forward_passes']} forward passes)")
    print(f"speedup:      {r['speedup']:8.2f}x  (max |difference| {r['max_abs_diff']:.2e}, peak {r['peak']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
