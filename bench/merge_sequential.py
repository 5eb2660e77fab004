"""Merge sequential-evaluation reports of the same records, run as separate processes (one method
each, side by side on the cores), into one table and one plot.

    python bench/merge_sequential.py rome.json memit.json projected.json ft.json \
        --plot docs/sequential_300.png --markdown

Each input is the JSON ``rome-gateway eval --sequential`` writes (also while it runs: a report
that is not complete is marked so). The reports must hold the same CounterFact records in the
same order; the unedited row is the first report's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (JSON key, column, shown as a percentage)
COLUMNS = (
    ("efficacy", "Eff", True),
    ("paraphrase", "Para", True),
    ("neighborhood", "Neigh", True),
    ("greedy_efficacy", "greedy new", True),
    ("greedy_paraphrase", "greedy para", True),
    ("neighbor_unchanged", "neighbours unchanged", True),
    ("known_retention", "known retained", True),
    ("fluency", "fluency (bits)", False),
    ("perplexity", "held-text ppl", False),
)


def load(paths: list[Path]) -> list[dict]:
    reports = [json.loads(p.read_text()) for p in paths]
    first = reports[0]["case_ids"]
    for p, r in zip(paths, reports, strict=True):
        n = min(len(first), len(r["case_ids"]))
        if r["case_ids"][:n] != first[:n]:
            raise SystemExit(f"{p} holds other records than {paths[0]}: they cannot be compared")
    return reports


def cell(value: float | None, share: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.0f}" if share else f"{value:.2f}"


def rows(reports: list[dict]) -> list[list[str]]:
    """One row per (checkpoint, method), the unedited model first at each checkpoint."""
    by_n: dict[int, list[tuple[str, dict]]] = {}
    for r in reports:
        for run in r["runs"]:
            for cp in run["checkpoints"]:
                by_n.setdefault(cp["n_edits"], []).append((run["method"], cp))
    out = []
    for n in sorted(by_n):
        unedited = by_n[n][0][1]["unedited"]
        out.append([str(n), "unedited", *(cell(unedited.get(k), s) for k, _, s in COLUMNS), "-", "-"])
        for method, cp in by_n[n]:
            t = cp["times"]
            times = f"{t['median']:.1f} / {t['p95']:.1f}"
            failed = str(cp.get("n_failed", 0))
            out.append([str(n), method, *(cell(cp["edited"].get(k), s) for k, _, s in COLUMNS), failed, times])
    return out


def markdown(reports: list[dict]) -> str:
    head = ["edits", "method", *(c for _, c, _ in COLUMNS), "refused", "s/edit (median / p95)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(reports)]
    return "\n".join(lines)


def curves(reports: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    keys = [k for k, _, _ in COLUMNS]
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in reports:
        for run in r["runs"]:
            cps = run["checkpoints"]
            if not cps:
                continue
            if "unedited" not in out:
                out["unedited"] = {k: [(c["n_edits"], _num(c["unedited"].get(k))) for c in cps] for k in keys}
            out[run["method"]] = {k: [(c["n_edits"], _num(c["edited"].get(k))) for c in cps] for k in keys}
    return out


def _num(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--plot", type=Path, help="metric vs edits, one line per method (PNG)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args()
    reports = load(args.reports)
    for p, r in zip(args.reports, reports, strict=True):
        if not r.get("complete"):
            print(f"note: {p} is not complete ({r.get('done')})", file=sys.stderr)
    print(markdown(reports))
    if args.plot:
        from romegw_client.plotting import draw_sequential

        n = max(len(r["case_ids"]) for r in reports)
        title = args.title or f"{reports[0]['model_id']}: {n} sequential CounterFact edits"
        draw_sequential(curves(reports), out_path=args.plot, title=title)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
