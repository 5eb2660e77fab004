"""Pictures of causal traces (matplotlib, Agg backend; no torch in here).

``draw_trace`` draws one trace as a heatmap in the style of Figure 1 of Meng
et al. 2022: one row per prompt token (subject tokens marked with ``*``), one
column per layer, the colour the probability of the answer when that state is
restored. ``draw_summary`` draws the average indirect effect by layer over
many facts (the style of their Figure 2). ``draw_sequential`` draws the
sequential evaluation: each metric against the number of edits, one line per
editing method.

    draw_trace(result.tokens, result.scores.tolist(), result.subject_range, kind="mlp",
               answer=result.answer, clean_prob=result.clean_prob,
               corrupted_prob=result.corrupted_prob, out_path="trace.png")
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must come before pyplot is imported

import matplotlib.pyplot as plt

log = logging.getLogger(__name__)

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
STATE_NAMES = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
COLORS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}


def _check_kind(kind: str) -> None:
    if kind not in CMAPS:
        raise ValueError(f"kind must be one of {', '.join(CMAPS)}, got {kind!r}")


def _plain(text: str) -> str:
    """Text as matplotlib shows it literally: newlines and tabs escaped, no mathtext ($)."""
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")


def token_labels(tokens: Sequence[str], subject_range: tuple[int, int]) -> list[str]:
    """Row labels: the tokens as plain text, subject tokens marked with '*'."""
    start, end = subject_range
    return [_plain(tok) + ("*" if start <= i < end else "") for i, tok in enumerate(tokens)]


def draw_trace(
    tokens: Sequence[str],
    scores: Sequence[Sequence[float]],
    subject_range: tuple[int, int],
    *,
    kind: str,
    answer: str,
    clean_prob: float,
    corrupted_prob: float,
    out_path: str | os.PathLike,
    window: int | None = None,
) -> None:
    """Heatmap of restored P(answer): rows = tokens, columns = layers; written to ``out_path``
    (the format follows its suffix: .png, .svg, .pdf)."""
    _check_kind(kind)
    rows = [list(r) for r in scores]  # (T, L)
    if len(rows) != len(tokens) or not rows or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError(f"scores must be {len(tokens)} rows (one per token) of equal length")
    num_layers = len(rows[0])
    # as in the paper, the colour runs from the corrupted probability (no effect) to the
    # best restoration, so the indirect effect shows even where it is small
    high = max(map(max, rows))
    low = min(corrupted_prob, high - 1e-9)
    fig, ax = plt.subplots(figsize=(min(3.5 + 0.2 * num_layers, 12), 1.2 + 0.32 * len(tokens)), dpi=150)
    image = ax.pcolormesh(rows, cmap=CMAPS[kind], vmin=low, vmax=high)
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(tokens))])
    ax.set_yticklabels(token_labels(tokens, subject_range))
    step = max(1, num_layers // 10)
    ax.set_xticks([i + 0.5 for i in range(0, num_layers, step)])
    ax.set_xticklabels([str(i) for i in range(0, num_layers, step)])
    shown = _plain(answer.strip() or answer)
    if kind == "hidden" or not window or window == 1:
        restored, xlabel = f"one {STATE_NAMES[kind]}", f"layer of the restored {STATE_NAMES[kind]}"
    else:
        restored, xlabel = f"{STATE_NAMES[kind]}s of {window} layers", f"centre layer of the {window} restored"
    ax.set_xlabel(xlabel)
    ax.set_title(
        f"Restoring {restored} after corrupting the subject*\n"
        f"p({shown}): clean {clean_prob:.3g}, corrupted {corrupted_prob:.3g}, best restored {high:.3g}",
        fontsize=10,
    )
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"p({shown}) restored")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    log.info("wrote the %s trace to %s", kind, out_path)


def draw_summary(
    effects: Mapping[str, Sequence[float]],
    *,
    kind: str,
    n_facts: int,
    out_path: str | os.PathLike,
    title: str | None = None,
) -> None:
    """Average indirect effect by layer, one line per token position (e.g.
    ``{"last subject token": s.last_subject_effect, "last token": s.last_token_effect}``)."""
    _check_kind(kind)
    if not effects or any(len(v) == 0 for v in effects.values()):
        raise ValueError("effects must map at least one position name to a non-empty list (one value per layer)")
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=150)
    styles = ["-", "--", ":", "-."]
    for i, (name, values) in enumerate(effects.items()):
        ax.plot(
            range(len(values)),
            list(values),
            styles[i % len(styles)],
            color=COLORS[kind],
            label=name,
            marker=".",
        )
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel(f"layer of the restored {STATE_NAMES[kind]}")
    ax.set_ylabel("average indirect effect on p(answer)")
    ax.set_title(title or f"Average indirect effect of {STATE_NAMES[kind]} states over {n_facts} facts", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    log.info("wrote the %s summary to %s", kind, out_path)


# the sequential evaluation's metrics (rome_engine.sequential.report.METRIC_NAMES): title, whether a share
SEQUENTIAL_METRICS = {
    "efficacy": ("Efficacy: P(new) > P(true)", True),
    "paraphrase": ("Paraphrase: P(new) > P(true)", True),
    "neighborhood": ("Neighborhood: P(true) > P(new)", True),
    "score": ("Score (harmonic mean)", True),
    "greedy_efficacy": ("Greedy answer = new object", True),
    "greedy_paraphrase": ("Greedy paraphrase = new object", True),
    "neighbor_unchanged": ("Neighbour greedy unchanged", True),
    "known_retention": ("Known facts retained", True),
    "fluency": ("Fluency (n-gram entropy, bits)", False),
    "perplexity": ("Held-text perplexity", False),
}


def draw_sequential(
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    *,
    out_path: str | os.PathLike,
    title: str | None = None,
    reference: str = "unedited",
) -> None:
    """Each metric against the number of sequential edits: one panel per metric, one line per
    method. ``curves[line][metric]`` is a list of (edits, value) points (NaN: not measured);
    the ``reference`` line (the same records before any edit) is drawn grey and dashed."""
    metrics = [m for m in SEQUENTIAL_METRICS if any(m in c for c in curves.values())]
    metrics += sorted({m for c in curves.values() for m in c} - set(metrics))
    if not metrics:
        raise ValueError("curves must map at least one line name to {metric: [(edits, value), ...]}")
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), dpi=150, squeeze=False)
    xs = [x for c in curves.values() for pts in c.values() for x, _ in pts if x > 0]
    log_x = bool(xs) and max(xs) / min(xs) >= 20
    for ax, metric in zip(axes.flat, metrics, strict=False):
        label, share = SEQUENTIAL_METRICS.get(metric, (metric, False))
        for name, c in curves.items():
            pts = [(x, y) for x, y in c.get(metric, ()) if y is not None and not math.isnan(y)]
            if not pts:
                continue
            ys = [100 * y if share else y for _, y in pts]
            if name == reference:  # on top, so that it shows where a method's line coincides with it
                ax.plot([x for x, _ in pts], ys, label=name, color="grey", linestyle="--", zorder=3)
            else:
                ax.plot([x for x, _ in pts], ys, label=name, marker="o", markersize=3)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("sequential edits", fontsize=8)
        if share:
            ax.set_ylim(-3, 103)
            ax.set_ylabel("%", fontsize=8)
        if log_x:
            ax.set_xscale("log")
        if 0 < len(set(xs)) <= 8:  # the checkpoints themselves as ticks
            ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
            ax.minorticks_off()
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower right", fontsize=8)
    fig.suptitle(title or "Sequential edits", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    log.info("wrote the sequential evaluation plot to %s", out_path)
