"""C = E[k k^T] and the context prefixes: computed once, then read from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rome_engine.hooks import Trace, run_until_stopped, stop_after
from rome_engine.loading import LoadedModel
from rome_engine.rome import RomeCache, RomeHParams, context_templates, layer_covariance, right_vector
from rome_engine.rome.covariance import read_corpus

HP = RomeHParams(mom2_n_tokens=200, mom2_seq_len=24, mom2_batch_size=4, ctx_n_short=2, ctx_n_long=1, ctx_len_long=6)
TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "Rome is the capital city of Italy and a special comune.",
    "Mount Fuji is the highest mountain in Japan, about 3776 metres tall.",
    "The piano is a keyboard instrument in which the strings are struck by hammers.",
    "Tokyo is the capital of Japan and one of the most populous cities in the world.",
] * 4

pytestmark = pytest.mark.usefixtures("one_thread")


def test_covariance_is_cached_on_disk_and_in_memory(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    cache = RomeCache(tmp_path)
    c1, cached1 = layer_covariance(tiny_llama, 2, HP, cache)
    files = list(cache.model_dir(tiny_llama).glob("cov-L2-self-*.safetensors"))
    assert not cached1 and len(files) == 1
    assert list(cache.model_dir(tiny_llama).glob("text-sample-*.jsonl"))  # the sampled text is kept too
    c2, cached2 = layer_covariance(tiny_llama, 2, HP, cache)  # memory
    c3, cached3 = layer_covariance(tiny_llama, 2, HP, RomeCache(tmp_path))  # disk, fresh process
    assert cached2 and cached3
    assert torch.equal(c1, c2) and torch.equal(c1, c3)
    d = tiny_llama.model.config.intermediate_size
    assert c1.shape == (d, d) and c1.dtype == torch.float32
    torch.testing.assert_close(c1, c1.T)
    assert torch.linalg.eigvalsh(c1.double()).min() > -1e-6  # positive semi-definite


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_covariance_from_a_corpus_equals_the_mean_outer_product(
    tiny_gpt2: LoadedModel, tmp_path: Path, suffix: str
) -> None:
    corpus = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        corpus.write_text("\n\n".join(TEXTS), encoding="utf-8")
    else:
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    assert list(read_corpus(corpus)) == TEXTS
    hp = RomeHParams(mom2_n_tokens=100_000, mom2_seq_len=64, mom2_batch_size=3)  # more than the corpus holds
    c, cached = layer_covariance(tiny_gpt2, 1, hp, RomeCache(tmp_path / "cache", corpus=corpus))
    assert not cached
    # reference: every token's key, one text at a time
    name = tiny_gpt2.spec.mlp_out_name(1)
    keys = []
    for text in TEXTS:
        ids = torch.tensor([tiny_gpt2.tokenizer(text)["input_ids"]])
        with Trace(tiny_gpt2.model, [name], capture_input=True, capture_output=False) as tr, stop_after(
            tiny_gpt2.model, name
        ):
            run_until_stopped(tiny_gpt2.model, input_ids=ids)
        keys.append(tr[name].input[0].double())
    k = torch.cat(keys)  # (N, D_in)
    torch.testing.assert_close(c.double(), k.T @ k / k.shape[0], rtol=1e-4, atol=1e-6)


def test_right_vector_is_normalised(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    c, _ = layer_covariance(tiny_llama, 0, HP, RomeCache(tmp_path))
    k = torch.randn(c.shape[0])
    for shrink in (0.0, 0.1):
        r = right_vector(c, k, shrink)
        assert float(torch.dot(r.double(), k.double())) == pytest.approx(1.0, rel=1e-4)


def test_context_prefixes_are_generated_once(tiny_gpt2: LoadedModel, tmp_path: Path) -> None:
    cache = RomeCache(tmp_path)
    templates = context_templates(tiny_gpt2, HP, cache)
    assert templates[0] == "{}"
    assert len(templates) == 1 + HP.ctx_n_short + HP.ctx_n_long
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in templates[1:])
    (path,) = cache.model_dir(tiny_gpt2).glob("prefixes-*.json")
    assert json.loads(path.read_text())["prefixes"] == [t[: -len(". {}")] for t in templates[1:]]
    assert context_templates(tiny_gpt2, HP, RomeCache(tmp_path)) == templates  # from disk
    assert context_templates(tiny_gpt2, HP, cache) == templates  # from memory
