"""The GPU proof's measurements (issue #15), run by ``bench/gpu.sh``: paper-scale shapes on one GPU.

GPT-2 XL (1.5B) and GPT-J-6B are built from their configs with random weights, in bfloat16 on
the GPU (no download). On each:

- one ROME edit with C given (a random symmetric positive definite C put in the cache: the
  timing does not depend on its values), against the ROME paper's ~2 s on an A6000 (GPT-2 XL)
  and EasyEdit's 4.8 s (GPT-2 XL) / 13.9 s (GPT-J) on an A100; prefixes warmed by one edit first;
- the full causal-trace grid (hidden states, 10 noise samples) of a 10-token prompt, batched
  against one forward pass per (token, layer) cell.

On GPT-2 XL, through a real ``rome-gateway serve`` process (the model saved to a folder first):
Generate tokens/s at 1, 16 and 64 concurrent streams against ``model.generate`` alone and on
the same prompts batched by hand; and the server's peak GPU memory (the
``romegw_gpu_memory_peak_allocated_bytes`` gauge) after 16 streams of 512 tokens, against the
weights' bytes.

``--cpu-dry-run`` runs every step with tiny shapes of the same families on the CPU (bfloat16
too), so that the script cannot rot; its numbers mean nothing.

    python bench/bench_gpu.py --out DIR            # on the GPU machine (bench/gpu.sh)
    python bench/bench_gpu.py --cpu-dry-run --out DIR
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTJConfig  # noqa: E402

from bench.bench_generate import gateway_concurrent, hf_batched_tps, hf_single_tps  # noqa: E402
from bench.bench_memory import proc_status_kib, weight_bytes  # noqa: E402
from bench.bench_trace import compare  # noqa: E402
from bench.common import free_port, machine, print_table, served, table_markdown, write_json  # noqa: E402
from rome_engine.loading import LoadedModel, ensure_embedded_folder, wrap_model  # noqa: E402
from rome_engine.rome import EditRequest, RomeCache, compute_edit, hparams_for  # noqa: E402
from rome_engine.rome.covariance import covariance_path  # noqa: E402
from rome_engine.tracing import TraceRequest  # noqa: E402

log = logging.getLogger("bench_gpu")

EDIT = ("The Eiffel Tower is in", "The Eiffel Tower", " Rome")
TRACE_PROMPT = ("The Eiffel Tower is located in the city of", "The Eiffel Tower")  # 10 tokens
# (published seconds per ROME edit, where): the baselines the issue names
BASELINES = {
    "gpt2-xl": [("ROME paper, A6000", 2.0), ("EasyEdit, A100", 4.8)],
    "gpt-j-6b": [("EasyEdit, A100", 13.9)],
}


def config(shape: str, vocab: int, dry: bool):
    if shape == "gpt2-xl":
        if dry:
            return GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=1024, vocab_size=vocab)
        return GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257)
    if dry:
        return GPTJConfig(n_layer=4, n_embd=64, n_head=4, rotary_dim=8, n_positions=1024, vocab_size=vocab)
    return GPTJConfig(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, n_positions=2048, vocab_size=50400)


def build(shape: str, tokenizer, device: torch.device, dtype: torch.dtype, dry: bool) -> LoadedModel:
    """Random weights from the config, built on ``device`` in ``dtype`` (no float32 copy on the host)."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:
        model = AutoModelForCausalLM.from_config(config(shape, len(tokenizer), dry), dtype=dtype)
    seconds = time.perf_counter() - t0
    loaded = wrap_model(model, tokenizer, model_id=f"random-{shape}", device=device, load_seconds=seconds)
    sync(device)
    return loaded


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rome_edit(loaded: LoadedModel, cache: RomeCache, repeats: int) -> dict:
    """Seconds per ROME edit with C given; the first edit (prefixes, kernels) is not timed."""
    hp = hparams_for(loaded)
    layer = hp.layer if hp.layer is not None else loaded.num_layers // 2
    param = loaded.spec.mlp_out_weight_name(layer)
    w = loaded.spec.as_out_in(loaded.model.get_parameter(param))
    d = int(w.shape[1])
    g = torch.Generator(device=loaded.device).manual_seed(0)
    a = torch.randn(d, d + 64, device=loaded.device, dtype=torch.float32, generator=g) / (d + 64) ** 0.5
    c = a @ a.T  # symmetric positive definite, (d, d) float32, as layer_covariance returns it
    cache.get_or_compute(f"cov:{covariance_path(loaded, layer, hp, cache)}", lambda: c)
    req = EditRequest(*EDIT, layer=layer)  # the layer whose C was given
    compute_edit(loaded, req, cache)  # warm: prefixes generated, kernels chosen
    seconds, steps = [], []
    for _ in range(repeats):
        sync(loaded.device)
        t0 = time.perf_counter()
        result = compute_edit(loaded, req, cache)
        sync(loaded.device)
        seconds.append(time.perf_counter() - t0)
        steps.append(result.v_steps)
        assert result.layer == layer and result.cov_from_cache, "the edit must use the given C"
    return {"layer": layer, "d_in": d, "seconds": statistics.median(seconds), "all_seconds": seconds,
            "v_steps": steps[-1], "cov_from_cache": result.cov_from_cache}  # fmt: skip


def trace_grid(loaded: LoadedModel, samples: int) -> dict:
    req = TraceRequest(*TRACE_PROMPT, kind="hidden", samples=samples)
    compare(loaded, TraceRequest(*TRACE_PROMPT, kind="hidden", samples=1))  # warm
    r = compare(loaded, req)
    return {k: r[k] for k in ("tokens", "layers", "samples", "batched_s", "batched_forward_passes", "per_position_s",
                              "per_position_forward_passes", "speedup", "max_abs_diff")}  # fmt: skip


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def streams(loaded: LoadedModel, folder: Path, dtype: str, counts: tuple[int, ...], n_tokens: int,
            mem_streams: int, mem_tokens: int) -> dict:  # fmt: skip
    """Generate through a ``rome-gateway serve`` process on the saved model vs ``model.generate``."""
    hf_single_tps(loaded, 4, 1)  # warm
    out: dict = {"tokens": n_tokens, "hf_single_tps": hf_single_tps(loaded, n_tokens, 2), "concurrent": []}
    for n in counts:
        hf_batched_tps(loaded, n, 4)  # warm this batch shape
    port = free_port()
    widest = max(*counts, mem_streams)
    args = ("--model", str(folder), "--device", str(loaded.device), "--dtype", dtype, "--metrics-port", str(port),
            "--max-concurrent-streams", str(widest + 2), "--max-batch-size", str(widest))  # fmt: skip
    with served(*args, ready_timeout=900) as (target, proc):
        gateway_concurrent(target, 1, 4)  # warm
        for n in counts:
            gateway_concurrent(target, n, 4)  # warm this batch size
            row = gateway_concurrent(target, n, n_tokens)
            assert row["tokens"] == n * n_tokens, f"{n} streams gave {row['tokens']} tokens, not {n * n_tokens}"
            row["hf_batched_tps"] = hf_batched_tps(loaded, n, n_tokens)
            out["concurrent"].append(row)
        rows = [gateway_concurrent(target, mem_streams, mem_tokens)]
        metrics = scrape(f"http://127.0.0.1:{port}/metrics")
        out["memory"] = {
            "streams": mem_streams, "tokens": mem_tokens, "tokens_done": rows[0]["tokens"] if rows else 0,
            "weight_bytes": weight_bytes(loaded),
            "peak_allocated_bytes": metrics.get('romegw_gpu_memory_peak_allocated_bytes{device="0"}'),
            "reserved_bytes": metrics.get('romegw_gpu_memory_reserved_bytes{device="0"}'),
            "peak_rss_bytes": proc_status_kib(proc.pid, "VmHWM") * 1024,
        }  # fmt: skip
    return out


def tokenizer_from(folder: str | None):
    tok = AutoTokenizer.from_pretrained(folder or ensure_embedded_folder())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def run(args: argparse.Namespace) -> dict:
    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.bfloat16
    tok = tokenizer_from(args.tokenizer)
    results: dict = {"machine": machine(), "dry_run": dry, "dtype": "bfloat16", "shapes": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    for shape in ("gpt2-xl", "gpt-j-6b"):
        log.info("building %s", shape)
        loaded = build(shape, tok, device, dtype, dry)
        r: dict = {"parameters": loaded.num_parameters, "weight_bytes": weight_bytes(loaded),
                   "build_seconds": loaded.load_seconds}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            log.info("%s: ROME edit with C given", shape)
            r["rome"] = rome_edit(loaded, RomeCache(Path(tmp) / "cache"), repeats=3)
            log.info("%s: trace grid", shape)
            r["trace"] = trace_grid(loaded, samples=2 if dry else 10)
            if shape == "gpt2-xl":
                folder = Path(tmp) / "model"
                loaded.model.save_pretrained(folder)
                tok.save_pretrained(folder)
                log.info("%s: streams through rome-gateway serve", shape)
                r["streams"] = streams(
                    loaded, folder, "bfloat16", counts=(1, 2, 4) if dry else (1, 16, 64), n_tokens=8 if dry else 64,
                    mem_streams=2 if dry else 16, mem_tokens=16 if dry else 512,
                )  # fmt: skip
        results["shapes"][shape] = r
        write_json(args.out / "gpu.json", results)  # what is done so far survives a run cut short
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def table(results: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for shape, r in results["shapes"].items():
        e = r["rome"]
        for label, base in BASELINES[shape]:
            rows.append((f"{shape}: ROME edit, C given, {e['v_steps']} v* steps (s) vs {label}", f"{e['seconds']:.2f}",
                         f"{base:.1f}", f"{base / e['seconds']:.1f}x faster"))  # fmt: skip
        t = r["trace"]
        rows.append((f"{shape}: trace grid {t['tokens']} tokens x {t['layers']} layers, {t['samples']} samples (s), "
                     "batched vs per-position", f"{t['batched_s']:.2f}", f"{t['per_position_s']:.2f}",
                     f"{t['speedup']:.1f}x"))  # fmt: skip
        rows.append((f"{shape}: trace max |batched - per-position|", f"{t['max_abs_diff']:.1e}", "-", "-"))
        s = r.get("streams")
        if s:
            for row in s["concurrent"]:
                n = row["streams"]
                rows.append((f"{shape}: {n} streams, tokens/s vs model.generate x{n} batched by hand",
                             f"{row['tokens_per_s']:.1f}", f"{row['hf_batched_tps']:.1f}",
                             f"{row['tokens_per_s'] / row['hf_batched_tps']:.2f}x"))  # fmt: skip
            rows.append((f"{shape}: 1 stream vs model.generate alone (tokens/s)",
                         f"{s['concurrent'][0]['tokens_per_s']:.1f}", f"{s['hf_single_tps']:.1f}",
                         f"{s['concurrent'][0]['tokens_per_s'] / s['hf_single_tps']:.2f}x"))  # fmt: skip
            m = s["memory"]
            peak = m["peak_allocated_bytes"]
            if peak is not None:
                rows.append((f"{shape}: server peak GPU memory, {m['streams']} streams x {m['tokens']} tokens (GiB) "
                             "vs weights", f"{peak / 2**30:.2f}", f"{m['weight_bytes'] / 2**30:.2f}",
                             f"{peak / m['weight_bytes']:.2f}x"))  # fmt: skip
            else:
                rss = (m["peak_rss_bytes"] or 0) / 2**20
                rows.append((f"{shape}: server peak resident memory (no GPU), {m['streams']} streams (MiB) vs weights",
                             f"{rss:.0f}", f"{m['weight_bytes'] / 2**20:.1f}", "-"))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU: every step runs")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the embedded model's)")
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = run(args)
    rows = table(results)
    title = f"GPU proof on {results.get('gpu', 'the CPU (dry run: numbers mean nothing)')}, bfloat16"
    print_table(title, rows)
    write_json(args.out / "gpu.json", results)
    (args.out / "gpu.md").write_text(table_markdown(title, rows, level=3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
