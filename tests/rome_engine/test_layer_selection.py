"""The default edit layer: the paper's table first, else the MLP trace peak, cached on disk."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from rome_engine import layer_selection
from rome_engine.layer_selection import DEFAULT_FACTS, cache_path, default_window, select_edit_layer
from rome_engine.loading import LoadedModel, wrap_model
from rome_engine.tracing import Fact, find_subject_range, trace_summary
from tests.conftest import tiny_config

FACTS = [
    Fact("Yesterday the Eiffel Tower was in the city of", "Eiffel Tower", None),
    Fact("The capital of France is the city of", "France", None),
]


def make_model(tokenizer, family: str = "llama", **overrides: object) -> LoadedModel:
    torch.manual_seed(0)
    config = tiny_config(family, len(tokenizer))
    config.initializer_range = 0.5  # confident predictions, so the trace has a clear peak
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return wrap_model(model, tokenizer, model_id=f"tiny-{family}", device=torch.device("cpu"))


@pytest.fixture(scope="module")
def model(tokenizer) -> LoadedModel:
    return make_model(tokenizer)


@pytest.fixture
def no_tracing(monkeypatch):
    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("trace_summary must not run")

    monkeypatch.setattr(layer_selection, "trace_summary", fail)


def test_the_papers_layer_wins(model, tmp_path, no_tracing) -> None:
    with_table = dataclasses.replace(model, spec=dataclasses.replace(model.spec, paper_layers={4: 2, 48: 17}))
    assert select_edit_layer(with_table, cache_dir=tmp_path) == 2
    assert not any(tmp_path.iterdir())


def test_default_window_is_the_papers_at_most_a_third_of_the_depth() -> None:
    assert [default_window(n) for n in (48, 30, 12, 4, 2)] == [10, 10, 4, 1, 1]


def test_traced_layer_is_the_mlp_peak_and_is_cached(model, tmp_path, monkeypatch) -> None:
    expected = trace_summary(model, FACTS, kind="mlp", samples=2, window=1)  # default_window(4) == 1
    effects = expected.last_subject_effect
    assert max(effects) > min(effects) + 1e-3  # a real peak, not a tie of zeros
    layer = select_edit_layer(model, facts=FACTS, cache_dir=tmp_path, samples=2, min_prob=0.0)
    assert layer == expected.peak_layer
    saved = json.loads(cache_path(tmp_path, model).read_text())
    assert saved["layer"] == layer and saved["model_id"] == "tiny-llama" and saved["n_facts"] == 2

    calls = []
    monkeypatch.setattr(layer_selection, "trace_summary", lambda *a, **k: calls.append(1))
    assert select_edit_layer(model, facts=FACTS, cache_dir=tmp_path) == layer
    assert calls == []


def test_cache_key_follows_model_id_and_config(tokenizer, model, tmp_path) -> None:
    same = make_model(tokenizer)
    assert cache_path(tmp_path, same) == cache_path(tmp_path, model)
    wider = make_model(tokenizer, hidden_size=96)
    renamed = dataclasses.replace(model, model_id="org/other model")
    paths = {cache_path(tmp_path, m) for m in (model, wider, renamed, make_model(tokenizer, "gpt2"))}
    assert len(paths) == 4
    assert cache_path(tmp_path, renamed).parent == tmp_path / "edit_layers"  # no stray folders from the id


def test_unreadable_cache_is_recomputed(model, tmp_path) -> None:
    path = cache_path(tmp_path, model)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    layer = select_edit_layer(model, facts=FACTS, cache_dir=tmp_path, samples=2, min_prob=0.0)
    assert json.loads(path.read_text())["layer"] == layer


def test_unknown_facts_fall_back_to_tracing_them_all(model, caplog) -> None:
    facts = [Fact(p, s, " zebra") for p, s, _ in FACTS]  # the random model gives these P << 0.5
    with caplog.at_level(logging.WARNING, logger="rome_engine.layer_selection"):
        layer = select_edit_layer(model, facts=facts, samples=1, min_prob=0.5)
    assert 0 <= layer < 4
    assert "tracing them anyway" in caplog.text


def test_default_facts_never_corrupt_the_first_token(tokenizer) -> None:
    for prompt, subject, answer in DEFAULT_FACTS:
        assert find_subject_range(tokenizer, prompt, subject)[0] > 0, prompt
        assert answer is not None and answer.startswith(" ")
