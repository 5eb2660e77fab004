"""How far apart a gated column's response s = v . x is on its own subject and on everything else.

For each CounterFact record, the gated method's key side at the model's ROME layer is
v = C^-1 k* / (k*^T C^-1 k*) (so s = 1 at k*). This measures s where the edit should act
(the edit prompt behind each context prefix, the paraphrases, at the subject's last token)
and where it should not (every token of the other records' neighbourhood prompts, of known
facts and of a held text, texts holding the record's own subject left out), and prints, per
threshold, the share of paraphrases that fire and of other tokens that do. No edit is made.

    python bench/bench_gate.py --records 50 --out gate.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine, print_table, write_json  # noqa: E402
from rome_engine.evaluation import load_counterfact  # noqa: E402
from rome_engine.hooks import Trace, run_until_stopped, stop_after  # noqa: E402
from rome_engine.loading import LoadedModel, load_model  # noqa: E402
from rome_engine.methods.memit import resolve_hparams  # noqa: E402
from rome_engine.rome import EditRequest, RomeCache  # noqa: E402
from rome_engine.rome.compute_u import compute_key, compute_keys, right_vector  # noqa: E402
from rome_engine.rome.context import context_templates  # noqa: E402
from rome_engine.rome.covariance import layer_covariance  # noqa: E402
from rome_engine.sequential.measure import HELD_TEXT, load_known_answers  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


def token_keys(loaded: LoadedModel, layer: int, text: str) -> torch.Tensor:
    """The MLP output projection's input at every token of ``text``: (T, in) float32."""
    name = loaded.spec.mlp_out_name(layer)
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"].to(loaded.device)
    with torch.no_grad(), Trace(loaded.model, [name], capture_input=True, capture_output=False) as tr, stop_after(
        loaded.model, name
    ):
        run_until_stopped(loaded.model, input_ids=ids)
    return tr[name].input[0].float()


def measure(loaded: LoadedModel, n_records: int, n_known: int) -> dict:
    cache = RomeCache()
    recs = load_counterfact(SHARED / "counterfact" / "counterfact-train.json", start=2000, n=n_records)
    reqs = [EditRequest(r.prompt, r.subject, r.target_new) for r in recs]
    hp = resolve_hparams(loaded, reqs[:1], cache, None, "gated")
    layer = hp.layer_range()[-1]
    zhp = hp.z_hparams(layer)
    templates = context_templates(loaded, zhp, cache)
    cov = layer_covariance(loaded, layer, zhp, cache)[0]
    vs, own, para = [], [], []
    for rec, req in zip(recs, reqs, strict=True):
        k = compute_key(loaded, layer, templates, req, hp.k_identity_weight)
        v = right_vector(cov, k, hp.cov_shrinkage)
        vs.append(v)
        own.extend((compute_keys(loaded, layer, templates, req) @ v).tolist())
        for p in rec.paraphrase_prompts:
            if rec.subject in p:
                para.append(float(compute_keys(loaded, layer, ("{}",), EditRequest(p, rec.subject, " x"))[0] @ v))
    v_all = torch.stack(vs, 1)  # (in, N)
    others = [p for r in recs for p in r.neighborhood_prompts]
    if n_known:
        others += [k.prompt for k in load_known_answers(SHARED / "known_1000.json", n=n_known)]
    others.append(HELD_TEXT)
    other_s = []
    for text in others:
        s = token_keys(loaded, layer, text) @ v_all  # (T, N)
        mine = torch.tensor([r.subject in text for r in recs])
        other_s.append(s[:, ~mine].flatten())
    flat = torch.cat(other_s)
    para_t, own_t = torch.tensor(para), torch.tensor(own)
    return {
        "machine": machine(), "model": loaded.model_id, "layer": layer, "records": len(recs),
        "other_pairs": int(flat.numel()), "paraphrases": len(para),
        "own_min": float(own_t.min()), "own_median": float(own_t.median()),
        "paraphrase_median": float(para_t.median()), "other_abs_p999": float(flat.abs().quantile(0.999)),
        "other_max": float(flat.max()),
        "by_threshold": [
            {"threshold": t, "own_fire": float((own_t > t).float().mean()), "paraphrase_fire": float(
                (para_t > t).float().mean()), "other_fire": int((flat > t).sum())}
            for t in THRESHOLDS
        ],
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=50, help="CounterFact records from 2000 on")
    ap.add_argument("--known", type=int, default=200, help="known facts whose tokens count as other text")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    r = measure(load_model(None, device="cpu", dtype="float32"), args.records, args.known)
    n = r["other_pairs"]
    rows = []  # the gated column against a plain rank-one one (ROME's), which acts on every input
    for x in r["by_threshold"]:
        t = x["threshold"]
        rows.append((f"threshold {t}: edit prompts it acts on", f"{100 * x['own_fire']:.1f}%", "100%", "-"))
        rows.append((f"threshold {t}: paraphrases it acts on", f"{100 * x['paraphrase_fire']:.1f}%", "100%", "-"))
        rows.append((f"threshold {t}: (other token, column) pairs acting", f"{x['other_fire']}", f"{n}",
                     f"{x['other_fire'] / n:.2e}"))  # fmt: skip
    rows.append(("median s: edit prompts / paraphrases", f"{r['own_median']:.2f} / {r['paraphrase_median']:.2f}",
                 "same", "-"))  # fmt: skip
    rows.append(("other tokens: abs(s) 99.9th percentile, max", f"{r['other_abs_p999']:.3f}, {r['other_max']:.2f}",
                 "same", "-"))  # fmt: skip
    print_table(f"Gated columns at layer {r['layer']} of {r['model']}, {r['records']} records (baseline: plain "
                "rank-one columns)", rows)
    if args.out:
        write_json(args.out, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
