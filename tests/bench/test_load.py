"""The load script, small: streams plus edits, zero unexpected errors, every stream complete,
bounded memory growth."""

from __future__ import annotations

from bench.load import run
from tests.conftest import make_tiny

FAST = {"v_num_grad_steps": 2, "mom2_n_tokens": 1000, "ctx_n_short": 1, "ctx_n_long": 1}


def test_load_small(tokenizer, tmp_path) -> None:
    model_dir = tmp_path / "model"
    tiny = make_tiny("llama", tokenizer)
    tiny.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    r = run(
        str(model_dir),
        streams=6,
        seconds=12,
        max_new_tokens=12,
        edit_every=2.0,
        edit_hparams=FAST,
        extra=["--cache-dir", str(tmp_path / "cache")],
    )
    assert r.errors == {}
    assert r.incomplete_streams == 0
    assert r.completed_streams >= 6
    assert r.edits_applied >= 1 and r.reverts >= 1
    assert r.rss_end_mb - r.rss_start_mb < 300, (r.rss_start_mb, r.rss_end_mb)
