"""The edit store: versioned edit layers on disk.

On-disk format (layer files in ``format_version`` 2, read in 1 and 2; the manifest in
``format_version`` 2, read in 1 and 2), under the store folder ``DIR``::

    DIR/
      manifest.json                      the history, rewritten atomically on every change
      layers/<edit_id>.safetensors       one file per edit layer, never modified once written

A **layer file** is a safetensors file. Its tensors are the factors of every
matrix the edit touches, float32, never a dense matrix (``delta`` states the
u/v convention)::

    "<param>.u"     (out_features, r)   # in the (out, in) layout of the weight
    "<param>.v"     (in_features, r)    # update: W[out, in] += u @ v.T (transposed for Conv1D storage)
    "<param>.keys"  (in_features, k)    # optional: the keys k* the update was written at (a later
                                        # null-space projected edit leaves them unchanged)

and its metadata holds one key, ``romegw``, a JSON header: ``format_version`` (2),
``edit_id`` (a UUID), ``version`` (the version this edit created), ``parent_version``,
``created_at`` (UTC ISO-8601), ``author``, ``comment``, ``facts`` (one or a batch:
prompt, subject, target, layer, hyperparameters), ``method`` (rome, memit, projected,
ft), ``layer`` and ``layers`` (the edited blocks), ``matrices`` (name, shape, dtype,
update norm, rank, number of keys), ``base_fingerprint`` (model id and the sha256 of
every touched base matrix: a layer is applied only onto the base it was computed
on), the pre/post ``probabilities`` of each fact and ``compute_seconds``.

**Format 3** is format 2 whose ``matrices`` give a ``threshold`` for gated factors (the
``gated`` method: column j adds u_j (v_j . x) only where v_j . x > threshold, ``delta``); a
layer without gated factors is written as format 2, so a reader of formats 1-2 refuses only
the layers it would otherwise add to the weights wrongly.

**Format 4** is format 3 whose gated matrices may give a ``min_cosine`` (``delta.CosineGate``:
a column acts only where its input's scaled cosine to its edit key passes it). Such a matrix
stores one key per column (``keys`` (in, r): the keys compared with) and a float32
``gate_scale`` (in,), positive: diag(C)^-1/2 of the model it was computed on. A layer without
one is written as format 3 or 2, and a reader of format 3 refuses format 4 rather than serve
the columns without their condition.

**Format 1** (written before 2026-11-28, read unchanged; ``tests/fixtures/edit_store_v1``):
one fact as ``request`` and one ``probabilities`` object, method ROME on one ``layer``,
and 1-D factors ``u`` (out,) and ``v`` (in,), no keys. A layer is never rewritten: a
format-1 file stays format 1 on disk; an imported one is stored as format 2.

The **manifest** is JSON: ``{"format_version": 2, "model_id": ..., "entries": [...]}``.
Entries are only ever appended (history is never rewritten); each is one of::

    {"op": "apply",  "version": V, "parent_version": P, "edit_id": ..., "file": "layers/<id>.safetensors",
     "sha256": <of the file>, "active_keep": K, "active_add": [edit ids], "at": ..., "author": ..., "comment": ...}
    {"op": "revert", "version": V, "from_version": F, "to_version": N | null, "edit_id": <removed> | null,
     "active_keep": K, "active_add": [...], "at": ..., "author": ..., "comment": ...}
    {"op": "import", ... same fields as apply, plus "origin_version"}
    {"op": "recover", "version": V, "from_version": F, "active_keep": K, "active_add": [...], "reason": ...}

An entry's active layers (edit ids, oldest first) are the previous entry's first
``active_keep`` ids followed by ``active_add`` (the first entry's previous list is
empty): an apply keeps them all and adds one, so the manifest grows by one short
entry per edit whatever the number of active layers. **Format 1** (written before
2026-11-28) gives each entry's whole list as ``"active": [...]``; it is read
unchanged, and the first write rewrites it in format 2.

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

The header and the entries are typed records (``records.LayerHeader``,
``records.ManifestEntry``). Nothing read from disk or from a caller is trusted:
``LayerHeader.from_json`` validates a header's whole schema, ``ManifestEntry.from_json``
every entry, and an
``edit_id`` must be a canonical UUID before any path is built from it (every
path is then resolved and checked to lie inside ``layers/``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from .delta import CosineGate, LowRankFactor
from .errors import FailedPrecondition, NotFound
from .fileio import atomic_write
from .records import (
    HEADER_KEY,
    LAYERS,
    MANIFEST_FORMAT,
    LayerHeader,
    ManifestEntry,
    check_edit_id,
    check_format,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


# ------------------------------------------------------------------ hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype)."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}..."


# ------------------------------------------------------------------ layer files


@dataclass(frozen=True)
class EditLayer:
    """A layer as stored: its header, its factors, and the keys its update was written at."""

    header: LayerHeader
    factors: tuple[LowRankFactor, ...]
    keys: Mapping[str, torch.Tensor] = field(default_factory=dict)  # param -> (in, k) float32 edit keys

    @property
    def edit_id(self) -> str:
        return self.header.edit_id

    @property
    def version(self) -> int:
        return self.header.version


def encode_layer(layer: EditLayer) -> bytes:
    """The layer file, in the format this code writes (``records.LAYER_FORMAT``)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in layer.factors:
        tensors[f"{f.param}.u"] = f.u.detach().float().contiguous().cpu()
        tensors[f"{f.param}.v"] = f.v.detach().float().contiguous().cpu()
    for param, keys in layer.keys.items():
        tensors[f"{param}.keys"] = keys.detach().float().contiguous().cpu()
    for f in layer.factors:
        if f.cosine_gate is not None:  # its keys are the layer's keys of the matrix (decode_layer pairs them)
            stored = tensors.get(f"{f.param}.keys")
            if stored is None or not torch.equal(stored, f.cosine_gate.keys.detach().float().cpu()):
                raise ValueError(f"the cosine gate of {f.param} must compare with the layer's keys of that matrix")
            tensors[f"{f.param}.gate_scale"] = f.cosine_gate.scale.detach().float().contiguous().cpu()
    return safetensors_save(tensors, metadata={HEADER_KEY: json.dumps(layer.header.to_json(), sort_keys=True)})


def decode_layer(data: bytes, *, stored: bool = False) -> EditLayer:
    """Parse and validate a layer file; ValueError naming what is wrong.

    The header's whole schema is checked (``LayerHeader.from_json``), and the
    tensors against it: per listed matrix a float32 ``u`` and ``v`` of its shape
    and rank ((out,) and (in,) in format 1, (out, r) and (in, r) in format 2),
    ``keys`` (in, k) when it lists k keys, no other tensor, every value finite.
    """
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load(data)
        raw = _read_header_bytes(data)
    except Exception as e:  # safetensors and json raise several kinds on malformed input
        raise ValueError(f"not a readable safetensors layer file: {e}") from e
    header = LayerHeader.from_json(raw, stored=stored)
    one_d = raw.get("format_version") == 1
    expected = {f"{m.name}.{side}" for m in header.matrices for side in ("u", "v")}
    expected |= {f"{m.name}.keys" for m in header.matrices if m.keys}
    expected |= {f"{m.name}.gate_scale" for m in header.matrices if m.min_cosine is not None}
    if set(tensors) != expected:
        raise ValueError(
            f"the layer's tensors {_short(sorted(tensors))} are not the factors of its matrices {sorted(expected)}"
        )
    factors, keys = [], {}
    for m in header.matrices:
        (out_dim, in_dim), r = m.shape, m.rank
        sides = [("u", (out_dim,) if one_d else (out_dim, r)), ("v", (in_dim,) if one_d else (in_dim, r))]
        if m.keys:
            sides.append(("keys", (in_dim, m.keys)))
        if m.min_cosine is not None:
            sides.append(("gate_scale", (in_dim,)))
        for side, shape in sides:
            t = tensors[f"{m.name}.{side}"]
            if t.dtype != torch.float32 or tuple(t.shape) != shape:
                raise ValueError(
                    f"{m.name}.{side} must be float32 of shape {shape} as matrices lists, "
                    f"got {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{m.name}.{side} holds NaN or infinite values")
        u, v = tensors[f"{m.name}.u"], tensors[f"{m.name}.v"]
        cosine_gate = None
        if m.min_cosine is not None:
            scale = tensors[f"{m.name}.gate_scale"]
            if not bool((scale > 0).all()):
                raise ValueError(f"{m.name}.gate_scale must be positive")
            cosine_gate = CosineGate(scale, tensors[f"{m.name}.keys"], m.min_cosine)
        factors.append(LowRankFactor(m.name, u.reshape(out_dim, r), v.reshape(in_dim, r), m.threshold, cosine_gate))
        if m.keys:
            keys[m.name] = tensors[f"{m.name}.keys"]
    return EditLayer(header, tuple(factors), keys)


def _read_header_bytes(data: bytes) -> dict:
    # safetensors layout: 8-byte little-endian header length, then the JSON header
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    if HEADER_KEY not in meta:
        raise ValueError(f"no {HEADER_KEY!r} header in the layer's metadata")
    return json.loads(meta[HEADER_KEY])


def read_layer_header(path: Path) -> LayerHeader:
    """The header of a stored layer file (schema-checked, tensors not read)."""
    with safe_open(str(path), framework="pt") as f:
        return LayerHeader.from_json(json.loads(f.metadata()[HEADER_KEY]), stored=True)


# ------------------------------------------------------------------ manifest


MANIFEST_FORMATS_READ = (1, 2)


def active_delta(prev: tuple[str, ...], cur: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
    """(keep, add) with cur = prev[:keep] + add, keep as long as possible (an apply: keep = len(prev))."""
    if cur[: len(prev)] == prev:
        return len(prev), cur[len(prev) :]
    keep = 0
    for a, b in zip(prev, cur, strict=False):
        if a != b:
            break
        keep += 1
    return keep, cur[keep:]


def _decode_active(prev: tuple[str, ...], doc: dict) -> list[str]:
    keep, add = doc.pop("active_keep", None), doc.pop("active_add", None)
    if type(keep) is not int or not 0 <= keep <= len(prev):
        raise ValueError(f"active_keep must be an integer in 0..{len(prev)}, got {_short(keep)}")
    if not isinstance(add, list):
        raise ValueError(f"active_add must be a list of edit ids, got {_short(add)}")
    return [*prev[:keep], *add]


@dataclass
class Manifest:
    model_id: str
    entries: list[ManifestEntry] = field(default_factory=list)
    # (entry, its format-2 JSON object) for a prefix of entries: encoding is O(new entries) per write
    _encoded: list[tuple[ManifestEntry, dict]] = field(default_factory=list, repr=False, compare=False)

    @property
    def head(self) -> ManifestEntry | None:
        return self.entries[-1] if self.entries else None

    @property
    def head_version(self) -> int:
        return self.entries[-1].version if self.entries else 0

    @property
    def max_version(self) -> int:
        return max((e.version for e in self.entries), default=0)

    def active_at(self, version: int) -> list[str]:
        """The active layers (oldest first) of a version; NotFound if it never existed."""
        if version == 0:
            return []
        for e in reversed(self.entries):
            if e.version == version:
                return list(e.active)
        raise NotFound(f"version {version} does not exist (versions 0..{self.max_version} exist)")

    def versions(self) -> list[int]:
        return [0, *(e.version for e in self.entries)]

    def apply_entries(self) -> dict[str, ManifestEntry]:
        """edit_id -> its apply/import entry."""
        return {e.edit_id: e for e in self.entries if e.adds_layer and e.edit_id is not None}

    def _encode(self) -> list[dict]:
        """The entries in format 2, reusing the memo for the prefix that is unchanged."""
        memo, entries = self._encoded, self.entries
        same = 0
        while same < min(len(memo), len(entries)) and memo[same][0] is entries[same]:
            same += 1
        del memo[same:]  # entries rolled back after a failed write, or replaced
        for i in range(same, len(entries)):
            e = entries[i]
            keep, add = active_delta(entries[i - 1].active if i else (), e.active)
            doc = e.to_json()
            del doc["active"]
            doc["active_keep"], doc["active_add"] = keep, list(add)
            memo.append((e, doc))
        return [doc for _, doc in memo]

    def to_json(self) -> bytes:
        doc = {"format_version": MANIFEST_FORMAT, "model_id": self.model_id, "entries": self._encode()}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate the manifest (format 1 or 2); ValueError naming the first malformed entry."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("the manifest must be a JSON object")
        fmt = check_format(doc, "manifest", MANIFEST_FORMATS_READ)
        model_id, raw = doc.get("model_id"), doc.get("entries")
        if not isinstance(model_id, str) or not isinstance(raw, list):
            raise ValueError("the manifest needs model_id (a string) and entries (a list)")
        entries: list[ManifestEntry] = []
        for i, entry in enumerate(raw):
            try:
                if fmt == 2:
                    if not isinstance(entry, dict):
                        raise ValueError(f"must be a JSON object, got {_short(entry)}")
                    entry = dict(entry)
                    if "active" in entry:
                        raise ValueError("a format-2 entry gives active_keep and active_add, not active")
                    entry["active"] = _decode_active(entries[-1].active if entries else (), entry)
                entries.append(ManifestEntry.from_json(entry))
            except ValueError as e:
                raise ValueError(f"manifest entry {i}: {e}") from None
        return cls(model_id=model_id, entries=entries)


class HistoryStore(Protocol):
    """What holds the edit history: this folder (``EditStore``) or a PostgreSQL database shared by
    replicas (``pg_store.PostgresEditStore``). The manager reads ``manifest`` (the history as last
    read) and writes only through ``add_layers`` / ``add_state``, which append to it or raise,
    changing nothing."""

    manifest: Manifest
    shared: bool  # other replicas write it too (a database): no recovery entries, follow it

    @property
    def location(self) -> str: ...

    def read_layer(self, edit_id: str) -> tuple[EditLayer, bytes]: ...

    def add_layers(
        self,
        layers: list[EditLayer],
        *,
        base_active: list[str],
        op: str,
        author: str = "",
        origin_versions: list[int] | None = None,
    ) -> list[ManifestEntry]: ...

    def add_state(self, change: StateChange) -> ManifestEntry: ...

    def remove_orphans(self) -> None: ...

    def refresh(self) -> list[ManifestEntry]: ...

    def close(self) -> None: ...


class EditStore:
    """A store folder: layer files and the manifest (see the module docstring)."""

    shared = False  # one writer: this server
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
        if sha256_bytes(data) != entry.sha256:
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

    def _commit(self, *entries: ManifestEntry) -> None:
        """Append ``entries`` to the history in one atomic manifest write (all of them or none)."""
        self.manifest.entries.extend(entries)
        try:
            atomic_write(self.root / MANIFEST, self.manifest.to_json())
        except BaseException:
            del self.manifest.entries[len(self.manifest.entries) - len(entries) :]
            raise

    def add_layer(self, layer: EditLayer, *, active: list[str], op: str = "apply") -> ManifestEntry:
        """Write the layer file, then the manifest entry whose state has ``active`` layers."""
        return self.add_layers([layer], base_active=active[:-1], op=op)[0]

    def add_layers(
        self,
        layers: list[EditLayer],
        *,
        base_active: list[str],
        op: str,
        author: str = "",
        origin_versions: list[int] | None = None,
    ) -> list[ManifestEntry]:
        """Several layers, each a new version on top of the previous one (``base_active`` + the
        layers so far): every file is written first, then all their entries in ONE manifest write,
        so a crash or an error leaves all of them stored or none.

        ``author`` (an importer) replaces each header's author in its entry; an import records
        each layer's version in its origin store in ``origin_versions``."""
        planned = plan_layers(self.manifest, layers, base_active=base_active, op=op, author=author,
                              origin_versions=origin_versions)  # fmt: skip
        written: list[Path] = []
        try:
            for layer, data, _ in planned:
                path = self.layer_path(layer.edit_id)  # a UUID inside layers/, checked before anything is written
                atomic_write(path, data)
                written.append(path)
            self._commit(*(entry for _, _, entry in planned))
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        return [entry for _, _, entry in planned]

    def add_state(self, change: StateChange) -> ManifestEntry:
        """Record a change of state without a new layer: a revert, or a recovery at start."""
        entry = change.entry(self.manifest)
        self._commit(entry)
        return entry

    @property
    def location(self) -> str:
        """Where the history lives, for log lines and messages to operators."""
        return str(self.root)

    def refresh(self) -> list[ManifestEntry]:
        """Entries other writers appended since the last read: none, a folder has one writer."""
        return []

    def close(self) -> None:
        """Nothing to release."""


# -- what every store writes, whatever holds it ----------------------------------------


def plan_layers(
    manifest: Manifest,
    layers: list[EditLayer],
    *,
    base_active: list[str],
    op: str,
    author: str = "",
    origin_versions: list[int] | None = None,
) -> list[tuple[EditLayer, bytes, ManifestEntry]]:
    """(layer, its file bytes, its manifest entry) for each of ``layers``, each a new version on
    top of the previous one; FailedPrecondition for an id the history already holds."""
    ids = [layer.edit_id for layer in layers]
    known = manifest.apply_entries()
    for edit_id in ids:
        check_edit_id(edit_id)
        if edit_id in known or ids.count(edit_id) > 1:
            raise FailedPrecondition(f"edit {edit_id} is already in the store")
    origins = origin_versions or [None] * len(layers)
    out = []
    active, version, parent = list(base_active), manifest.max_version, manifest.head_version
    for layer, origin in zip(layers, origins, strict=True):
        data = encode_layer(layer)
        active, version = [*active, layer.edit_id], version + 1
        entry = ManifestEntry(
            op=op, version=version, active=tuple(active), at=utc_now(), author=author or layer.header.author,
            comment=layer.header.comment, parent_version=parent, edit_id=layer.edit_id,
            file=f"{LAYERS}/{layer.edit_id}.safetensors", sha256=sha256_bytes(data), origin_version=origin,
        )  # fmt: skip
        out.append((layer, data, entry))
        parent = version
    return out


@dataclass(frozen=True)
class StateChange:
    """A change of state without a new layer: a revert (to a version, or of one layer) or a recovery."""

    op: str  # "revert" or "recover"
    version: int  # the state it leads to
    active: tuple[str, ...]  # that state's layers, oldest first
    author: str = ""
    comment: str = ""
    to_version: int | None = None  # a revert to a version
    edit_id: str | None = None  # a revert of one layer
    reason: str | None = None  # a recovery's

    def entry(self, manifest: Manifest) -> ManifestEntry:
        """Its manifest entry, appended after ``manifest``'s head."""
        return ManifestEntry(
            op=self.op, version=self.version, active=tuple(self.active), at=utc_now(), author=self.author,
            comment=self.comment, from_version=manifest.head_version, to_version=self.to_version,
            edit_id=self.edit_id, reason=self.reason,
        )  # fmt: skip
