"""The gated method: ROME's rank-one column that acts only on inputs near its own key.

Its algebra (nothing below the threshold, exactly), the slots that serve it beside the
weights (materialize, revert, pinned versions), its store format (3), and the method on
a tiny model.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch

from rome_engine.delta import GatedSlots, LowRankFactor, as_if_applied, gate
from rome_engine.edit_store import EditLayer, decode_layer, encode_layer
from rome_engine.hooks import Trace
from rome_engine.layers import LayerWeights
from rome_engine.loading import LoadedModel
from rome_engine.methods import compute_gated, compute_method, gated_hparams_for
from rome_engine.records import LayerHeader
from rome_engine.rome import EditRequest, RomeCache
from rome_engine.scoring import score_continuations
from rome_engine.versions import LiveVersions
from tests.conftest import make_tiny
from tests.rome_engine.test_edit_store import param_hashes
from tests.rome_engine.test_methods import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT_IDS = torch.tensor([[5, 17, 300, 42, 7, 1000, 12]])
TINY_GATED = {**TINY, "n_layers": 1, "gate_threshold": 0.6, "v_lr": 0.2, "v_num_grad_steps": 20}


def logits(loaded: LoadedModel, ids: torch.Tensor = PROMPT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits[:, -1]


def key_at(loaded: LoadedModel, layer: int, position: int, ids: torch.Tensor = PROMPT_IDS) -> torch.Tensor:
    """The MLP output projection's input at ``position`` of the prompt: (in,) float32."""
    name = loaded.spec.mlp_out_name(layer)
    with torch.no_grad(), Trace(loaded.model, [name], capture_input=True, capture_output=False) as tr:
        loaded.model(input_ids=ids)
    return tr[name].input[0, position].float()


def gated_layer(loaded: LoadedModel, weights: LayerWeights, layer: int, position: int, seed: int,
                version: int, threshold: float = 0.5) -> EditLayer:  # fmt: skip
    """A format-3 layer whose one gated column fires on the prompt's token at ``position`` (v . k = 1 there)."""
    name = loaded.spec.mlp_out_weight_name(layer)
    k = key_at(loaded, layer, position)
    out_dim = loaded.spec.as_out_in(weights.parameter(name)).shape[0]
    u = torch.randn(out_dim, generator=torch.Generator().manual_seed(seed)) * 0.5
    f = LowRankFactor(name, u.reshape(-1, 1), (k / k.dot(k)).reshape(-1, 1), threshold)
    header = {
        "format_version": 3, "edit_id": str(uuid.uuid4()), "version": version, "parent_version": version - 1,
        "created_at": "2026-11-28T00:00:00Z", "author": "test", "comment": "", "method": "gated",
        "facts": [{"prompt": "{} is in", "subject": "X", "target": " Y", "layer": layer, "hparams": {}}],
        "probabilities": [{}], "layer": layer, "layers": [layer],
        "matrices": [{"name": name, "shape": list(f.shape), "update_norm": f.norm, "rank": 1, "keys": 1,
                      "threshold": threshold}],
        "base_fingerprint": weights.fingerprint([name]).to_json(), "compute_seconds": 0.0,
    }  # fmt: skip
    return EditLayer(LayerHeader.from_json(header), (f,), {name: k.reshape(-1, 1)})


# -- the algebra -----------------------------------------------------------------


def test_a_gated_column_adds_nothing_below_its_threshold_and_its_value_at_its_key() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(32, generator=g)
    u = torch.randn(8, 1, generator=g)
    f = LowRankFactor("w", u, (k / k.dot(k)).reshape(-1, 1), threshold=0.4)
    assert f.gated
    torch.testing.assert_close(f.apply(k), u[:, 0], rtol=1e-6, atol=1e-6)  # s = 1: ROME's u at k*
    other = torch.randn(1000, 32, generator=g)
    s = other @ f.v[:, 0]
    below = s <= 0.4
    assert below.any() and (~below).any()
    out = f.apply(other)
    assert torch.equal(out[below], torch.zeros_like(out[below]))  # exactly nothing
    torch.testing.assert_close(out[~below], s[~below, None] * u[:, 0], rtol=1e-5, atol=1e-6)
    assert torch.equal(gate(torch.tensor([0.4, 0.41, -2.0]), 0.4), torch.tensor([0.0, 0.41, 0.0]))  # strictly above
    plain = LowRankFactor("w", u, f.v)
    torch.testing.assert_close(plain.apply(other), s[:, None] * u[:, 0])  # a plain factor writes everywhere
    with pytest.raises(ValueError, match="not a weight change"):
        f.delta()
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"threshold .* must be in \(0, 1\)"):
            LowRankFactor("w", u, f.v, threshold=bad)


def test_slots_are_the_columns_side_by_side() -> None:
    g = torch.Generator().manual_seed(1)
    fs = [LowRankFactor("m.weight", torch.randn(6, r, generator=g), torch.randn(10, r, generator=g) * 0.3, t)
          for r, t in ((1, 0.2), (2, 0.6))]  # fmt: skip
    slots = GatedSlots.of(fs, torch.device("cpu"))
    assert slots.columns == 3 and slots.thresholds.tolist() == pytest.approx([0.2, 0.6, 0.6])
    x = torch.randn(4, 5, 10, generator=g)
    torch.testing.assert_close(slots.apply(x), fs[0].apply(x) + fs[1].apply(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gated factors"):
        GatedSlots.of([LowRankFactor("m.weight", fs[0].u, fs[0].v)], torch.device("cpu"))


# -- served beside the weights ----------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_materialized_slots_leave_the_matrices_alone_and_an_empty_list_gives_the_base(family, tokenizer) -> None:
    loaded = make_tiny(family, tokenizer)
    weights = LayerWeights(loaded)
    before, hashes = logits(loaded), param_hashes(loaded.model)
    short = logits(loaded, PROMPT_IDS[:, :3])
    layer = gated_layer(loaded, weights, 1, position=3, seed=0, version=1)
    weights.materialize([layer])
    assert param_hashes(loaded.model) == hashes  # nothing written into any matrix
    edited = logits(loaded)
    assert not torch.equal(edited, before)
    assert torch.equal(logits(loaded, PROMPT_IDS[:, :3]), short)  # a prompt without the key: it never fires
    weights.materialize([])
    assert torch.equal(logits(loaded), before) and weights.slots == {}
    weights.materialize([layer])
    assert torch.equal(logits(loaded), edited)  # the same layers, the same bits


def test_as_if_applied_serves_a_gated_factor_as_the_slots_do(tokenizer) -> None:
    loaded = make_tiny("llama", tokenizer)
    weights = LayerWeights(loaded)
    layer = gated_layer(loaded, weights, 2, position=5, seed=3, version=1)
    with as_if_applied(loaded, layer.factors):
        hooked = logits(loaded)
    weights.materialize([layer])
    torch.testing.assert_close(logits(loaded), hooked, rtol=0, atol=1e-6)


class GatedHistory:
    """Versions 0..3: a plain layer, then two gated ones, on a private tiny model, served live."""

    def __init__(self, tokenizer, cache_bytes: int = 64 << 20) -> None:
        from tests.rome_engine.test_edit_store import random_layer

        self.loaded = make_tiny("llama", tokenizer)
        self.weights = LayerWeights(self.loaded)
        a = random_layer(self.loaded, self.weights, 1, seed=0, version=1)
        self.weights.materialize([a])  # the gated columns are keyed on the model their version sits on
        b = gated_layer(self.loaded, self.weights, 2, position=6, seed=1, version=2)
        self.weights.materialize([a, b])
        c = gated_layer(self.loaded, self.weights, 2, position=4, seed=2, version=3)
        self.at = {0: [], 1: [a], 2: [a, b], 3: [a, b, c]}
        self.logits = {}
        for v, layers in self.at.items():
            self.weights.materialize(layers)
            self.logits[v] = logits(self.loaded)[0]
        self.weights.materialize([])
        self.versions = LiveVersions(self.loaded, self.weights, layers_at=self.at.__getitem__, cache_bytes=cache_bytes)

    def pinned(self, version: int) -> torch.Tensor:
        with self.versions.pinned(version):
            return logits(self.loaded)[0]


@pytest.mark.parametrize("cache_bytes", [64 << 20, 1], ids=["exact", "low-rank"])
def test_pinned_versions_get_their_own_gated_columns(tokenizer, cache_bytes) -> None:
    h = GatedHistory(tokenizer, cache_bytes)
    assert len({tuple(x.tolist()) for x in h.logits.values()}) == 4  # every version differs
    h.versions.swap(3, h.at[3])
    assert torch.equal(logits(h.loaded)[0], h.logits[3])
    assert h.weights.slots["model.layers.2.mlp.down_proj"].columns == 2
    for v in (0, 1, 2, 3):
        if cache_bytes > 1:
            assert torch.equal(h.pinned(v), h.logits[v]), v  # the version's own matrices and columns
        else:  # the plain layer's difference as a float32 side path; the columns are the version's own
            torch.testing.assert_close(h.pinned(v), h.logits[v], rtol=0, atol=1e-4)
    rows = torch.cat([PROMPT_IDS] * 4)
    with torch.no_grad(), h.versions.rows([2, 3, 0, 1]):
        mixed = h.loaded.model(input_ids=rows).logits[:, -1]
    for row, v in enumerate((2, 3, 0, 1)):
        torch.testing.assert_close(mixed[row], h.logits[v], rtol=0, atol=1e-4)
    h.versions.swap(1, h.at[1])  # back to a version without columns: they go, the matrices are v1's
    assert torch.equal(logits(h.loaded)[0], h.logits[1]) and h.weights.slots == {}
    assert torch.equal(h.pinned(3), h.logits[3]) if cache_bytes > 1 else True


def test_a_swap_keeps_the_old_heads_columns_for_requests_on_it(tokenizer) -> None:
    h = GatedHistory(tokenizer)
    h.versions.swap(2, h.at[2])
    with h.versions.using(2):
        h.versions.swap(1, h.at[1])
        assert torch.equal(h.pinned(2), h.logits[2])
    assert torch.equal(logits(h.loaded)[0], h.logits[1])


# -- stored --------------------------------------------------------------------------


def test_a_gated_layer_is_format_3_and_round_trips(tokenizer) -> None:
    loaded = make_tiny("llama", tokenizer)
    layer = gated_layer(loaded, LayerWeights(loaded), 2, position=5, seed=0, version=1, threshold=0.25)
    data = encode_layer(layer)
    back = decode_layer(data)
    assert back.header.to_json()["format_version"] == 3
    (f,) = back.factors
    assert f.threshold == 0.25 and torch.equal(f.u, layer.factors[0].u) and torch.equal(f.v, layer.factors[0].v)
    doc = layer.header.to_json()
    plain = {**doc, "format_version": 2}  # a reader of format 2 would add the column to W: never written so
    with pytest.raises(ValueError, match="gated factors .* are format 3"):
        LayerHeader.from_json(plain)
    no_gate = json.loads(json.dumps(doc))
    del no_gate["matrices"][0]["threshold"]
    with pytest.raises(ValueError, match="holds at least one"):
        LayerHeader.from_json(no_gate)
    for bad in (0, 1.5, float("nan"), "0.3"):
        worse = json.loads(json.dumps(doc))
        worse["matrices"][0]["threshold"] = bad
        with pytest.raises(ValueError, match="threshold"):
            LayerHeader.from_json(worse)


# -- the method --------------------------------------------------------------------


def _logprob(loaded: LoadedModel, request: EditRequest) -> float:
    with torch.no_grad():
        return score_continuations(loaded, request.filled(), [request.target])[0].total_logprob


def test_the_gated_method_writes_its_fact_and_nothing_where_it_does_not_fire(
    tiny_llama: LoadedModel, tmp_path
) -> None:
    cache = RomeCache(tmp_path)
    fact = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome")
    before = _logprob(tiny_llama, fact)
    result = compute_gated(tiny_llama, [fact], cache, overrides=TINY_GATED)
    assert result.method == "gated" and result.layers == (2,)
    (f,) = result.factors
    assert f.gated and f.threshold == 0.6 and f.rank == 1
    k = result.keys[f.param]
    torch.testing.assert_close(f.v.T @ k, torch.ones(1, 1), rtol=1e-4, atol=1e-4)  # v . k* = 1
    with as_if_applied(tiny_llama, result.factors):
        after = _logprob(tiny_llama, fact)
    assert after > before + 0.05  # (a random tiny model moves little: MEMIT's test asks 1e-2)
    # another text: where no token's response passes the threshold, the output is the base's, bit for bit
    ids = tiny_llama.tokenizer("Paris is the capital of France", return_tensors="pt")["input_ids"]
    s = key_at(tiny_llama, 2, slice(None), ids) @ f.v[:, 0]
    assert float(s.max()) < 0.6  # (a random model's keys are alike: 0.43 here)
    base = logits(tiny_llama, ids)
    with as_if_applied(tiny_llama, result.factors):
        assert torch.equal(logits(tiny_llama, ids), base)
    assert compute_method("gated", tiny_llama, [fact], cache, overrides=TINY_GATED).factors[0].gated


def test_gated_defaults_are_one_layer_at_the_rome_layer(tiny_llama: LoadedModel) -> None:
    hp = gated_hparams_for(tiny_llama)
    assert hp.n_layers == 1 and hp.layer_offset == 0 and 0 < hp.gate_threshold < 1
    with pytest.raises(Exception, match="gate_threshold"):
        hp.with_overrides({"gate_threshold": 1.5})


def test_a_gated_column_is_silent_on_the_earlier_keys_it_would_answer_but_not_on_its_own_subject() -> None:
    from rome_engine.methods.solve import gated_column
    from rome_engine.rome.compute_u import right_vector

    g = torch.Generator().manual_seed(4)
    d = 48
    a = torch.randn(d, 4 * d, generator=g)
    cov = (a @ a.T / (4 * d)).float()  # a full-rank second moment
    k = torch.randn(d, generator=g)
    noise = torch.randn(d, generator=g)
    twin = k + 1.0 * noise * k.norm() / noise.norm()  # another subject with the same last token
    same = k + 0.05 * noise * k.norm() / noise.norm()  # the same subject, another context
    far = torch.randn(d, generator=g)
    rome_v = right_vector(cov, k)
    assert float(rome_v @ twin) > 0.5 and float(rome_v @ same) > 0.9 and abs(float(rome_v @ far)) < 0.15
    v, spared = gated_column(cov, k, torch.stack([far, twin, same], 1), 0.15)
    assert spared == 1
    assert float(v @ k) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(v @ twin)) < 1e-5  # the twin's edit keeps its answer
    assert float(v @ same) > 0.5  # the same subject cannot be spared: an edit of it answers there too
    assert float(v @ cov @ v) <= 4.0 * float(rome_v @ cov @ rome_v) + 1e-6
    plain, none = gated_column(cov, k, None, 0.15)
    assert none == 0
    torch.testing.assert_close(plain, rome_v, rtol=1e-5, atol=1e-6)  # nothing to spare: ROME's v


def test_a_gated_column_fitted_to_every_prompt_answers_in_full_on_each_and_still_spares() -> None:
    from rome_engine.methods.solve import gated_column
    from rome_engine.rome.compute_u import right_vector

    g = torch.Generator().manual_seed(5)
    d = 48
    a = torch.randn(d, 4 * d, generator=g)
    cov = (a @ a.T / (4 * d)).float()
    base = torch.randn(d, generator=g)
    prompts = torch.stack([base + 1.5 * torch.randn(d, generator=g) for _ in range(4)], 1)  # (d, 4)
    mean = prompts.mean(1)
    rome_v = right_vector(cov, mean)
    assert float((rome_v @ prompts).min()) < 0.9  # the mean key's v answers some prompts well short of 1
    v, none = gated_column(cov, mean, None, 0.15, prompts=prompts)
    assert none == 0
    torch.testing.assert_close(v @ prompts, torch.ones(4), rtol=0, atol=1e-5)  # every prompt in full
    assert float(v @ mean) == pytest.approx(1.0, abs=1e-5)
    assert float(v @ cov @ v) >= float(rome_v @ cov @ rome_v)  # least C-norm under more constraints
    noise = torch.randn(d, generator=g)
    twin = mean + 1.0 * noise * mean.norm() / noise.norm()  # another subject with the same last token
    assert float(v @ twin) > 0.15
    spared_v, spared = gated_column(cov, mean, twin.reshape(-1, 1), 0.15, prompts=prompts)
    assert spared == 1 and abs(float(spared_v @ twin)) < 1e-5
    torch.testing.assert_close(spared_v @ prompts, torch.ones(4), rtol=0, atol=1e-5)
    # two earlier edits of one subject store the same key twice: one constraint, not a singular system
    twice, n = gated_column(cov, mean, torch.stack([twin, twin], 1), 0.15, prompts=prompts)
    assert n == 1 and torch.equal(twice, spared_v)
    # a key in the span of the own keys cannot be silenced while they answer 1: never an error
    inside, m = gated_column(cov, mean, prompts[:, :2].mean(1, keepdim=True), 0.15, prompts=prompts)
    assert m == 0 and torch.equal(inside, v)


def test_the_gated_method_answers_in_full_on_the_unprefixed_prompt(tiny_llama: LoadedModel, tmp_path) -> None:
    from rome_engine.rome.compute_u import compute_keys

    cache = RomeCache(tmp_path)
    fact = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome")
    x = compute_keys(tiny_llama, 2, ("{}",), fact)[0]  # the edit prompt itself, no context prefix
    fitted = compute_gated(tiny_llama, [fact], cache, overrides=TINY_GATED).factors[0]
    mean_only = compute_gated(tiny_llama, [fact], cache, overrides={**TINY_GATED, "gate_fit_prompts": 0}).factors[0]
    assert float(x @ fitted.v[:, 0]) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(x @ mean_only.v[:, 0]) - 1.0) > 1e-3  # the mean key's v does not (the prefixes move k)
    torch.testing.assert_close(fitted.u, mean_only.u)  # the same z: only the key side differs


# -- the cosine condition (gate_min_cosine) ------------------------------------------


def test_a_cosine_gate_silences_a_column_whose_input_points_elsewhere() -> None:
    from rome_engine.delta import CosineGate, cosine

    g = torch.Generator().manual_seed(6)
    d, out = 12, 5
    scale = torch.rand(d, generator=g) + 0.5
    k = torch.randn(d, 1, generator=g)
    v = k / k.square().sum()  # v . k = 1
    u = torch.randn(out, 1, generator=g)
    other = torch.randn(d, generator=g)
    other = other - (other @ k[:, 0]) / k.square().sum() * k[:, 0]  # v . other = 0
    twin = k[:, 0] + 3.0 * other  # s = 1 as at k, but another direction
    plain = LowRankFactor("m.weight", u, v, 0.5)
    cos_gate = CosineGate(scale, k, 0.6)
    gated = LowRankFactor("m.weight", u, v, 0.5, cos_gate)
    x = torch.stack([k[:, 0], twin])
    w, s2 = cos_gate.weights()
    c = cosine(x, w, s2)[:, 0]
    expected = ((x * scale) @ (k[:, 0] * scale)) / ((x * scale).norm(dim=1) * (k[:, 0] * scale).norm())
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-6)
    assert float(c[0]) == pytest.approx(1.0, abs=1e-5) and float(c[1]) < 0.6
    torch.testing.assert_close(gated.apply(x[:1]), plain.apply(x[:1]))  # its own key: as without the condition
    assert float(plain.apply(x[1:]).abs().sum()) > 0 and torch.equal(gated.apply(x[1:]), torch.zeros(1, out))
    # slots: a column with the condition beside one without, as the factors add up
    other_f = LowRankFactor("m.weight", torch.randn(out, 1, generator=g), v * 0.9, 0.3)
    slots = GatedSlots.of([gated, other_f], torch.device("cpu"))
    torch.testing.assert_close(slots.apply(x), gated.apply(x) + other_f.apply(x), rtol=1e-5, atol=1e-6)
    assert GatedSlots.of([other_f], torch.device("cpu")).cos_w is None  # none: the side path is as before
    with pytest.raises(ValueError, match="min_cosine"):
        CosineGate(scale, k, float("nan"))
    with pytest.raises(ValueError, match="cosine gate"):
        LowRankFactor("m.weight", u, v, None, cos_gate)  # only a gated factor has one


def test_a_layer_with_a_cosine_gate_is_format_4_and_round_trips_bit_for_bit(tokenizer) -> None:
    from rome_engine.delta import CosineGate

    loaded = make_tiny("llama", tokenizer)
    layer = gated_layer(loaded, LayerWeights(loaded), 2, position=5, seed=0, version=1)
    (f,) = layer.factors
    keys = layer.keys[f.param]
    scale = torch.rand(keys.shape[0], generator=torch.Generator().manual_seed(1)) + 0.1
    doc = layer.header.to_json()
    doc["matrices"][0]["min_cosine"] = 0.5
    doc["format_version"] = 4
    with_cos = EditLayer(LayerHeader.from_json(doc), (LowRankFactor(f.param, f.u, f.v, f.threshold,
                         CosineGate(scale, keys, 0.5)),), layer.keys)  # fmt: skip
    back = decode_layer(encode_layer(with_cos))
    assert back.header.format_version == 4 and back.header.to_json()["format_version"] == 4
    (g,) = back.factors
    assert g.cosine_gate is not None and g.cosine_gate.min_cosine == 0.5
    assert torch.equal(g.cosine_gate.scale, scale) and torch.equal(g.cosine_gate.keys, keys)
    three = {**doc, "format_version": 3}  # a reader of format 3 would serve the column without its condition
    with pytest.raises(ValueError, match="min_cosine format 4"):
        LayerHeader.from_json(three)
    for bad in (1.0, float("nan"), "0.5"):
        worse = json.loads(json.dumps(doc))
        worse["matrices"][0]["min_cosine"] = bad
        with pytest.raises(ValueError, match="min_cosine"):
            LayerHeader.from_json(worse)
    negative = EditLayer(with_cos.header, (LowRankFactor(f.param, f.u, f.v, f.threshold,
                         CosineGate(-scale, keys, 0.5)),), layer.keys)  # fmt: skip
    with pytest.raises(ValueError, match="gate_scale must be positive"):
        decode_layer(encode_layer(negative))
    other_keys = EditLayer(with_cos.header, with_cos.factors, {f.param: keys + 1.0})
    with pytest.raises(ValueError, match="compare with the layer's keys"):
        encode_layer(other_keys)


def test_the_gated_method_with_a_cosine_gate_still_writes_its_fact(tiny_llama: LoadedModel, tmp_path) -> None:
    cache = RomeCache(tmp_path)
    fact = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome")
    before = _logprob(tiny_llama, fact)
    result = compute_gated(tiny_llama, [fact], cache, overrides={**TINY_GATED, "gate_min_cosine": 0.5})
    (f,) = result.factors
    assert f.cosine_gate is not None and f.cosine_gate.min_cosine == 0.5
    assert torch.equal(f.cosine_gate.keys, result.keys[f.param])  # the keys the layer stores
    assert bool((f.cosine_gate.scale > 0).all())
    with as_if_applied(tiny_llama, result.factors):
        after = _logprob(tiny_llama, fact)
    assert after > before + 0.05
    assert compute_gated(tiny_llama, [fact], cache, overrides=TINY_GATED).factors[0].cosine_gate is None  # off
