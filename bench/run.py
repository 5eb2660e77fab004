"""The benchmark suite: each figure beside its baseline, measured in the same run.

python bench/run.py            # full run, prints tables, writes bench/results.json
python bench/run.py --smoke    # a quick pass of every section (CI), numbers not meaningful
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_edits, bench_generate, bench_load, bench_memory, bench_rome, bench_trace, bench_versions
from bench.common import machine, print_table, write_json
from rome_engine.loading import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every section runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--baseline-ref", help="git commit whose server runs the edit-under-load baseline")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tree = bench_versions.extract_tree(args.baseline_ref, Path(tmp)) if args.baseline_ref else None
        return run_all(args, tree)


def run_all(args: argparse.Namespace, baseline_tree: Path | None) -> int:
    logging.basicConfig(level=logging.WARNING)

    results: dict[str, object] = {"machine": machine(), "smoke": args.smoke}
    print("machine:", results["machine"])

    load = bench_load.run(first=not args.smoke)
    results["load"] = load
    print_table(
        "Model load (embedded SmolLM2-135M-Instruct)",
        [
            ("first start, GGUF conversion (s)", f"{load.get('first_start_s', float('nan')):.1f}", "-", "-"),
            ("cached start (s)", f"{load['cached_start_s']:.1f}", "-", "-"),
        ],
    )

    loaded = load_model(None, device="cpu", dtype="float32")
    gen = bench_generate.run(
        loaded,
        n_tokens=8 if args.smoke else 64,
        repeats=1 if args.smoke else 3,
        concurrency=(1, 2) if args.smoke else (1, 4, 8, 16),
    )
    results["generate_single"] = gen
    print_table(
        f"Generate, one stream, greedy, {gen['tokens']} tokens",
        [
            (
                "tokens/s (vs model.generate)",
                f"{gen['gateway_tps']:.1f}",
                f"{gen['hf_generate_tps']:.1f}",
                f"{gen['ratio']:.2f}x",
            ),
            ("time to first token (s)", f"{gen['gateway_ttft_s']:.3f}", "-", "-"),
        ],
    )
    rows = []
    for r in gen["concurrent"]:
        n = r["streams"]
        rows.append(
            (
                f"{n} streams: aggregate tokens/s vs model.generate x1",
                f"{r['tokens_per_s']:.1f}",
                f"{gen['hf_generate_tps']:.1f}",
                f"{r['tokens_per_s'] / gen['hf_generate_tps']:.2f}x",
            )
        )
        rows.append(
            (
                f"{n} streams: vs model.generate, {n} prompts batched by hand",
                f"{r['tokens_per_s']:.1f}",
                f"{r['hf_batched_tps']:.1f}",
                f"{r['tokens_per_s'] / r['hf_batched_tps']:.2f}x",
            )
        )
        rows.append((f"{n} streams: TTFT p50 / p95 (s)", f"{r['ttft_p50']:.3f} / {r['ttft_p95']:.3f}", "-", "-"))
        rows.append((f"{n} streams: inter-token p50 / p95 (s)", f"{r['itl_p50']:.3f} / {r['itl_p95']:.3f}", "-", "-"))
    print_table("Generate, concurrent streams (continuous batching)", rows)

    if args.smoke:  # a 2-token prompt keeps the per-position baseline short
        trace = bench_trace.run(loaded, samples=2, kinds=("mlp",), fact=("Rome is", "Rome"))
    else:
        trace = bench_trace.run(loaded, samples=10, kinds=("hidden", "mlp"))
    results["trace"] = trace
    print_table(
        "Trace, full grid, 'The Eiffel Tower is in' (vs one forward per (token, layer), samples as the batch)",
        [
            (
                f"{k}: seconds (forward passes)",
                f"{t['batched_s']:.1f} ({t['batched_passes']})",
                f"{t['per_position_s']:.1f} ({t['per_position_passes']})",
                f"{t['per_position_s'] / t['batched_s']:.2f}x",
            )
            for k, t in trace.items()
        ]
        + [(f"{k}: max |difference|", f"{t['max_abs_diff']:.1e}", "-", "-") for k, t in trace.items()],
    )
    # smoke: a small C and few steps (the statistics of the full default take minutes on a fresh machine)
    fast = {"mom2_n_tokens": 2048, "mom2_seq_len": 64, "v_num_grad_steps": 3} if args.smoke else None
    rome = bench_rome.run(loaded, hparams=fast, c_tokens=500 if args.smoke else 10_000)
    results["rome"] = rome
    variants = rome["edit"]["variants"]
    gateway_label = next(iter(variants))
    gateway_s = variants[gateway_label]["seconds"]
    cov = rome["covariance"]
    print_table(
        f"ROME compute, 'The Eiffel Tower is in' -> ' Rome' at layer {rome['edit']['layer']} (C and prefixes cached)",
        [
            (
                f"seconds per edit: {gateway_label} vs {label}",
                f"{gateway_s:.2f}",
                f"{v['seconds']:.2f}",
                f"{v['seconds'] / gateway_s:.2f}x",
            )
            for label, v in list(variants.items())[1:]
        ]
        + [
            ("v* steps / largest relative difference of the update (v* - W k*)",
             f"{variants[gateway_label]['v_steps']}", f"{max(v['rel_diff_left'] for v in variants.values()):.1e}", "-"),
            (f"C of layer {cov['layer']}: seconds per 10k tokens (stopped after the layer vs whole model)",
             f"{cov['stopped_s_per_10k']:.1f}", f"{cov['full_s_per_10k']:.1f}",
             f"{cov['full_s_per_10k'] / cov['stopped_s_per_10k']:.2f}x"),
        ],  # fmt: skip
    )
    edits = bench_edits.run(
        loaded, hparams=fast, reverts=2 if args.smoke else 5, stream_tokens=4 if args.smoke else 16
    )
    results["edits"] = edits
    print_table(
        "Edits under traffic (embedded model, C cached)",
        [
            (
                "ApplyEdit, seconds (compute)",
                f"{edits['apply_seconds']:.1f} ({edits['compute_seconds']:.1f})",
                "-",
                "-",
            ),
            ("layer file size (bytes)", f"{edits['layer_file_bytes']}", "-", "-"),
            (
                "RevertEdit latency, median / max (ms)",
                f"{edits['revert_ms_median']:.1f} / {edits['revert_ms_max']:.1f}",
                "-",
                "-",
            ),
            ("stored -> live (s)", f"{edits['live_seconds']:.3f}", "-", "-"),
            (
                "longest token gap of a stream: during the edit vs before (s)",
                f"{edits['stream_max_gap_during_edit_s']:.3f}",
                f"{edits['stream_max_gap_before_s']:.3f}",
                f"{edits['stream_max_gap_during_edit_s'] / edits['stream_max_gap_before_s']:.1f}x",
            ),
        ],
    )
    versions = bench_versions.run(
        loaded, hparams=fast, streams=2 if args.smoke else 16, tokens=8 if args.smoke else 512,
        baseline_tree=baseline_tree,
    )  # fmt: skip
    results["versions"] = versions
    print_table("Edits under load: live without a drain (16 streams of 512 tokens, short requests every 0.2 s)",
                bench_versions.table(versions))
    mem = bench_memory.run(loaded, streams=2 if args.smoke else 8, tokens=4 if args.smoke else 32, hparams=fast)
    results["memory"] = mem
    mib = 2**20
    print_table(
        "Memory of a `rome-gateway serve` process (streams, an edit and its revert)",
        [
            ("peak resident memory vs the weights (MiB)", f"{mem['peak_rss_bytes'] / mib:.0f}",
             f"{mem['weight_bytes'] / mib:.0f}", f"{mem['ratio']:.2f}x"),
            ("resident memory when ready (MiB)", f"{mem['rss_ready_bytes'] / mib:.0f}", "-", "-"),
        ],  # fmt: skip
    )
    write_json(args.out, results)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
