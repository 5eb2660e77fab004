"""The edit store: versioned edit layers on disk.

On-disk format (``format_version`` 1), under the store folder ``DIR``::

    DIR/
      manifest.json                      the history, rewritten atomically on every change
      layers/<edit_id>.safetensors       one file per edit layer, never modified once written

A **layer file** is a safetensors file. Its tensors are the factors of every
matrix the edit touches, float32, never a dense matrix::

    "<param>.u"   (out_features,)   # in the (out, in) layout of the weight
    "<param>.v"   (in_features,)    # update: W[out, in] += u v^T (transposed for Conv1D storage)

and its metadata holds one key, ``romegw``, a JSON header: ``format_version``,
``edit_id`` (a UUID), ``version`` (the version this edit created), ``parent_version``,
``created_at`` (UTC ISO-8601), ``author``, ``comment``, ``request`` (prompt,
subject, target, layer, hyperparameters), ``matrices`` (name, shape, dtype,
update norm), ``base_fingerprint`` (model id and the sha256 of every touched
base matrix: a layer is applied only onto the base it was computed on), the
pre/post ``probabilities`` and ``compute_seconds``.

The **manifest** is JSON: ``{"format_version": 1, "model_id": ..., "entries": [...]}``.
Entries are only ever appended (history is never rewritten); each is one of::

    {"op": "apply",  "version": V, "parent_version": P, "edit_id": ..., "file": "layers/<id>.safetensors",
     "sha256": <of the file>, "active": [edit ids, oldest first], "at": ..., "author": ..., "comment": ...}
    {"op": "revert", "version": V, "from_version": F, "to_version": N | null, "edit_id": <removed> | null,
     "active": [...], "at": ..., "author": ..., "comment": ...}
    {"op": "import", ... same fields as apply, plus "origin_version"}
    {"op": "recover", "version": V, "from_version": F, "active": [...], "reason": ...}

(``recover`` is written at start when the head's layers cannot all be
verified: the server serves the newest version whose layers all check out.)

``version`` is the state the entry leads to. Every version names one set of
active layers (its ``active`` list), so the weights of any version are
rebuilt exactly from the pristine base plus those layers. ``apply`` and
``import`` create a new version (one more than the largest so far); reverting
to version N makes N the head again (its weights, bit for bit); removing one
layer from the middle creates a new version without it (later layers were
computed on top of it and stay).

Writes are atomic: a temporary file in the same folder, fsync, rename, fsync
of the folder. A layer file is written before the manifest entry that names
it, so a crash leaves either the whole edit or none of it (an orphaned layer
file is ignored and removed at the next start). A layer whose sha256 or base
fingerprint does not match is never applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from .errors import FailedPrecondition, NotFound

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LAYERS = "layers"
HEADER_KEY = "romegw"


# ------------------------------------------------------------------ atomic I/O


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype)."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ------------------------------------------------------------------ layer files


@dataclass(frozen=True)
class RankOneFactor:
    """One matrix's update in (out, in) layout: delta = outer(u, v)."""

    param: str
    u: torch.Tensor  # (out,) float32
    v: torch.Tensor  # (in,) float32

    @property
    def norm(self) -> float:
        # ||u v^T||_F = ||u|| ||v||
        return float(self.u.norm() * self.v.norm())


@dataclass(frozen=True)
class EditLayer:
    """A layer as stored: its header and its factors."""

    header: dict
    factors: tuple[RankOneFactor, ...]

    @property
    def edit_id(self) -> str:
        return self.header["edit_id"]

    @property
    def version(self) -> int:
        return int(self.header["version"])


def encode_layer(layer: EditLayer) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for f in layer.factors:
        tensors[f"{f.param}.u"] = f.u.detach().float().contiguous().cpu()
        tensors[f"{f.param}.v"] = f.v.detach().float().contiguous().cpu()
    return safetensors_save(tensors, metadata={HEADER_KEY: json.dumps(layer.header, sort_keys=True)})


def decode_layer(data: bytes) -> EditLayer:
    """Parse a layer file; ValueError if it is not a well-formed layer."""
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load(data)
        header = _read_header_bytes(data)
    except Exception as e:  # safetensors raises several kinds on malformed input
        raise ValueError(f"not a readable safetensors layer file: {e}") from e
    params = sorted({k.rsplit(".", 1)[0] for k in tensors})
    factors = []
    for p in params:
        if f"{p}.u" not in tensors or f"{p}.v" not in tensors:
            raise ValueError(f"layer file has {p}.u or {p}.v but not both")
        factors.append(RankOneFactor(p, tensors[f"{p}.u"], tensors[f"{p}.v"]))
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported layer format_version {header.get('format_version')!r}")
    return EditLayer(header, tuple(factors))


def _read_header_bytes(data: bytes) -> dict:
    # safetensors layout: 8-byte little-endian header length, then the JSON header
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    if HEADER_KEY not in meta:
        raise ValueError(f"no {HEADER_KEY!r} header in the layer's metadata")
    return json.loads(meta[HEADER_KEY])


def read_layer_header(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[HEADER_KEY])


# ------------------------------------------------------------------ manifest


@dataclass
class Manifest:
    model_id: str
    entries: list[dict] = field(default_factory=list)

    @property
    def head(self) -> dict | None:
        return self.entries[-1] if self.entries else None

    @property
    def head_version(self) -> int:
        return int(self.entries[-1]["version"]) if self.entries else 0

    @property
    def max_version(self) -> int:
        return max((int(e["version"]) for e in self.entries), default=0)

    def active_at(self, version: int) -> list[str]:
        """The active layers (oldest first) of a version; NotFound if it never existed."""
        if version == 0:
            return []
        for e in reversed(self.entries):
            if int(e["version"]) == version:
                return list(e["active"])
        raise NotFound(f"version {version} does not exist (versions 0..{self.max_version} exist)")

    def versions(self) -> list[int]:
        return [0, *(int(e["version"]) for e in self.entries)]

    def apply_entries(self) -> dict[str, dict]:
        """edit_id -> its apply/import entry."""
        return {e["edit_id"]: e for e in self.entries if e["op"] in ("apply", "import")}

    def to_json(self) -> bytes:
        doc = {"format_version": FORMAT_VERSION, "model_id": self.model_id, "entries": self.entries}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        doc = json.loads(data)
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format_version {doc.get('format_version')!r}")
        return cls(model_id=doc["model_id"], entries=list(doc["entries"]))


class EditStore:
    """A store folder: layer files and the manifest (see the module docstring)."""

    def __init__(self, root: Path | str, model_id: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / LAYERS).mkdir(exist_ok=True)
        self.manifest = self._load_manifest(model_id)

    # -- reading ------------------------------------------------------------

    def _load_manifest(self, model_id: str) -> Manifest:
        path = self.root / MANIFEST
        if not path.exists():
            return Manifest(model_id=model_id)
        manifest = Manifest.from_json(path.read_bytes())
        if manifest.model_id != model_id:
            raise FailedPrecondition(
                f"edit store {self.root} belongs to model {manifest.model_id!r}, not {model_id!r}: "
                "use another --edit-store folder"
            )
        return manifest

    def layer_path(self, edit_id: str) -> Path:
        return self.root / LAYERS / f"{edit_id}.safetensors"

    def read_layer(self, edit_id: str) -> tuple[EditLayer, bytes]:
        """The layer and its file bytes, checked against the manifest's sha256.

        ValueError when the file is missing, truncated or altered.
        """
        entry = self.manifest.apply_entries().get(edit_id)
        if entry is None:
            raise NotFound(f"no edit with id {edit_id!r}")
        path = self.root / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"layer file {path} cannot be read: {e}") from e
        if sha256_bytes(data) != entry["sha256"]:
            raise ValueError(f"layer file {path} does not match its checksum in the manifest (truncated or altered)")
        layer = decode_layer(data)
        if layer.edit_id != edit_id:
            raise ValueError(f"layer file {path} holds edit {layer.edit_id}, not {edit_id}")
        return layer, data

    def orphans(self) -> list[Path]:
        """Layer files no manifest entry names (left by a crash before the manifest write)."""
        named = {self.root / e["file"] for e in self.manifest.apply_entries().values()}
        return [p for p in (self.root / LAYERS).glob("*.safetensors") if p not in named]

    def remove_orphans(self) -> None:
        for p in self.orphans():
            log.warning("removing orphaned layer file %s (its edit never reached the manifest)", p)
            p.unlink(missing_ok=True)
        for p in (self.root / LAYERS).glob(".*.tmp"):
            p.unlink(missing_ok=True)
        for p in self.root.glob(".*.tmp"):
            p.unlink(missing_ok=True)

    # -- writing ------------------------------------------------------------

    def _commit(self, entry: dict) -> None:
        self.manifest.entries.append(entry)
        try:
            atomic_write(self.root / MANIFEST, self.manifest.to_json())
        except BaseException:
            self.manifest.entries.pop()
            raise

    def add_layer(self, layer: EditLayer, *, active: list[str], op: str = "apply", extra: dict | None = None) -> dict:
        """Write the layer file, then the manifest entry whose state has ``active`` layers."""
        data = encode_layer(layer)
        rel = f"{LAYERS}/{layer.edit_id}.safetensors"
        if layer.edit_id in self.manifest.apply_entries():
            raise FailedPrecondition(f"edit {layer.edit_id} is already in the store")
        atomic_write(self.root / rel, data)
        h = layer.header
        entry = {
            "op": op,
            "version": self.manifest.max_version + 1,
            "parent_version": self.manifest.head_version,
            "edit_id": layer.edit_id,
            "file": rel,
            "sha256": sha256_bytes(data),
            "active": list(active),
            "at": utc_now(),
            "author": h.get("author", ""),
            "comment": h.get("comment", ""),
            **(extra or {}),
        }
        try:
            self._commit(entry)
        except BaseException:
            with contextlib.suppress(OSError):
                (self.root / rel).unlink()
            raise
        return entry

    def add_state(
        self, op: str, *, version: int, active: list[str], author: str = "", comment: str = "", **extra: object
    ) -> dict:
        """Record a change of state without a new layer: a revert, or a recovery at start."""
        entry = {
            "op": op,
            "version": version,
            "from_version": self.manifest.head_version,
            "active": list(active),
            "at": utc_now(),
            "author": author,
            "comment": comment,
            **extra,
        }
        self._commit(entry)
        return entry
