"""Edit layer files built by tests: valid ones with random factors, or any header at all."""

from __future__ import annotations

import hashlib
import json
import uuid

import torch
from safetensors.torch import save as safetensors_save

from romegw_client.types import LayerFile

LAYER = 1  # the MLP output projection the test layers touch


def layer_parts(loaded, weights, *, seed: int = 0, scale: float = 0.05) -> tuple[dict, dict[str, torch.Tensor]]:
    """A valid layer for ``loaded``: its header and its factors (small: ||u v^T|| well under ||W||)."""
    name = loaded.spec.mlp_out_weight_name(LAYER)
    out_dim, in_dim = loaded.spec.as_out_in(weights.parameter(name)).shape
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(out_dim, generator=g) * scale, torch.randn(in_dim, generator=g) * scale
    header = {
        "format_version": 1, "edit_id": str(uuid.uuid4()), "version": 1, "parent_version": 0,
        "created_at": "2026-01-01T00:00:00Z", "author": "elsewhere", "comment": "",
        "request": {"prompt": "{} is in", "subject": "X", "target": " Y", "layer": LAYER, "hparams": {"v_lr": 0.5}},
        "layer": LAYER,
        "matrices": [{"name": name, "shape": [out_dim, in_dim], "dtype": "float32",
                      "update_norm": float(u.norm() * v.norm())}],
        "base_fingerprint": weights.fingerprint([name]).to_json(),
        "probabilities": {"target_before": 0.1, "target_after": 0.9, "old_before": 0.5, "old_after": 0.1,
                          "old_object": " Z"},
        "compute_seconds": 1.0,
    }
    return header, {f"{name}.u": u, f"{name}.v": v}


def encode(header: object, tensors: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file with any header (not only a valid one)."""
    return safetensors_save(tensors, metadata={"romegw": json.dumps(header)})


def layer_file(content: bytes, edit_id: str = "x") -> LayerFile:
    return LayerFile(filename="x.safetensors", content=content, version=1, edit_id=edit_id,
                     sha256=hashlib.sha256(content).hexdigest())
