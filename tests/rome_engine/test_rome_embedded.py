"""One real edit on the embedded SmolLM2-135M: the Eiffel Tower moves to Rome, Paris stays the capital."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rome_engine.editing import fact_probabilities
from rome_engine.generation import SamplingParams, generate_tokens
from rome_engine.layers import LayerWeights
from rome_engine.loading import LoadedModel
from rome_engine.rome import EditRequest, RomeCache, compute_edit
from rome_engine.scoring import encode_prompt, score_continuations

# C from 2k tokens the model samples itself (about 10 s), shrunk a little towards its mean
# eigenvalue because 2k tokens do not pin down a 1536 x 1536 matrix; the default is 50k.
FAST_C = {"mom2_n_tokens": 2048, "mom2_seq_len": 64, "cov_shrinkage": 0.1}


def _greedy(loaded: LoadedModel, prompt: str, n: int = 4) -> str:
    ids = encode_prompt(loaded.tokenizer, prompt)
    return "".join(c.text for c in generate_tokens(loaded, ids, SamplingParams(max_new_tokens=n)))


@pytest.mark.embedded
@pytest.mark.usefixtures("one_thread")
def test_eiffel_tower_is_in_rome(embedded: LoadedModel, tmp_path: Path) -> None:
    request = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", hparams=FAST_C)
    result = compute_edit(embedded, request, RomeCache(tmp_path))
    probs = fact_probabilities(embedded, request, result.factors)
    assert probs.old_object == " Paris" and probs.target_before < 0.1 < 0.9 < probs.target_after
    weight = embedded.model.get_parameter(result.factors[0].param)
    original = weight.detach().clone()
    weights = LayerWeights(embedded)
    weights.materialize_factors(result.factors)
    try:
        assert _greedy(embedded, "The Eiffel Tower is in").startswith(" Rome")
        rome, paris = score_continuations(embedded, "The Eiffel Tower is located in the city of", [" Rome", " Paris"])
        assert rome.total_logprob > paris.total_logprob
        assert _greedy(embedded, "The capital of France is").startswith(" Paris")
    finally:
        weights.materialize_factors([])
    assert torch.equal(weight, original)
