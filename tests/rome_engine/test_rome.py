"""ROME editing on tiny random models: the request, the update's algebra, apply/remove."""

from __future__ import annotations

import pytest
import torch

from rome_engine.delta import as_if_applied, storage_delta
from rome_engine.errors import InvalidRequest
from rome_engine.hooks import Trace
from rome_engine.layers import LayerWeights
from rome_engine.loading import LoadedModel
from rome_engine.rome import (
    EditRequest,
    RomeCache,
    RomeHParams,
    compute_edit,
    hparams_for,
)
from rome_engine.rome.compute_u import last_subject_token, subject_span
from rome_engine.rome.compute_v import _DeltaForward, build_batch, build_rows

# Small enough that a whole edit takes about a second on a tiny model.
TINY_HP = {
    "layer": 1,
    "mom2_n_tokens": 256,
    "mom2_seq_len": 32,
    "mom2_batch_size": 8,
    "v_num_grad_steps": 3,
    "ctx_n_short": 1,
    "ctx_n_long": 1,
    "ctx_len_long": 6,
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rome_cache(tmp_path_factory: pytest.TempPathFactory) -> RomeCache:
    return RomeCache(tmp_path_factory.mktemp("rome-cache"))


def _request(**kw: object) -> EditRequest:
    args = {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target": "Rome", "hparams": TINY_HP}
    args.update(kw)
    return EditRequest(**args)  # type: ignore[arg-type]


def _snapshot(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in loaded.model.named_parameters()}


def _assert_same(loaded: LoadedModel, snap: dict[str, torch.Tensor]) -> None:
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, snap[n]), f"{n} changed"


# -- the request ------------------------------------------------------------------


def test_request_becomes_a_template_with_a_spaced_target() -> None:
    req = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome")
    assert (req.prompt, req.target, req.filled()) == ("The {} is in", " Rome", "The Eiffel Tower is in")
    assert EditRequest("{} is in", "Paris", " Rome").target == " Rome"
    trailing = EditRequest("The capital of {} is ", "France", "Lyon")
    assert (trailing.prompt, trailing.target) == ("The capital of {} is", " Lyon")


def test_subject_not_in_prompt_names_both() -> None:
    with pytest.raises(InvalidRequest) as e:
        EditRequest("The Eiffel Tower is in", "Colosseum", "Rome")
    assert "Colosseum" in str(e.value) and "The Eiffel Tower is in" in str(e.value)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"target": "  "}, "target"),
        ({"subject": ""}, "subject"),
        ({"prompt": "{} and {} are in"}, "exactly one"),
        ({"hparams": {"v_lr": 0.1, "bogus name": 1.0}}, "not a hyperparameter's name"),  # each method checks its own
        ({"layer": -1}, "layer"),
    ],
)
def test_invalid_requests(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        _request(**kw)


def test_hparams_overrides_are_typed_and_checked() -> None:
    hp = RomeHParams().with_overrides({"v_num_grad_steps": 7.0, "v_lr": 0.25})
    assert hp.v_num_grad_steps == 7 and isinstance(hp.v_num_grad_steps, int) and hp.v_lr == 0.25
    with pytest.raises(InvalidRequest, match="whole number"):
        RomeHParams().with_overrides({"v_num_grad_steps": 2.5})
    with pytest.raises(InvalidRequest, match="out of range"):
        RomeHParams().with_overrides({"v_stop_prob": 2.0})


def test_layer_out_of_range(tiny_llama: LoadedModel, rome_cache: RomeCache) -> None:
    with pytest.raises(InvalidRequest, match="out of range"):
        compute_edit(tiny_llama, _request(layer=4), rome_cache)
    with pytest.raises(InvalidRequest, match="out of range"):
        compute_edit(tiny_llama, _request(hparams={**TINY_HP, "layer": 9}), rome_cache)


def test_family_defaults(tiny_gpt2: LoadedModel, tiny_llama: LoadedModel) -> None:
    assert hparams_for(tiny_gpt2).ctx_n_short == 10  # the paper's 20 prefixes for GPT-2
    assert hparams_for(tiny_llama).layer is None  # no tuned layer for a 4-layer model


# -- tokens -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "subject", "last"),
    [
        ("The {} is in", "Eiffel Tower", " Tower"),
        ("{} is a", "Eiffel Tower", " Tower"),
        ("I love {}'s music", "Toko Yasuda", "uda"),
        ("Paris. {} was born in", "Danielle Darrieux", "ux"),
    ],
)
def test_last_subject_token(tokenizer: object, template: str, subject: str, last: str) -> None:
    start, end, text = subject_span(template, subject)
    ids, at = last_subject_token(tokenizer, text, start, end)
    assert tokenizer.decode([ids[at]]) == last  # type: ignore[attr-defined]
    assert subject.endswith(tokenizer.decode(ids[at]).strip())  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize(("cache_prefix", "skip_lower"), [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("layer", [0, 2])
def test_cached_prefix_forward_matches_full_forward(
    family: str, cache_prefix: bool, skip_lower: bool, layer: int, request: pytest.FixtureRequest
) -> None:
    """v* runs the tokens before the subject once into a KV cache and replays the blocks below
    the edited layer; the logits must equal one plain forward per prompt, with or without either reuse."""
    loaded: LoadedModel = request.getfixturevalue(family)
    req = EditRequest("{} is the capital of", "Paris", "Italy")  # one-token subject: an empty prefix row
    templates = ("{}", "The weather is nice today. {}", "I think. {}")
    rewrite, kl = build_rows(loaded.tokenizer, templates, req)
    batch = build_batch(rewrite, kl, 2, loaded.device)
    fwd = _DeltaForward(
        loaded, layer, loaded.num_layers - 1, batch, cache_prefix=cache_prefix, skip_lower=skip_lower
    )
    assert len(fwd.lower) == (layer if skip_lower else 0)
    torch.manual_seed(0)
    delta = torch.randn(loaded.model.config.hidden_size)
    with torch.no_grad():
        target_logits, kl_logits = fwd.logits(delta)
        fwd.logits(delta)  # a second step sees the same cache and replay
        again = torch.cat(fwd.logits(delta))
    torch.testing.assert_close(again, torch.cat([target_logits, kl_logits]))
    name = loaded.spec.mlp_out_name(layer)
    expected = []
    for row in rewrite + kl:

        def add(_n: str, out: torch.Tensor, at: int = row.subject_at) -> torch.Tensor:
            out = out.clone()
            out[:, at] += delta
            return out

        with torch.no_grad(), Trace(loaded.model, [name], capture_output=False, edit_output=add):
            logits = loaded.model(input_ids=torch.tensor([row.ids])).logits[0]
        expected += [logits[pos] for pos, _ in row.targets]
    torch.testing.assert_close(torch.cat([target_logits, kl_logits]), torch.stack(expected), rtol=1e-4, atol=1e-4)


# -- the update -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_update_writes_v_at_k_and_spares_orthogonal_keys(
    family: str, request: pytest.FixtureRequest, rome_cache: RomeCache
) -> None:
    loaded: LoadedModel = request.getfixturevalue(family)
    snap = _snapshot(loaded)
    result = compute_edit(loaded, _request(), rome_cache)
    _assert_same(loaded, snap)  # model at beginning == model at end
    (f,) = result.factors
    assert f.param == loaded.spec.mlp_out_weight_name(1)
    assert f.u.dtype == f.v.dtype == torch.float32 and f.rank == 1
    assert f.u.shape == (loaded.model.config.hidden_size, 1)
    u, v = f.u[:, 0], f.v[:, 0]
    torch.testing.assert_close(torch.dot(v, result.key), torch.tensor(1.0), rtol=1e-4, atol=1e-4)

    module = loaded.model.get_submodule(loaded.spec.mlp_out_name(1))
    k_star = result.key
    torch.manual_seed(1)
    k = torch.randn_like(k_star)
    k_orth = k - torch.dot(k, v) / torch.dot(v, v) * v  # v . k = 0
    weights = LayerWeights(loaded)
    with torch.no_grad():
        before = module(torch.stack([k_star, k_orth]))
        weights.materialize_factors(result.factors)
        after = module(torch.stack([k_star, k_orth]))
        weights.materialize_factors([])
    # W' k* = v*  and  W' k = W k when (C^-1 k*)^T k = 0
    torch.testing.assert_close(after[0], result.value, rtol=1e-4, atol=1e-4 * float(result.value.abs().max()))
    torch.testing.assert_close(after[1], before[1], rtol=1e-4, atol=1e-5)
    assert result.update_norm == pytest.approx(float(torch.outer(u, v).norm()), rel=1e-4)
    _assert_same(loaded, snap)


def test_conv1d_orientation_matches_linear_math(tiny_gpt2: LoadedModel, rome_cache: RomeCache) -> None:
    loaded = tiny_gpt2
    result = compute_edit(loaded, _request(), rome_cache)
    (f,) = result.factors
    w = loaded.model.get_parameter(f.param)
    assert w.shape == (4 * 64, 64)  # Conv1D: (in, out)
    assert storage_delta(loaded.spec, f).shape == w.shape
    w_oi = loaded.spec.as_out_in(w).detach().clone()  # (out, in)
    module = loaded.model.get_submodule(loaded.spec.mlp_out_name(1))
    x = torch.randn(3, 4 * 64)
    weights = LayerWeights(loaded)
    weights.materialize_factors(result.factors)
    try:
        torch.testing.assert_close(loaded.spec.as_out_in(w), w_oi + f.delta())
        with torch.no_grad():
            y = module(x)
            with as_if_applied(loaded, result.factors):  # on top of the applied one: twice the delta
                y2 = module(x)
        expected = x @ (w_oi + f.delta()).T + module.bias  # Linear math
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y2, x @ (w_oi + 2 * f.delta()).T + module.bias, rtol=1e-4, atol=1e-4)
    finally:
        weights.materialize_factors([])


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_apply_then_remove_is_bit_exact(family: str, request: pytest.FixtureRequest, rome_cache: RomeCache) -> None:
    """Evaluation applies and removes edits through the serving path: base + factors, rebuilt."""
    loaded: LoadedModel = request.getfixturevalue(family)
    snap = _snapshot(loaded)
    first = compute_edit(loaded, _request(), rome_cache)
    second = compute_edit(loaded, _request(prompt="{} is located in", target="Berlin"), rome_cache)
    weights = LayerWeights(loaded)
    weights.materialize_factors(first.factors)
    changed = [n for n, p in loaded.model.named_parameters() if not torch.equal(p, snap[n])]
    assert changed == [first.factors[0].param]
    only_first = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    weights.materialize_factors([*first.factors, *second.factors])
    weights.materialize_factors(first.factors)
    _assert_same(loaded, only_first)
    weights.materialize_factors([])
    _assert_same(loaded, snap)


def test_most_probable_early_stopping_stops_once_the_target_wins_every_prompt(
    tiny_llama: LoadedModel, rome_cache: RomeCache
) -> None:
    """v_stop_greedy=1 (MPES): the optimisation ends once the target is the argmax of every prompt, long
    before a probability it never reaches (v_stop_prob=1; a random tiny model's next-token distribution
    is nearly flat, so the argmax comes early)."""
    hp = {
        **TINY_HP,
        "layer": 0,
        "v_num_grad_steps": 60,
        "v_stop_prob": 1.0,
        "v_lr": 0.5,
        "clamp_norm_factor": 100.0,
        "v_weight_decay": 0.0,
    }
    # the subject ends the prompt, so that delta reaches the next-token logits on a random tiny model
    fact = {"prompt": "I went to see the Eiffel Tower", "subject": "Eiffel Tower"}
    full = compute_edit(tiny_llama, _request(hparams=hp, **fact), rome_cache)
    early = compute_edit(tiny_llama, _request(hparams={**hp, "v_stop_greedy": 1}, **fact), rome_cache)
    assert full.v_steps == 60
    assert 0 < early.v_steps < full.v_steps  # it took steps: the target did not win before the edit
    ids = tiny_llama.tokenizer(fact["prompt"], return_tensors="pt").input_ids
    target = tiny_llama.tokenizer(" Rome", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        assert int(tiny_llama.model(ids).logits[0, -1].argmax()) != target
