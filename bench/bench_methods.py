"""The editing methods side by side on the embedded model: seconds per single-fact edit and P(target).

For each of rome, memit, projected and ft, on the same CounterFact records
(0-4 by default; the defaults were tuned on records 100+): the seconds of one
single-fact edit with C, its eigenbasis and the prefixes cached (a warm-up
edit of another record computes them first), P(new object | edit prompt)
before and after (the whole object, measured through ``delta.as_if_applied``, so
the weights are never written), and the mean P(true object) over the
record's neighbour prompts before and after. Also the projected mode's null
space per layer (free input dimensions, share of tr(C) the preserved span
holds) and FT-L's truncation error.

    python bench/bench_methods.py --records 0:5 --out methods.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from rome_engine.delta import as_if_applied
from rome_engine.evaluation import CounterFactRecord, load_counterfact
from rome_engine.loading import LoadedModel, default_cache_dir, load_model
from rome_engine.methods import METHODS, compute_method, layer_eigenbasis, preserved_basis, projector
from rome_engine.methods.memit import resolve_hparams
from rome_engine.rome import EditRequest, RomeCache
from rome_engine.scoring import score_continuations

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-train.json"


def _prob(loaded: LoadedModel, prompt: str, obj: str) -> float:
    with torch.no_grad():
        return float(torch.tensor(score_continuations(loaded, prompt, [obj])[0].total_logprob).exp())


def _neighbour_true(loaded: LoadedModel, rec: CounterFactRecord) -> float:
    true = " " + (rec.neighborhood_true or rec.target_true).strip()
    probs = [_prob(loaded, p.rstrip(), true) for p in rec.neighborhood_prompts]
    return statistics.mean(probs) if probs else float("nan")


def edit_record(
    loaded: LoadedModel, cache: RomeCache, method: str, rec: CounterFactRecord, hparams: dict[str, float]
) -> dict:
    req = EditRequest(rec.prompt, rec.subject, rec.target_new, hparams=hparams)
    before, neigh_before = _prob(loaded, req.filled(), req.target), _neighbour_true(loaded, rec)
    stages: dict[str, float] = {}  # CPU seconds at which each stage first reported

    def progress(stage: str, _done: int, _total: int) -> None:
        stages.setdefault(stage, time.process_time() - c0)

    t0, c0 = time.perf_counter(), time.process_time()
    result = compute_method(method, loaded, [req], cache, progress=progress)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    with as_if_applied(loaded, result.factors):
        after, neigh_after = _prob(loaded, req.filled(), req.target), _neighbour_true(loaded, rec)
    return {
        "case_id": rec.case_id,
        "edit": f"{req.filled()} ->{req.target}",
        "seconds": seconds,
        "cpu_seconds": cpu,  # the process's CPU time: with one torch thread, robust to other jobs on the machine
        "stage_cpu_seconds": stages,
        "target_before": before,
        "target_after": after,
        "neighbour_true_before": neigh_before,
        "neighbour_true_after": neigh_after,
        "steps": result.requests[0].steps,
        "layers": list(result.layers),
        "update_norm": sum(f.norm for f in result.factors),
        "written": [li.written for li in result.layer_info],
        "free_dims": [li.free_dims for li in result.layer_info],
        "truncation_error": [li.truncation_error for li in result.layer_info],
        "cov_from_cache": result.cov_from_cache,
    }


def nullspace_report(loaded: LoadedModel, cache: RomeCache, example: EditRequest) -> list[dict]:
    """Per layer of the projected mode's range: input dims, preserved eigenvectors, free dims, kept energy."""
    hp = resolve_hparams(loaded, [example], cache)
    out = []
    for layer in hp.layer_range():
        eig, _ = layer_eigenbasis(loaded, layer, hp.z_hparams(layer), cache)
        keep = preserved_basis(eig, hp.nullspace_threshold, bool(hp.nullspace_relative))
        free = projector(keep).free
        cut = hp.nullspace_threshold * (eig.mean if hp.nullspace_relative else 1.0)
        kept = float(eig.values[eig.values >= cut].sum() / eig.values.sum())
        out.append({
            "layer": layer, "d_in": keep.shape[0], "preserved": keep.shape[1], "free_dims": free,
            "preserved_share_of_trace": kept, "threshold": cut,
            "eig_min": float(eig.values.min()), "eig_mean": eig.mean, "eig_max": float(eig.values.max()),
        })  # fmt: skip
    return out


def run(
    loaded: LoadedModel,
    records: list[CounterFactRecord],
    warmup: CounterFactRecord,
    methods: tuple[str, ...],
    hparams: dict[str, float],
) -> dict:
    cache = RomeCache(default_cache_dir())
    out: dict = {"model_id": loaded.model_id, "threads": torch.get_num_threads(), "hparams": hparams, "methods": {}}
    for method in methods:
        edit_record(loaded, cache, method, warmup, hparams)  # C, eigenbasis, prefixes, layer: cached from here on
        rows = [edit_record(loaded, cache, method, rec, hparams) for rec in records]
        out["methods"][method] = {
            "median_seconds": statistics.median(r["seconds"] for r in rows),
            "median_cpu_seconds": statistics.median(r["cpu_seconds"] for r in rows),
            "median_steps": statistics.median(r["steps"] for r in rows),
            "mean_target_after": statistics.mean(r["target_after"] for r in rows),
            "records": rows,
        }
    if "projected" in methods:
        example = EditRequest(warmup.prompt, warmup.subject, warmup.target_new)
        out["nullspace"] = nullspace_report(loaded, cache, example)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--records", default="0:5", help="start:count of the CounterFact records to edit")
    ap.add_argument("--warmup", type=int, default=5, help="the record edited first by each method (not reported)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE",
                    help="override sent with every edit (repeatable), e.g. v_lr=1.0")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the compute time)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    start, count = (int(x) for x in args.records.split(":"))
    records = load_counterfact(args.data, start=start, n=count)
    (warmup,) = load_counterfact(args.data, start=args.warmup, n=1)
    loaded = load_model(None, device="cpu", dtype="float32")
    hparams = {name: float(value) for name, value in (h.split("=", 1) for h in args.hparam)}
    r = run(loaded, records, warmup, tuple(args.methods.split(",")), hparams)
    head = f"{'method':<10} {'case':>5} {'s/edit':>7} {'cpu s':>6} {'P before':>9} {'P after':>8}"
    print(f"{head} {'P(true) neighbours':>19}  edit")
    for method, m in r["methods"].items():
        for row in m["records"]:
            neigh = f"{row['neighbour_true_before']:.3f}->{row['neighbour_true_after']:.3f}"
            print(f"{method:<10} {row['case_id']:>5} {row['seconds']:7.1f} {row['cpu_seconds']:6.1f} "
                  f"{row['target_before']:9.3f} {row['target_after']:8.3f} {neigh:>19}  {row['edit']}")  # fmt: skip
        print(f"{method:<10} {'median':>5} {m['median_seconds']:7.1f} {m['median_cpu_seconds']:6.1f} {'':>9} "
              f"{m['mean_target_after']:8.3f} (mean), {m['median_steps']:.0f} z steps (median)")
    for n in r.get("nullspace", []):
        print(f"layer {n['layer']}: {n['free_dims']} of {n['d_in']} input dims free, the preserved "
              f"{n['preserved']} eigenvectors hold {100 * n['preserved_share_of_trace']:.0f}% of tr(C)")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
