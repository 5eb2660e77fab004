"""Score and GetModelInfo through a real server."""

from __future__ import annotations

import pytest
import torch

from romegw_client import Client, FailedPrecondition, InvalidArgument


def test_score_matches_a_direct_forward_pass(tiny_llama, serve) -> None:
    srv = serve(tiny_llama)
    prompt, conts = "The Eiffel Tower is in", [" Paris", " Rome", " the city of Paris"]
    with Client(srv.target) as c:
        result = c.score(prompt, conts)
    assert [s.continuation for s in result.scores] == conts
    tok = tiny_llama.tokenizer
    for s, cont in zip(result.scores, conts, strict=True):
        ids = tok(prompt + cont, return_tensors="pt")["input_ids"]
        n_prompt = len(tok(prompt)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama.model(ids).logits[0].float(), -1)
        want = sum(float(logp[t - 1, ids[0, t]]) for t in range(n_prompt, ids.shape[1]))
        assert s.total_logprob == pytest.approx(want, abs=1e-4)
        assert len(s.tokens) == ids.shape[1] - n_prompt
        assert s.mean_logprob == pytest.approx(want / len(s.tokens), abs=1e-4)
    assert result.edit_version == 0


def test_score_bad_input(tiny_llama, serve) -> None:
    srv = serve(tiny_llama)
    with Client(srv.target) as c:
        with pytest.raises(InvalidArgument, match="at least one continuation"):
            c.score("prompt", [])
        with pytest.raises(InvalidArgument, match="prompt must not be empty"):
            c.score("", [" x"])
        with pytest.raises(InvalidArgument, match="empty strings"):
            c.score("prompt", [""])


def test_model_info(tiny_gpt2, serve) -> None:
    srv = serve(tiny_gpt2)
    with Client(srv.target) as c:
        info = c.model_info()
    assert info.model_id == "tiny-gpt2"
    assert info.family == "gpt2"
    assert info.architecture == "GPT2LMHeadModel"
    assert info.num_layers == 4
    assert info.hidden_size == 64
    assert info.num_parameters == sum(p.numel() for p in tiny_gpt2.model.parameters())
    assert info.dtype == "float32" and info.device == "cpu"
    assert info.head_version == 0 and info.active_layers == 0
    assert info.max_prompt_tokens == 255  # capped by the model's 256 positions


def test_health_serving(tiny_gpt2, serve) -> None:
    srv = serve(tiny_gpt2)
    with Client(srv.target) as c:
        assert c.health() == "SERVING"
        assert c.health("romegw.v1.RomeGateway") == "SERVING"


def test_edits_without_an_edit_manager_are_failed_precondition(tiny_gpt2, serve) -> None:
    srv = serve(tiny_gpt2)
    with Client(srv.target) as c, pytest.raises(FailedPrecondition, match="without editing support"):
        c.list_edits()
