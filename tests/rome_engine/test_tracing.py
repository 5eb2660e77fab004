"""Causal tracing on tiny random models: the subject's tokens, the noise, the batched grid
against the per-position reference, the paper's semantics checked by hand, summaries."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from rome_engine.errors import InvalidRequest
from rome_engine.hooks import Trace
from rome_engine.loading import LoadedModel, wrap_model
from rome_engine.scoring import encode_prompt, score_continuations, split_continuation
from rome_engine.tracing import (
    MAX_SAMPLES,
    Fact,
    NoiseCache,
    TraceRequest,
    TraceResult,
    find_subject_range,
    load_known_facts,
    noise_level,
    restored_modules,
    trace,
    trace_per_position,
    trace_summary,
    window_layers,
)
from rome_engine.tracing import noise as tracing_noise
from rome_engine.tracing import runs as tracing_runs
from tests.conftest import SHARED_DATA, tiny_config

PROMPT = "Yesterday the Eiffel Tower was in the city of"
SUBJECT = "Eiffel Tower"


def make_peaked(family: str, tokenizer) -> LoadedModel:
    """A tiny random model with large weights: confident predictions that noise can destroy
    (with the default init every probability is ~1/V and any comparison passes)."""
    torch.manual_seed(0)
    config = tiny_config(family, len(tokenizer))
    config.initializer_range = 0.5
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return wrap_model(model, tokenizer, model_id=f"peaked-{family}", device=torch.device("cpu"))


@pytest.fixture(scope="module")
def peaked(tokenizer) -> dict[str, LoadedModel]:
    return {f: make_peaked(f, tokenizer) for f in ("gpt2", "llama")}


# -- subject tokens -----------------------------------------------------------


def test_subject_range_covers_exactly_the_subject_tokens(tokenizer) -> None:
    ids = encode_prompt(tokenizer, PROMPT)
    start, end = find_subject_range(tokenizer, PROMPT, SUBJECT)
    assert tokenizer.decode(ids[start:end]).strip() == SUBJECT
    assert SUBJECT not in tokenizer.decode(ids[start + 1 : end])
    assert SUBJECT not in tokenizer.decode(ids[start : end - 1])
    # at the very start, and with the leading space given explicitly
    assert find_subject_range(tokenizer, "The Eiffel Tower is in", "The Eiffel Tower") == (0, 4)
    assert find_subject_range(tokenizer, PROMPT, " " + SUBJECT) == (start, end)


def test_subject_range_counts_special_tokens_like_encode_prompt(tokenizer) -> None:
    prompt = "<|im_start|>The Eiffel Tower is in"
    ids = encode_prompt(tokenizer, prompt)
    start, end = find_subject_range(tokenizer, prompt, "Eiffel Tower")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids[start:end]).strip() == "Eiffel Tower"


def test_missing_subject_names_subject_and_prompt(tokenizer) -> None:
    with pytest.raises(InvalidRequest) as err:
        find_subject_range(tokenizer, PROMPT, "Colosseum")
    assert "Colosseum" in str(err.value) and PROMPT in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "neurons"},
        {"samples": 0},
        {"samples": MAX_SAMPLES + 1},
        {"window": 0},
        {"noise": -0.1},
        {"noise": math.nan},
        {"subject": " "},
        {"prompt": ""},
        {"answer": ""},
        {"seed": -1},
    ],
)
def test_request_validation(kwargs) -> None:
    fields = {"prompt": PROMPT, "subject": SUBJECT, **kwargs}
    with pytest.raises(InvalidRequest):
        TraceRequest(**fields)


def test_window_is_centred_and_clamped(tiny_gpt2) -> None:
    assert window_layers(15, 10, 30) == range(10, 20)
    assert window_layers(0, 10, 30) == range(0, 5)
    assert window_layers(29, 10, 30) == range(24, 30)
    assert window_layers(2, 1, 4) == range(2, 3)
    assert window_layers(1, 3, 4) == range(0, 3)
    spec = tiny_gpt2.spec
    assert restored_modules(spec, "mlp", 1, 3, 4) == [spec.mlp_name(i) for i in (0, 1, 2)]
    assert restored_modules(spec, "attn", 3, 2, 4) == [spec.attn_name(i) for i in (2, 3)]
    assert restored_modules(spec, "hidden", 2, 10, 4) == [spec.block_name(2)]


# -- noise --------------------------------------------------------------------


def test_noise_level_is_three_std_of_subject_embeddings(tiny_llama, monkeypatch) -> None:
    subjects = ["Eiffel Tower", "Barack Obama"]
    ids = [i for s in subjects for i in tiny_llama.tokenizer(s, add_special_tokens=False)["input_ids"]]
    weight = tiny_llama.model.get_input_embeddings().weight
    assert noise_level(tiny_llama, subjects) == pytest.approx(3 * float(weight[ids].std()), rel=1e-5)
    assert noise_level(tiny_llama) != pytest.approx(noise_level(tiny_llama, subjects), rel=1e-3)

    calls = []
    real = tracing_noise.noise_level
    monkeypatch.setattr(tracing_noise, "noise_level", lambda *a: calls.append(1) or real(*a))
    cache = NoiseCache()
    first = cache.get(tiny_llama)
    assert cache.get(tiny_llama) == first and len(calls) == 1
    req = TraceRequest(PROMPT, SUBJECT, samples=1)
    assert trace(tiny_llama, req, noise_cache=cache).noise == first and len(calls) == 1


# -- the grid -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_batched_equals_per_position(peaked, family, kind) -> None:
    loaded = peaked[family]
    req = TraceRequest(PROMPT, SUBJECT, kind=kind, samples=3, window=3, noise=1.0, seed=7)
    batched = trace(loaded, req, max_batch_rows=5)  # uneven batches that split cells
    reference = trace_per_position(loaded, req)
    assert batched.scores.shape == (len(encode_prompt(loaded.tokenizer, PROMPT)), 4)
    # a meaningful comparison: the restored probabilities vary across cells (by 2x or more)
    assert float(reference.scores.max()) > 2 * float(reference.scores.min())
    torch.testing.assert_close(batched.scores, reference.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(batched.scores, reference.scores, atol=1e-7, rtol=1e-3)  # small ones too
    assert batched.corrupted_prob == pytest.approx(reference.corrupted_prob, abs=1e-6)
    assert batched.clean_prob == reference.clean_prob


@pytest.mark.parametrize("family", ["gptj", "gpt_neox", "mistral", "qwen2"])
def test_batched_equals_per_position_other_families(tokenizer, family) -> None:
    loaded = make_peaked(family, tokenizer)
    req = TraceRequest(PROMPT, SUBJECT, kind="hidden", samples=2, noise=1.0)
    torch.testing.assert_close(trace(loaded, req).scores, trace_per_position(loaded, req).scores, atol=1e-4, rtol=0)


def test_hidden_trace_semantics(peaked) -> None:
    loaded = peaked["llama"]
    req = TraceRequest(PROMPT, SUBJECT, kind="hidden", samples=4, noise=1.0)
    r = trace(loaded, req)
    start, end = r.subject_range
    num_tokens = len(r.tokens)
    # clean + corrupted + (prefix + rows) per token from the subject on; the reference: 2 + T x L
    assert r.forward_passes == 2 + 2 * (num_tokens - start) < trace_per_position(loaded, req).forward_passes
    assert r.corrupted_prob < r.clean_prob - 0.05
    # the last block's output at the last token is all the logits read: full restoration
    assert float(r.scores[-1, -1]) == pytest.approx(r.clean_prob, abs=1e-5)
    # states before the subject are never corrupted: restoring them changes nothing
    torch.testing.assert_close(r.scores[:start], torch.full((start, 4), r.corrupted_prob), atol=1e-5, rtol=0)
    assert r.indirect_effect.shape == r.scores.shape
    assert float(r.indirect_effect[-1, -1]) == pytest.approx(r.clean_prob - r.corrupted_prob, abs=1e-5)


def test_zero_noise_corrupts_nothing(peaked) -> None:
    r = trace(peaked["gpt2"], TraceRequest(PROMPT, SUBJECT, kind="mlp", samples=2, noise=0.0))
    assert r.corrupted_prob == pytest.approx(r.clean_prob, abs=1e-6)
    torch.testing.assert_close(r.scores, torch.full_like(r.scores, r.clean_prob), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["hidden", "mlp"])
def test_one_cell_by_hand(peaked, kind) -> None:
    """The documented contract, rebuilt from plain hooks: noise[s] = noise * randn(S, E, D)
    from torch.Generator().manual_seed(seed), added to the subject's embeddings; clean
    outputs written back at token t in the restored modules; P(answer) averaged."""
    loaded = peaked["llama"]
    model, spec, tok = loaded.model, loaded.spec, loaded.tokenizer
    samples, noise, seed, window = 3, 0.8, 11, 3
    req = TraceRequest(
        PROMPT, SUBJECT, answer=" Paris", kind=kind, samples=samples, noise=noise, seed=seed, window=window
    )
    result = trace(loaded, req, max_batch_rows=7)

    ids = torch.tensor([encode_prompt(tok, PROMPT)])
    start, end = find_subject_range(tok, PROMPT, SUBJECT)
    token, layer = end - 1, 1
    names = [spec.block_name(layer)] if kind == "hidden" else [spec.mlp_name(i) for i in (0, 1, 2)]
    answer_id = split_continuation(tok, PROMPT, " Paris")[1][0]
    with torch.no_grad(), Trace(model, names) as clean:
        model(ids)
    dim = model.config.hidden_size
    draws = noise * torch.randn((samples, end - start, dim), generator=torch.Generator().manual_seed(seed))

    def corrupt(_name: str, emb: torch.Tensor) -> torch.Tensor:
        emb = emb.clone()
        emb[:, start:end] += draws
        return emb

    def restore(name: str, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, token] = clean[name].output[0, token]
        return out

    with torch.no_grad(), Trace(model, [spec.embed], edit_output=corrupt), Trace(model, names, edit_output=restore):
        probs = model(ids.expand(samples, -1)).logits[:, -1].softmax(-1)[:, answer_id]
    assert float(result.scores[token, layer]) == pytest.approx(float(probs.mean()), abs=1e-5)
    assert result.answer_id == answer_id and result.answer == tok.decode([answer_id])
    paris = score_continuations(loaded, PROMPT, [" Paris"])[0].tokens[0].logprob
    assert result.clean_prob == pytest.approx(math.exp(paris), rel=1e-4)


def test_default_answer_is_greedy_and_seed_matters(peaked) -> None:
    loaded = peaked["gpt2"]
    ids = torch.tensor([encode_prompt(loaded.tokenizer, PROMPT)])
    with torch.no_grad():
        greedy = int(loaded.model(ids).logits[0, -1].argmax())
    a = trace(loaded, TraceRequest(PROMPT, SUBJECT, samples=2, noise=1.0, seed=1))
    b = trace(loaded, TraceRequest(PROMPT, SUBJECT, samples=2, noise=1.0, seed=1))
    c = trace(loaded, TraceRequest(PROMPT, SUBJECT, samples=2, noise=1.0, seed=2))
    assert a.answer_id == greedy
    assert torch.equal(a.scores, b.scores)
    assert a.corrupted_prob != pytest.approx(c.corrupted_prob, abs=1e-6)


def test_progress_and_batch_bound(peaked, monkeypatch) -> None:
    loaded = peaked["gpt2"]
    widths: list[int] = []
    real = tracing_runs.forward

    def spy(model, ids, *args, **kwargs):
        widths.append(ids.shape[0])
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(tracing_runs, "forward", spy)
    calls: list[tuple[int, int]] = []
    r = trace(
        loaded,
        TraceRequest(PROMPT, SUBJECT, samples=3, noise=1.0),
        progress=lambda d, n: calls.append((d, n)),
        max_batch_rows=10,
    )
    total = r.scores.numel()
    assert max(widths) <= 10
    assert len(widths) == r.forward_passes
    assert calls[-1] == (total, total)
    assert all(n == total for _, n in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(InvalidRequest):
        trace(loaded, TraceRequest(PROMPT, SUBJECT), max_batch_rows=0)

    def cancel(done: int, total: int) -> None:
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        trace(loaded, TraceRequest(PROMPT, SUBJECT, samples=1, noise=1.0), progress=cancel)


def test_clean_run_is_immutable_and_corrupted_runs_run_once(peaked) -> None:
    loaded = peaked["gpt2"]
    req = TraceRequest(PROMPT, SUBJECT, kind="mlp", samples=2, window=3, noise=1.0)
    clean = tracing_runs.run_clean(loaded, req)
    with pytest.raises(dataclasses.FrozenInstanceError):
        clean.prob = 0.0  # type: ignore[misc]
    runs = tracing_runs.CorruptedRuns(loaded, clean, 1.0, samples=2, seed=0)
    assert runs.passes == 0  # nothing runs before it is asked for
    prob = runs.prob
    assert runs.passes == 1 and runs.prob == prob and runs.passes == 1
    assert prob == pytest.approx(trace(loaded, req).corrupted_prob, abs=1e-7)


def test_peak_property() -> None:
    scores = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.9, 0.5]])
    r = TraceResult(["a", "b"], (0, 1), " x", 5, 0.95, 0.05, scores, "mlp", 1.0, 2, 3, 0.1, 7)
    assert r.peak == (1, 1)
    torch.testing.assert_close(r.indirect_effect, scores - 0.05)


# -- summaries ----------------------------------------------------------------


def test_trace_summary_matches_the_full_traces(peaked) -> None:
    loaded = peaked["llama"]
    facts = [
        Fact(PROMPT, SUBJECT, None),
        Fact("The capital of France is the city of", "France", " Paris"),
        Fact("Barack Obama was born in", "Colosseum", None),  # subject missing: skipped
    ]
    calls: list[tuple[int, int]] = []
    s = trace_summary(
        loaded, facts, kind="mlp", samples=2, window=3, noise=1.0, seed=5, progress=lambda d, n: calls.append((d, n))
    )
    assert (s.n_facts, s.n_skipped, s.num_layers) == (2, 1, 4)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    subject_rows, last_rows = [], []
    for i, (prompt, subject, answer) in enumerate(facts[:2]):
        r = trace(loaded, TraceRequest(prompt, subject, answer, "mlp", 1.0, 2, 3, seed=5 + i))
        subject_rows.append(r.indirect_effect[r.subject_range[1] - 1])
        last_rows.append(r.indirect_effect[-1])
    torch.testing.assert_close(
        torch.tensor(s.last_subject_effect), torch.stack(subject_rows).mean(0), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(torch.tensor(s.last_token_effect), torch.stack(last_rows).mean(0), atol=1e-5, rtol=0)
    assert s.peak_layer == int(torch.stack(subject_rows).mean(0).argmax())

    # the threshold on the clean probability keeps the better-known fact only
    clean = sorted(
        trace(loaded, TraceRequest(p, subj, ans, samples=1, noise=0.0)).clean_prob for p, subj, ans in facts[:2]
    )
    assert clean[1] > clean[0] + 1e-3
    one = trace_summary(loaded, facts[:2], samples=1, noise=1.0, min_clean_prob=(clean[0] + clean[1]) / 2)
    assert (one.n_facts, one.n_skipped) == (1, 1) and one.mean_clean_prob == pytest.approx(clean[1])
    with pytest.raises(InvalidRequest):
        trace_summary(loaded, facts, samples=1, noise=1.0, min_clean_prob=clean[1] + 1e-3)


@pytest.mark.skipif(not (SHARED_DATA / "known_1000.json").exists(), reason="no shared known_1000.json")
def test_load_known_facts(tmp_path) -> None:
    path = SHARED_DATA / "known_1000.json"
    facts = load_known_facts(path)
    assert len(facts) == len(json.loads(path.read_text()))
    assert all(f.subject in f.prompt and f.answer is None for f in facts)
    first = load_known_facts(path, limit=2, use_attribute=True)
    assert first[0] == Fact("Vinson Massif is located in the continent of", "Vinson Massif", " Antarctica")
    assert len(first) == 2


# -- the embedded model (one test) --------------------------------------------


@pytest.mark.embedded
def test_embedded_model_eiffel_tower(embedded) -> None:
    req = TraceRequest("The Eiffel Tower is in", "Eiffel Tower", kind="hidden", samples=3)
    r = trace(embedded, req, noise_cache=NoiseCache())
    assert r.answer == " Paris" and r.clean_prob > 0.1
    assert r.corrupted_prob < 0.5 * r.clean_prob
    assert float(r.scores[-1, -1]) == pytest.approx(r.clean_prob, abs=1e-4)
    assert r.peak[0] in (r.subject_range[1] - 1, len(r.tokens) - 1)  # last subject token or last token
