"""Trace pictures: files are written, the colour map follows the kind, labels, bad input."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from romegw_client.plotting import draw_summary, draw_trace, token_labels

TOKENS = ["The", " E", "iffel", " Tower", " is", " in"]
SUBJECT = (1, 4)


def scores(num_layers: int = 8) -> list[list[float]]:
    """A fake trace: restoring late layers at the last token helps most."""
    return [[0.01 + 0.1 * t * layer / num_layers for layer in range(num_layers)] for t in range(len(TOKENS))]


def dominant_channel_counts(path) -> np.ndarray:
    """How many strongly coloured pixels have red, green or blue as their largest channel."""
    rgb = matplotlib.image.imread(path)[..., :3]  # (H, W, 3) in [0, 1]
    saturated = rgb.max(-1) - rgb.min(-1) > 0.3
    return np.bincount(rgb[saturated].argmax(-1), minlength=3)


@pytest.mark.parametrize(("kind", "channel"), [("mlp", 1), ("attn", 0), ("hidden", 2)])
def test_draw_trace_writes_a_heatmap_in_the_kind_colours(tmp_path, kind, channel) -> None:
    out = tmp_path / f"trace_{kind}.png"
    draw_trace(TOKENS, scores(), SUBJECT, kind=kind, answer=" Paris", clean_prob=0.8, corrupted_prob=0.01, out_path=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    counts = dominant_channel_counts(out)
    assert counts.sum() > 1000  # a real heatmap, not an empty figure
    assert counts.argmax() == channel  # Greens, Reds, Purples (blue the strongest channel)


def test_token_labels_mark_the_subject_and_stay_literal() -> None:
    assert token_labels(TOKENS, SUBJECT) == ["The", " E*", "iffel*", " Tower*", " is", " in"]
    assert token_labels(["a\n", "$x$"], (1, 2)) == ["a\\n", r"\$x\$*"]


def test_draw_trace_rejects_bad_shapes_and_kinds(tmp_path) -> None:
    common = {"answer": " Paris", "clean_prob": 0.8, "corrupted_prob": 0.1, "out_path": tmp_path / "x.png"}
    with pytest.raises(ValueError, match="rows"):
        draw_trace(TOKENS[:-1], scores(), SUBJECT, kind="mlp", **common)
    with pytest.raises(ValueError, match="rows"):
        draw_trace(TOKENS, [*scores()[:-1], [0.1]], SUBJECT, kind="mlp", **common)
    with pytest.raises(ValueError, match="kind"):
        draw_trace(TOKENS, scores(), SUBJECT, kind="neurons", **common)
    assert not (tmp_path / "x.png").exists()


def test_draw_summary(tmp_path) -> None:
    out = tmp_path / "summary.svg"
    effects = {"last subject token": [0.0, 0.2, 0.1], "last token": [0.0, 0.0, 0.3]}
    draw_summary(effects, kind="mlp", n_facts=12, out_path=out)
    text = out.read_text()
    assert "<svg" in text and "12 facts" in text
    with pytest.raises(ValueError):
        draw_summary({}, kind="mlp", n_facts=1, out_path=tmp_path / "empty.png")


def test_plotting_does_not_import_torch() -> None:
    code = "import sys, romegw_client.plotting; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_draw_sequential_one_panel_per_metric(tmp_path) -> None:
    from romegw_client.plotting import draw_sequential

    curves = {
        "unedited": {"efficacy": [(10, 0.1), (100, 0.12)], "perplexity": [(10, 20.0), (100, 20.0)]},
        "rome": {"efficacy": [(10, 1.0), (100, 0.8)], "perplexity": [(10, 20.5), (100, float("nan"))]},
        "memit": {"efficacy": [(10, 0.9), (100, 0.9)], "perplexity": [(10, 20.1), (100, 21.0)]},
    }
    out = tmp_path / "seq.svg"
    draw_sequential(curves, out_path=out, title="three lines")
    text = out.read_text()
    for label in ("three lines", "Efficacy", "Held-text perplexity", "rome", "memit", "unedited"):
        assert label in text, label
    with pytest.raises(ValueError, match="at least one"):
        draw_sequential({}, out_path=tmp_path / "empty.png")
