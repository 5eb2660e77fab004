"""Loading: every family of the table from a folder on disk, dtype/device, errors."""

from __future__ import annotations

import json

import pytest
import torch

from rome_engine.arch import FAMILIES, spec_for
from rome_engine.errors import UnsupportedModel
from rome_engine.generation import SamplingParams, generate_tokens
from rome_engine.loading import load_model, resolve_dtype
from tests.conftest import make_tiny


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"])
def test_each_family_loads_from_a_folder_and_generates(family, tokenizer, tmp_path) -> None:  # noqa: ANN001
    tiny = make_tiny(family, tokenizer)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu", dtype="float32")
    assert loaded.spec.family == spec_for(tiny.model).family
    assert loaded.num_layers == 4
    # the table's names resolve to real modules of this family
    spec = loaded.spec
    w = spec.mlp_out_weight(loaded.model, 0)
    out_in = spec.as_out_in(w)
    assert out_in.shape[0] == 64  # (hidden, intermediate) in (out, in) layout
    ids = tokenizer("Hello world")["input_ids"]
    chunks = list(generate_tokens(loaded, ids, SamplingParams(max_new_tokens=5)))
    assert chunks[-1].finish_reason in ("length", "eos")
    for a, b in zip(tiny.model.parameters(), loaded.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bfloat16_load(tokenizer, tmp_path) -> None:  # noqa: ANN001
    tiny = make_tiny("llama", tokenizer)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.dtype_name == "bfloat16"
    chunks = list(generate_tokens(loaded, tokenizer("Hi")["input_ids"], SamplingParams(max_new_tokens=3)))
    assert chunks[-1].finish_reason is not None


def test_unknown_architecture_lists_the_supported_ones(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedModel) as err:
        load_model(tmp_path, device="cpu")
    msg = str(err.value)
    assert "'bert'" in msg
    for spec in FAMILIES:
        for t in spec.model_types:
            assert t in msg


def test_dtype_and_device_options() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_model("/nonexistent", device="cuda")


def test_missing_folder_fails_clearly(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(OSError):
        load_model(tmp_path / "nope", device="cpu")
