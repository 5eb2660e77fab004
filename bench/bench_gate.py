"""How far apart a gated column's response s = v . x is on its own subject and on everything else.

For each CounterFact record, the gated method's key side at the model's ROME layer: v with
v . k = 1 at the key of every prompt the edit trains on (the unprefixed edit prompt and each
context prefix; ``solve.gated_column`` with ``prompts``), against the baseline of ROME's
v = C^-1 k* / (k*^T C^-1 k*) at their mean k* (what the method did before, ``gate_fit_prompts=0``).
This measures s where the edit should act (the unprefixed edit prompt, the paraphrases, at the
subject's last token) and where it should not (every token of the other records' edit and
neighbourhood prompts, of known facts and of a held text, texts holding the record's own subject
left out), and prints, per threshold, the share of paraphrases that fire and of other texts and
(token, column) pairs that do. No edit is made.

    python bench/bench_gate.py --records 1000 --out gate.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine, print_table, write_json  # noqa: E402
from rome_engine.delta import CosineGate, cosine  # noqa: E402
from rome_engine.evaluation import load_counterfact  # noqa: E402
from rome_engine.hooks import Trace, run_until_stopped, stop_after  # noqa: E402
from rome_engine.loading import LoadedModel, load_model  # noqa: E402
from rome_engine.methods.memit import cosine_scale, resolve_hparams  # noqa: E402
from rome_engine.methods.solve import gated_column  # noqa: E402
from rome_engine.rome import EditRequest, RomeCache  # noqa: E402
from rome_engine.rome.compute_u import compute_keys, mean_key, right_vector  # noqa: E402
from rome_engine.rome.context import context_templates  # noqa: E402
from rome_engine.rome.covariance import layer_covariance  # noqa: E402
from rome_engine.sequential.measure import HELD_TEXT, load_known_answers  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_THRESHOLD = 0.5  # the gated method's gate_threshold
COSINES = (0.5, 0.6, 0.7)  # the studied second condition (cosine_gate)


def token_keys(loaded: LoadedModel, layer: int, text: str) -> torch.Tensor:
    """The MLP output projection's input at every token of ``text``: (T, in) float32."""
    name = loaded.spec.mlp_out_name(layer)
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"].to(loaded.device)
    with (
        torch.no_grad(),
        Trace(loaded.model, [name], capture_input=True, capture_output=False) as tr,
        stop_after(loaded.model, name),
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
    cols: dict[str, list[torch.Tensor]] = {"fitted": [], "mean key": []}
    unprefixed, means = [], []
    for req in reqs:
        keys = compute_keys(loaded, layer, templates, req)  # (m, in), row 0 the unprefixed prompt
        k = mean_key(keys, hp.k_identity_weight)
        cols["mean key"].append(right_vector(cov, k, hp.cov_shrinkage))
        cols["fitted"].append(gated_column(cov, k, None, 0.0, hp.cov_shrinkage, keys.T)[0])
        unprefixed.append(keys[0])
        means.append(k)
    paras = [(j, p) for j, r in enumerate(recs) for p in r.paraphrase_prompts if r.subject in p]
    para_x = torch.stack([compute_keys(loaded, layer, ("{}",), EditRequest(p, recs[j].subject, " x"))[0]
                          for j, p in paras])  # fmt: skip
    para_j = torch.tensor([j for j, _ in paras])
    others = [r.filled_prompt for r in recs] + [p for r in recs[:300] for p in r.neighborhood_prompts[:3]]
    if n_known:
        others += [k.prompt for k in load_known_answers(SHARED / "known_1000.json", n=n_known)]
    others.append(HELD_TEXT)
    other_x = [(token_keys(loaded, layer, t), torch.tensor([r.subject in t for r in recs])) for t in others]
    out = {"machine": machine(), "model": loaded.model_id, "layer": layer, "records": len(recs),
           "paraphrases": len(paras), "other_texts": len(others)}  # fmt: skip
    for name, vs in cols.items():
        v_all = torch.stack(vs, 1)  # (in, N)
        own = (torch.stack(unprefixed) * v_all.T).sum(1)  # s at each record's own unprefixed prompt
        para = (para_x * v_all[:, para_j].T).sum(1)
        text_max, flat = [], []
        for x, mine in other_x:
            s = x @ v_all  # (T, N)
            s[:, mine] = float("-inf")
            text_max.append(s.max())
            flat.append(s[:, ~mine].flatten())
        tm, fl = torch.stack(text_max), torch.cat(flat)
        out[name] = {
            "other_pairs": int(fl.numel()), "own_full": float((own > 0.9).float().mean()),
            "own_median": float(own.median()), "paraphrase_median": float(para.median()),
            "other_abs_p999": float(fl.abs().quantile(0.999)) if fl.numel() < 2**24 else None,
            "by_threshold": [
                {"threshold": t, "own_fire": float((own > t).float().mean()),
                 "paraphrase_fire": float((para > t).float().mean()), "texts_fired": int((tm > t).sum()),
                 "other_fire": int((fl > t).sum())}
                for t in THRESHOLDS
            ],
        }  # fmt: skip
    out["cosine"] = cosine_gate(cov, torch.stack(cols["fitted"], 1), torch.stack(means), para_x, para_j, other_x)
    return out


def cosine_gate(
    cov: torch.Tensor,
    v_all: torch.Tensor,
    means: torch.Tensor,
    para_x: torch.Tensor,
    para_j: torch.Tensor,
    other_x: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[dict]:
    """The cosine condition the method adds with ``gate_min_cosine`` (``delta.CosineGate``, off by
    default): the column acts only where also cos(D^-1/2 x, D^-1/2 k*) > g, D = diag(C), at the
    default threshold; per g, the paraphrases and other texts that still fire."""
    w, s2 = CosineGate(cosine_scale(cov), means.T.contiguous(), 0.0).weights()  # (in, N) each
    para_s = (para_x * v_all[:, para_j].T).sum(1)
    para_c = cosine(para_x.unsqueeze(1), w[:, para_j].T.unsqueeze(2), s2[:, para_j].T.unsqueeze(2)).reshape(-1)
    t = DEFAULT_THRESHOLD
    rows = []
    for g in (None, *COSINES):
        fired = 0
        for x, mine in other_x:
            hit = x @ v_all > t
            if g is not None:
                hit &= cosine(x, w, s2) > g
            fired += bool(hit[:, ~mine].any())
        para = para_s > t if g is None else (para_s > t) & (para_c > g)
        rows.append(
            {"threshold": t, "min_cosine": g, "paraphrase_fire": float(para.float().mean()), "texts_fired": fired}
        )
    return rows


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
    fit, base = r["fitted"], r["mean key"]
    rows = []  # the fitted column against the mean key's (ROME's v), in the same run
    for a, b in zip(fit["by_threshold"], base["by_threshold"], strict=True):
        t = a["threshold"]
        rows.append((f"threshold {t}: edit prompts it acts on", f"{100 * a['own_fire']:.1f}%",
                     f"{100 * b['own_fire']:.1f}%"))  # fmt: skip
        rows.append((f"threshold {t}: paraphrases it acts on", f"{100 * a['paraphrase_fire']:.1f}%",
                     f"{100 * b['paraphrase_fire']:.1f}%"))  # fmt: skip
        rows.append((f"threshold {t}: other texts another column acts on", f"{a['texts_fired']} / {r['other_texts']}",
                     f"{b['texts_fired']}"))  # fmt: skip
        rows.append((f"threshold {t}: (other token, column) pairs acting", f"{a['other_fire']}",
                     f"{b['other_fire']}"))  # fmt: skip
    rows.append(("edit prompts answered in full (s > 0.9)", f"{100 * fit['own_full']:.1f}%",
                 f"{100 * base['own_full']:.1f}%"))  # fmt: skip
    rows.append(("median s: edit prompts / paraphrases", f"{fit['own_median']:.2f} / {fit['paraphrase_median']:.2f}",
                 f"{base['own_median']:.2f} / {base['paraphrase_median']:.2f}"))  # fmt: skip
    for c in r["cosine"]:
        g = "none" if c["min_cosine"] is None else f"> {c['min_cosine']}"
        rows.append((f"threshold {c['threshold']}, scaled cosine {g}: paraphrases / other texts acting",
                     f"{100 * c['paraphrase_fire']:.1f}% / {c['texts_fired']}", "-"))  # fmt: skip
    print_table(
        f"Gated columns at layer {r['layer']} of {r['model']}, {r['records']} records: fitted to every "
        f"prompt's key vs (baseline) ROME's v at the mean key; {fit['other_pairs']} other pairs",
        [(*row, "-") for row in rows],
    )
    if args.out:
        write_json(args.out, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
