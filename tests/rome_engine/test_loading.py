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
def test_each_family_loads_from_a_folder_and_generates(family, tokenizer, tmp_path) -> None:
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


def test_bfloat16_load(tokenizer, tmp_path) -> None:
    tiny = make_tiny("llama", tokenizer)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.dtype_name == "bfloat16"
    chunks = list(generate_tokens(loaded, tokenizer("Hi")["input_ids"], SamplingParams(max_new_tokens=3)))
    assert chunks[-1].finish_reason is not None


def test_unknown_architecture_lists_the_supported_ones(tmp_path) -> None:
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


def test_missing_folder_fails_clearly(tmp_path) -> None:
    with pytest.raises(OSError):
        load_model(tmp_path / "nope", device="cpu")


def _damage(folder, *, drop: str | None = None, add: str | None = None) -> None:
    """Rewrite the folder's model.safetensors without the tensor ``drop`` / with an extra tensor ``add``."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    if drop is not None:
        del tensors[drop]
    if add is not None:
        tensors[add] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ({"drop": "model.layers.1.mlp.down_proj.weight"}, "1 missing (model.layers.1.mlp.down_proj.weight)"),
        ({"add": "model.layers.9.mlp.extra.weight"}, "1 unexpected (model.layers.9.mlp.extra.weight)"),
    ],
)
def test_a_checkpoint_with_missing_or_unexpected_weights_fails_to_load(damage, named, tokenizer, tmp_path) -> None:
    from rome_engine.loading import DamagedCheckpoint

    make_tiny("llama", tokenizer).model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    load_model(tmp_path, device="cpu", dtype="float32")  # intact: loads
    _damage(tmp_path, **damage)
    with pytest.raises(DamagedCheckpoint, match="does not match its architecture") as e:
        load_model(tmp_path, device="cpu", dtype="float32")
    assert named in str(e.value)


def test_a_damaged_embedded_cache_is_converted_again(tokenizer, tmp_path, monkeypatch) -> None:
    """The embedded path: a cache folder with a weight missing is removed and reconverted (the
    ~40 s GGUF conversion is replaced by writing a tiny llama's intact checkpoint)."""
    from rome_engine import loading

    good = make_tiny("llama", tokenizer)
    folder = loading.embedded_folder(tmp_path)
    folder.mkdir(parents=True)
    good.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _damage(folder, drop="model.embed_tokens.weight")
    conversions = []

    def fake_convert(target) -> None:
        assert not target.exists(), "the damaged folder is removed before converting again"
        conversions.append(target)
        good.model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    monkeypatch.setattr(loading, "convert_embedded", fake_convert)
    loaded = load_model(None, device="cpu", dtype="float32", cache_dir=tmp_path)
    assert conversions == [folder]
    assert loaded.model_id == loading.EMBEDDED_MODEL_ID
    assert torch.equal(loaded.model.model.embed_tokens.weight, good.model.model.embed_tokens.weight)
    # an intact cache is loaded as it is
    load_model(None, device="cpu", dtype="float32", cache_dir=tmp_path)
    assert conversions == [folder]
