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

Writes are atomic (``fileio.atomic_write``): a temporary file in the same folder,
fsync, rename, fsync of the folder. A layer file is written before the manifest entry that names
it, so a crash leaves either the whole edit or none of it (an orphaned layer
file is ignored and removed at the next start). A layer whose sha256 or base
fingerprint does not match is never applied.

Nothing read from disk or from a caller is trusted: ``LayerHeader.from_json``
validates a header's whole schema, ``Manifest.from_json`` every entry, and an
``edit_id`` must be a canonical UUID before any path is built from it (every
path is then resolved and checked to lie inside ``layers/``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from .bounds import MAX_AUTHOR_CHARS, MAX_COMMENT_CHARS, check_text
from .errors import EngineError, FailedPrecondition, NotFound
from .fileio import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LAYERS = "layers"
HEADER_KEY = "romegw"
MAX_REQUEST_CHARS = 100_000  # a stored request's prompt, subject or target (the engine's max_prompt_chars)
MAX_HEADER_BYTES = 256 * 1024  # a header as JSON: every field above within its limit fits many times over
MAX_STORED_TEXT_CHARS = 1 << 30  # an author or comment an older server stored before the limits existed


# ------------------------------------------------------------------ hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype)."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ------------------------------------------------------------------ schema checks


def check_edit_id(value: object) -> str:
    """``value`` if it is a canonical (lowercase, hyphenated) UUID string, else ValueError.

    Every edit id is checked here before a path is built from it.
    """
    if isinstance(value, str) and len(value) == 36:
        with contextlib.suppress(ValueError):
            if str(uuid.UUID(value)) == value:
                return value
    raise ValueError(f"edit_id must be a UUID like {uuid.UUID(int=0)}, got {_short(value)}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}..."


INT32_MAX, INT63_MAX = 2**31 - 1, 2**63 - 1  # the API's int32 fields (layers, shapes) and versions


def _int(doc: dict, key: str, *, lo: int = 0, hi: int = INT32_MAX) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{key} must be an integer in [{lo}, {hi}], got {_short(value)}")
    return value


def _str(doc: dict, key: str, *, limit: int = MAX_COMMENT_CHARS, default: str | None = None) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {_short(value)}")
    try:
        return check_text(key, value, limit)
    except EngineError as e:
        raise ValueError(str(e)) from None


def _number(doc: dict, key: str, *, default: float | None = None) -> float:
    value = doc.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {_short(value)}")
    return float(value)


def _dict(doc: dict, key: str, *, default: dict | None = None) -> dict:
    value = doc.get(key, default)
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object, got {_short(value)}")
    return value


@dataclass(frozen=True)
class MatrixRecord:
    """One touched matrix as the header lists it: (out, in) shape and ||u v^T||_F."""

    name: str
    shape: tuple[int, int]  # (out, in)
    update_norm: float

    @classmethod
    def from_json(cls, doc: object) -> MatrixRecord:
        if not isinstance(doc, dict):
            raise ValueError(f"each of matrices must be a JSON object, got {_short(doc)}")
        name = _str(doc, "name", limit=256)
        shape = doc.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= INT32_MAX for n in shape)
        ):
            raise ValueError(f"matrices[{name}].shape must be two positive integers [out, in], got {_short(shape)}")
        if "dtype" in doc:
            _str(doc, "dtype", limit=32)
        return cls(name, (shape[0], shape[1]), _number(doc, "update_norm"))


_PROBABILITIES = ("target_before", "target_after", "old_before", "old_after")


@dataclass(frozen=True)
class LayerHeader:
    """The validated ``romegw`` header of a layer file (the schema in one place).

    ``from_json`` raises ValueError naming the first field that is missing or
    malformed; a header it accepts can be stored, listed and restored.
    """

    edit_id: str
    version: int
    parent_version: int
    author: str
    comment: str
    request: dict  # prompt, subject, target (str), layer (int), hparams (str -> number or null)
    matrices: tuple[MatrixRecord, ...]
    fingerprint: dict[str, str]  # touched matrix -> sha256 of its base

    @classmethod
    def from_json(cls, doc: object, *, stored: bool = False) -> LayerHeader:
        """``stored``: a header this store wrote itself (its sha256 is in the manifest). An author or
        comment longer than today's limits was legal when an older server stored it: it is kept
        (the API clips it when echoing), where an import or a new edit is refused."""
        if not isinstance(doc, dict):
            raise ValueError(f"the {HEADER_KEY} header must be a JSON object, got {_short(doc)}")
        if type(doc.get("format_version")) is not int or doc["format_version"] != FORMAT_VERSION:
            raise ValueError(f"unsupported layer format_version {_short(doc.get('format_version'))}")
        try:  # every string is echoed by the API: lone surrogates (valid JSON escapes) cannot be
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, ValueError) as e:
            raise ValueError(f"the header holds text that is not valid Unicode: {e}") from None
        size = len(json.dumps(doc))  # as the API echoes it (header_json, non-ASCII escaped)
        if not stored and size > MAX_HEADER_BYTES:
            raise ValueError(
                f"the header is {size} bytes as JSON, over the limit of {MAX_HEADER_BYTES}: "
                "a layer's header holds its request and provenance, nothing bulky"
            )
        edit_id = check_edit_id(doc.get("edit_id"))
        version = _int(doc, "version", lo=1, hi=INT63_MAX)
        parent = _int(doc, "parent_version", hi=INT63_MAX)
        text_limit = MAX_STORED_TEXT_CHARS if stored else None
        author = _str(doc, "author", limit=text_limit or MAX_AUTHOR_CHARS, default="")
        comment = _str(doc, "comment", limit=text_limit or MAX_COMMENT_CHARS, default="")
        for key in ("created_at", "model_id"):
            if key in doc:
                _str(doc, key, limit=256)
        request = _dict(doc, "request")
        for key in ("prompt", "subject", "target"):
            _str(request, key, limit=MAX_REQUEST_CHARS)
        _int(request, "layer")
        hparams = _dict(request, "hparams", default={})
        for k, v in hparams.items():
            number = isinstance(v, float) and math.isfinite(v) or isinstance(v, int) and abs(v) <= 2**53
            if isinstance(v, bool) or not (v is None or number):
                raise ValueError(f"request.hparams.{_short(k)} must be a finite number, got {_short(v)}")
        if "layer" in doc:
            _int(doc, "layer")
        matrices = doc.get("matrices")
        if not isinstance(matrices, list) or not matrices:
            raise ValueError(f"matrices must be a non-empty list, got {_short(matrices)}")
        records = tuple(MatrixRecord.from_json(m) for m in matrices)
        if len({m.name for m in records}) != len(records):
            raise ValueError("matrices names a matrix twice")
        base = _dict(doc, "base_fingerprint")
        digests = _dict(base, "matrices")
        if set(digests) != {m.name for m in records}:
            raise ValueError(
                "base_fingerprint.matrices must give the sha256 of exactly the touched matrices "
                f"{sorted(m.name for m in records)}, got {_short(sorted(digests))}"
            )
        for name, digest in digests.items():
            if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise ValueError(f"base_fingerprint.matrices[{name}] must be a sha256 hex digest, got {_short(digest)}")
        probs = _dict(doc, "probabilities", default={})
        for key in _PROBABILITIES:
            if key in probs and not 0.0 <= _number(probs, key) <= 1.0:
                raise ValueError(f"probabilities.{key} must be in [0, 1], got {probs[key]!r}")
        if "old_object" in probs:
            _str(probs, "old_object")
        if "compute_seconds" in doc:
            _number(doc, "compute_seconds")
        if "covariance_from_cache" in doc and not isinstance(doc["covariance_from_cache"], bool):
            raise ValueError(f"covariance_from_cache must be true or false, got {_short(doc['covariance_from_cache'])}")
        return cls(edit_id, version, parent, author, comment, request, records, dict(digests))


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


def decode_layer(data: bytes, *, stored: bool = False) -> EditLayer:
    """Parse and validate a layer file; ValueError naming what is wrong.

    The header's whole schema is checked (``LayerHeader.from_json``), and the
    factors against it: one 1-D float32 ``u`` (out,) and ``v`` (in,) per listed
    matrix, no other tensor, every value finite.
    """
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load(data)
        raw = _read_header_bytes(data)
    except Exception as e:  # safetensors and json raise several kinds on malformed input
        raise ValueError(f"not a readable safetensors layer file: {e}") from e
    header = LayerHeader.from_json(raw, stored=stored)
    expected = {f"{m.name}.{side}" for m in header.matrices for side in ("u", "v")}
    if set(tensors) != expected:
        raise ValueError(
            f"the layer's tensors {_short(sorted(tensors))} are not the factors of its matrices {sorted(expected)}"
        )
    factors = []
    for m in header.matrices:
        u, v = tensors[f"{m.name}.u"], tensors[f"{m.name}.v"]
        for side, t, n in (("u", u, m.shape[0]), ("v", v, m.shape[1])):
            if t.dtype != torch.float32 or tuple(t.shape) != (n,):
                raise ValueError(
                    f"{m.name}.{side} must be float32 of shape ({n},) as matrices lists, "
                    f"got {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{m.name}.{side} holds NaN or infinite values")
        factors.append(RankOneFactor(m.name, u, v))
    return EditLayer(raw, tuple(factors))


def _read_header_bytes(data: bytes) -> dict:
    # safetensors layout: 8-byte little-endian header length, then the JSON header
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
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
        """Parse and validate the manifest; ValueError naming the first malformed entry."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("the manifest must be a JSON object")
        if type(doc.get("format_version")) is not int or doc["format_version"] != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format_version {_short(doc.get('format_version'))}")
        model_id, entries = doc.get("model_id"), doc.get("entries")
        if not isinstance(model_id, str) or not isinstance(entries, list):
            raise ValueError("the manifest needs model_id (a string) and entries (a list)")
        for i, entry in enumerate(entries):
            try:
                check_entry(entry)
            except ValueError as e:
                raise ValueError(f"manifest entry {i}: {e}") from None
        return cls(model_id=model_id, entries=list(entries))


_OPS = ("apply", "import", "revert", "recover")


def check_entry(entry: object) -> None:
    """ValueError unless ``entry`` has the fields of its op (see the module docstring)."""
    if not isinstance(entry, dict):
        raise ValueError(f"must be a JSON object, got {_short(entry)}")
    if entry.get("op") not in _OPS:
        raise ValueError(f"op must be one of {', '.join(_OPS)}, got {_short(entry.get('op'))}")
    _int(entry, "version", hi=INT63_MAX)
    active = entry.get("active")
    if not isinstance(active, list):
        raise ValueError(f"active must be a list of edit ids, got {_short(active)}")
    for edit_id in active:
        check_edit_id(edit_id)
    if entry["op"] in ("apply", "import"):
        edit_id = check_edit_id(entry.get("edit_id"))
        if entry.get("file") != f"{LAYERS}/{edit_id}.safetensors":
            raise ValueError(f"file must be {LAYERS}/{edit_id}.safetensors, got {_short(entry.get('file'))}")
        if not isinstance(entry.get("sha256"), str):
            raise ValueError(f"sha256 must be a string, got {_short(entry.get('sha256'))}")


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
        try:
            manifest = Manifest.from_json(path.read_bytes())
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise FailedPrecondition(
                f"the edit store's manifest {path} is damaged ({e}): restore it from a backup, "
                "or move the store aside and start with another --edit-store folder"
            ) from e
        if manifest.model_id != model_id:
            raise FailedPrecondition(
                f"edit store {self.root} belongs to model {manifest.model_id!r}, not {model_id!r}: "
                "use another --edit-store folder"
            )
        return manifest

    def layer_path(self, edit_id: str) -> Path:
        """The file of a layer: ValueError unless the id is a UUID and the path lies inside ``layers/``."""
        folder = (self.root / LAYERS).resolve()
        path = (folder / f"{check_edit_id(edit_id)}.safetensors").resolve()
        if path.parent != folder:
            raise ValueError(f"layer path {path} is outside {folder}")
        return path

    def read_layer(self, edit_id: str) -> tuple[EditLayer, bytes]:
        """The layer and its file bytes, checked against the manifest's sha256.

        ValueError when the file is missing, truncated or altered.
        """
        entry = self.manifest.apply_entries().get(edit_id)
        if entry is None:
            raise NotFound(f"no edit with id {edit_id!r}")
        path = self.layer_path(edit_id)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"layer file {path} cannot be read: {e}") from e
        if sha256_bytes(data) != entry["sha256"]:
            raise ValueError(f"layer file {path} does not match its checksum in the manifest (truncated or altered)")
        layer = decode_layer(data, stored=True)
        if layer.edit_id != edit_id:
            raise ValueError(f"layer file {path} holds edit {layer.edit_id}, not {edit_id}")
        return layer, data

    def orphans(self) -> list[Path]:
        """Layer files no manifest entry names (left by a crash before the manifest write)."""
        named = {self.layer_path(i) for i in self.manifest.apply_entries()}
        return [p for p in (self.root / LAYERS).glob("*.safetensors") if p.resolve() not in named]

    def remove_orphans(self) -> None:
        """Remove orphaned layer files and temporary files; on a read-only store, warn and leave them."""
        stray = [*self.orphans(), *(self.root / LAYERS).glob(".*.tmp"), *self.root.glob(".*.tmp")]
        for p in stray:
            log.warning("removing %s (a crash left it: its edit never reached the manifest)", p)
            try:
                p.unlink(missing_ok=True)
            except OSError as e:  # a read-only store (EROFS, EACCES): the file is ignored anyway
                log.warning("cannot remove %s (%s): ignoring it", p, e)

    # -- writing ------------------------------------------------------------

    def _commit(self, *entries: dict) -> None:
        """Append ``entries`` to the history in one atomic manifest write (all of them or none)."""
        self.manifest.entries.extend(entries)
        try:
            atomic_write(self.root / MANIFEST, self.manifest.to_json())
        except BaseException:
            del self.manifest.entries[len(self.manifest.entries) - len(entries) :]
            raise

    def add_layer(self, layer: EditLayer, *, active: list[str], op: str = "apply", extra: dict | None = None) -> dict:
        """Write the layer file, then the manifest entry whose state has ``active`` layers."""
        return self.add_layers([layer], base_active=active[:-1], op=op, extras=[extra or {}])[0]

    def add_layers(
        self, layers: list[EditLayer], *, base_active: list[str], op: str, extras: list[dict]
    ) -> list[dict]:
        """Several layers, each a new version on top of the previous one (``base_active`` + the
        layers so far): every file is written first, then all their entries in ONE manifest write,
        so a crash or an error leaves all of them stored or none."""
        ids = [layer.edit_id for layer in layers]
        known = self.manifest.apply_entries()
        for edit_id in ids:
            if edit_id in known or ids.count(edit_id) > 1:
                raise FailedPrecondition(f"edit {edit_id} is already in the store")
        written: list[Path] = []
        entries: list[dict] = []
        active, version, parent = list(base_active), self.manifest.max_version, self.manifest.head_version
        try:
            for layer, extra in zip(layers, extras, strict=True):
                path = self.layer_path(layer.edit_id)  # a UUID inside layers/, checked before anything is written
                data = encode_layer(layer)
                atomic_write(path, data)
                written.append(path)
                active, version = [*active, layer.edit_id], version + 1
                h = layer.header
                entries.append({
                    "op": op, "version": version, "parent_version": parent, "edit_id": layer.edit_id,
                    "file": f"{LAYERS}/{path.name}", "sha256": sha256_bytes(data), "active": list(active),
                    "at": utc_now(), "author": h.get("author", ""), "comment": h.get("comment", ""), **extra,
                })  # fmt: skip
                parent = version
            self._commit(*entries)
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        return entries

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
