"""The edit domain, typed: a layer's header, a manifest entry, an edit as the API shows it.

These are the records that cross the engine, the store and the server. Each is a
frozen dataclass with ``from_json`` (which validates the whole schema and raises
ValueError naming the first field that is missing or malformed) and ``to_json``
(the JSON document as ``edit_store`` writes it; its format is documented there).
The format version is checked in one place, ``check_format``.

    header = LayerHeader.from_json(doc)          # ValueError if anything is off
    header.request.subject, header.probabilities.target_after
    doc = header.to_json()                       # the same document back

Nothing read from disk or sent by a caller is trusted: every string is bounded,
every number finite and in range, every edit id a canonical UUID (before any
path is built from it). Keys a reader does not know are kept in ``extras`` and
written back unchanged, so a header round-trips whole.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .bounds import MAX_AUTHOR_CHARS, MAX_COMMENT_CHARS, check_text
from .errors import EngineError

LAYER_FORMAT = 2  # the layer header this code writes: facts, method, rank-r factors, edit keys
GATED_LAYER_FORMAT = 3  # ... and for a layer with gated factors (a reader of 1-2 must not add them to W)
COSINE_LAYER_FORMAT = 4  # ... and for one whose gated factors have a cosine condition (a reader of 3 would skip it)
LAYER_FORMATS = (1, 2, 3, 4)  # the ones it reads (format 1: one fact, rank one; see edit_store)
MANIFEST_FORMAT = 2  # written; 1 and 2 are read (edit_store.Manifest)
METHODS = ("rome", "memit", "projected", "ft", "gated")  # the editing methods a header may name
AUTO_METHOD = "auto"  # a server default: the model's own choice (methods.default_method)
MAX_FACTS = 256  # facts of one batch edit (one layer)
MAX_RANK = 1024  # columns of one matrix's factors (a batch's facts, an FT change's SVD rank)
HEADER_KEY = "romegw"  # the layer file's metadata key holding the header
MAX_REQUEST_CHARS = 100_000  # a stored request's prompt, subject or target (the engine's max_prompt_chars)
MAX_HEADER_BYTES = 256 * 1024  # a header as JSON: every field above within its limit fits many times over
MAX_STORED_TEXT_CHARS = 1 << 30  # an author or comment an older server stored before the limits existed
INT32_MAX, INT63_MAX = 2**31 - 1, 2**63 - 1  # the API's int32 fields (layers, shapes) and versions

JsonObject = dict[str, Any]  # a parsed JSON object, before validation or as written
Hparams = Mapping[str, float | int | None]  # a request's hyperparameter overrides as stored


def check_format(doc: Mapping[str, Any], what: str, readable: tuple[int, ...]) -> int:
    """The document's format version, or ValueError unless this code reads it (the one place that checks)."""
    version = doc.get("format_version")
    if type(version) is not int or version not in readable:
        raise ValueError(f"unsupported {what} format_version {_short(version)} (this server reads {readable})")
    return version


def check_edit_id(value: object) -> str:
    """``value`` if it is a canonical (lowercase, hyphenated) UUID string, else ValueError.

    Every edit id is checked here before a path is built from it.
    """
    if isinstance(value, str) and len(value) == 36:
        with contextlib.suppress(ValueError):
            if str(uuid.UUID(value)) == value:
                return value
    raise ValueError(f"edit_id must be a UUID like {uuid.UUID(int=0)}, got {_short(value)}")


# ------------------------------------------------------------------ field readers


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}..."


def _int(doc: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = INT32_MAX) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{key} must be an integer in [{lo}, {hi}], got {_short(value)}")
    return value


def _opt_int(doc: Mapping[str, Any], key: str) -> int | None:
    return None if doc.get(key) is None else _int(doc, key, hi=INT63_MAX)


def _str(doc: Mapping[str, Any], key: str, *, limit: int = MAX_COMMENT_CHARS, default: str | None = None) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {_short(value)}")
    try:
        return check_text(key, value, limit)
    except EngineError as e:
        raise ValueError(str(e)) from None


def _number(doc: Mapping[str, Any], key: str, *, default: float | None = None) -> float:
    value = doc.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {_short(value)}")
    return float(value)


def _object(doc: Mapping[str, Any], key: str, *, default: JsonObject | None = None) -> JsonObject:
    value = doc.get(key, default)
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object, got {_short(value)}")
    return value


def _list(doc: Mapping[str, Any], key: str, limit: int, kind: type) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list) or not 0 < len(value) <= limit or not all(isinstance(x, kind) for x in value):
        raise ValueError(f"{key} must be a list of 1 to {limit} {kind.__name__} values, got {_short(value)}")
    return value


def _extras(doc: Mapping[str, Any], known: frozenset[str]) -> Mapping[str, Any]:
    return MappingProxyType({k: v for k, v in doc.items() if k not in known})


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


# ------------------------------------------------------------------ the layer header


@dataclass(frozen=True)
class StoredRequest:
    """The edit request as the header records it: the template prompt, the normalised target."""

    prompt: str
    subject: str
    target: str
    layer: int
    hparams: Hparams = field(default_factory=dict)  # the overrides and defaults as used

    @classmethod
    def from_json(cls, doc: JsonObject) -> StoredRequest:
        texts = [_str(doc, key, limit=MAX_REQUEST_CHARS) for key in ("prompt", "subject", "target")]
        hparams = _object(doc, "hparams", default={})
        for k, v in hparams.items():
            number = isinstance(v, float) and math.isfinite(v) or isinstance(v, int) and abs(v) <= 2**53
            if isinstance(v, bool) or not (v is None or number):
                raise ValueError(f"request.hparams.{_short(k)} must be a finite number, got {_short(v)}")
        return cls(*texts, layer=_int(doc, "layer"), hparams=_frozen(hparams))

    def to_json(self) -> JsonObject:
        return {"prompt": self.prompt, "subject": self.subject, "target": self.target, "layer": self.layer,
                "hparams": dict(self.hparams)}  # fmt: skip


@dataclass(frozen=True)
class MatrixRecord:
    """One touched matrix as the header lists it: (out, in) shape and ||u v^T||_F."""

    name: str
    shape: tuple[int, int]  # (out, in)
    update_norm: float
    dtype: str = ""  # the model's dtype when computed ("" when a writer left it out)
    rank: int = 1  # columns of u and v (format 1: always 1)
    keys: int = 0  # columns of the stored edit keys (in, keys); 0: none stored
    threshold: float | None = None  # format 3: a gated factor's threshold (``delta``); None: a weight change
    min_cosine: float | None = None  # format 4: a gated factor's cosine condition (``delta.CosineGate``)

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
        dtype = _str(doc, "dtype", limit=32, default="")
        rank = _int(doc, "rank", lo=1, hi=MAX_RANK) if "rank" in doc else 1
        keys = _int(doc, "keys", hi=MAX_RANK) if "keys" in doc else 0
        threshold = None
        if doc.get("threshold") is not None:
            threshold = _number(doc, "threshold")
            if not 0.0 < threshold < 1.0:
                raise ValueError(f"matrices[{name}].threshold must be in (0, 1), got {_short(doc['threshold'])}")
        min_cosine = None
        if doc.get("min_cosine") is not None:
            min_cosine = _number(doc, "min_cosine")
            if not -1.0 < min_cosine < 1.0 or threshold is None or keys != rank:
                raise ValueError(f"matrices[{name}].min_cosine must be in (-1, 1), on a gated matrix with one key per "
                                 f"column, got {_short(doc['min_cosine'])}")  # fmt: skip
        return cls(name, (shape[0], shape[1]), _number(doc, "update_norm"), dtype, rank, keys, threshold, min_cosine)

    def to_json(self) -> JsonObject:
        doc = {"name": self.name, "shape": list(self.shape), "update_norm": self.update_norm, "rank": self.rank,
               "keys": self.keys}  # fmt: skip
        doc |= {"threshold": self.threshold} if self.threshold is not None else {}
        doc |= {"min_cosine": self.min_cosine} if self.min_cosine is not None else {}
        return doc | ({"dtype": self.dtype} if self.dtype else {})


@dataclass(frozen=True)
class BaseFingerprint:
    """What a layer was computed on: the model id and the sha256 of each touched base matrix."""

    model_id: str
    matrices: Mapping[str, str]  # parameter name -> sha256 hex digest of its pristine base

    @classmethod
    def from_json(cls, doc: JsonObject) -> BaseFingerprint:
        digests = _object(doc, "matrices")
        for name, digest in digests.items():
            if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise ValueError(f"base_fingerprint.matrices[{name}] must be a sha256 hex digest, got {_short(digest)}")
        return cls(_str(doc, "model_id", limit=256, default=""), _frozen(digests))

    def to_json(self) -> JsonObject:
        return {"model_id": self.model_id, "matrices": dict(self.matrices)}


@dataclass(frozen=True)
class Probabilities:
    """P(target) and P(old object) on the edit prompt (the whole continuation), before and after."""

    target_before: float = 0.0
    target_after: float = 0.0
    old_before: float = 0.0
    old_after: float = 0.0
    old_object: str = ""  # the model's greedy answer before the edit ("" when there was none)

    @classmethod
    def from_json(cls, doc: JsonObject) -> Probabilities:
        values = {}
        for key in ("target_before", "target_after", "old_before", "old_after"):
            values[key] = _number(doc, key, default=0.0)
            if not 0.0 <= values[key] <= 1.0:
                raise ValueError(f"probabilities.{key} must be in [0, 1], got {doc[key]!r}")
        return cls(**values, old_object=_str(doc, "old_object", default=""))

    def to_json(self) -> JsonObject:
        return {"target_before": self.target_before, "target_after": self.target_after,
                "old_before": self.old_before, "old_after": self.old_after, "old_object": self.old_object}  # fmt: skip


_HEADER_KEYS = frozenset({
    "format_version", "edit_id", "version", "parent_version", "created_at", "author", "comment", "request",
    "facts", "method", "layer", "layers", "matrices", "base_fingerprint", "probabilities", "compute_seconds",
    "covariance_from_cache", "model_id",
})  # fmt: skip


@dataclass(frozen=True)
class LayerHeader:
    """The ``romegw`` header of a layer file: what the edit is, where it came from, what it did.

    Format 2 (written): ``facts`` and ``probabilities`` are lists (a batch edit is one layer),
    ``method`` names how it was computed, ``layers`` every edited block. Format 1 (read): one
    ``request`` and one ``probabilities`` object, ROME on one ``layer``.
    """

    edit_id: str  # a UUID
    version: int  # the version this edit created
    parent_version: int  # the head it was computed on
    created_at: str  # UTC ISO-8601
    author: str
    comment: str
    facts: tuple[StoredRequest, ...]  # the facts written, one or a batch
    method: str  # one of METHODS
    layer: int  # the edited block (MEMIT: the last of its range)
    layers: tuple[int, ...]  # every edited block, lowest first
    matrices: tuple[MatrixRecord, ...]
    base_fingerprint: BaseFingerprint
    probabilities: tuple[Probabilities, ...]  # one per fact
    compute_seconds: float
    covariance_from_cache: bool
    model_id: str
    extras: Mapping[str, Any] = field(default_factory=dict)  # keys this reader does not know, kept as they were

    @property
    def format_version(self) -> int:
        """The format this code writes the header in: 4 with a cosine condition, 3 with gated factors, else 2."""
        return _format_of(self.matrices)

    @property
    def request(self) -> StoredRequest:
        """The (first) fact: the whole edit for a single-fact layer."""
        return self.facts[0]

    @property
    def fact_probabilities(self) -> Probabilities:
        """The (first) fact's probabilities."""
        return self.probabilities[0]

    @classmethod
    def from_json(cls, doc: object, *, stored: bool = False) -> LayerHeader:
        """``stored``: a header this store wrote itself (its sha256 is in the manifest). An author or
        comment longer than today's limits was legal when an older server stored it: it is kept
        (the API clips it when echoing), where an import or a new edit is refused."""
        if not isinstance(doc, dict):
            raise ValueError(f"the {HEADER_KEY} header must be a JSON object, got {_short(doc)}")
        version = check_format(doc, "layer", LAYER_FORMATS)
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
        text_limit = MAX_STORED_TEXT_CHARS if stored else None
        if version == 1:
            facts = (StoredRequest.from_json(_object(doc, "request")),)
            probabilities = (Probabilities.from_json(_object(doc, "probabilities", default={})),)
            method = "rome"
            layer = _int(doc, "layer") if "layer" in doc else facts[0].layer
            layers = (layer,)
        else:
            facts = tuple(StoredRequest.from_json(f) for f in _list(doc, "facts", MAX_FACTS, dict))
            probabilities = tuple(Probabilities.from_json(p) for p in _list(doc, "probabilities", MAX_FACTS, dict))
            if len(probabilities) != len(facts):
                raise ValueError(f"probabilities lists {len(probabilities)} facts, facts {len(facts)}")
            method = _str(doc, "method", limit=32)
            if method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(METHODS)}, got {_short(method)}")
            layer = _int(doc, "layer")
            layers = tuple(_list(doc, "layers", 1024, int))
            if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= INT32_MAX for n in layers):
                raise ValueError(f"layers must be layer numbers, got {_short(layers)}")
        matrices = doc.get("matrices")
        if not isinstance(matrices, list) or not matrices:
            raise ValueError(f"matrices must be a non-empty list, got {_short(matrices)}")
        records = tuple(MatrixRecord.from_json(m) for m in matrices)
        if len({m.name for m in records}) != len(records):
            raise ValueError("matrices names a matrix twice")
        if version == 1 and any(m.rank != 1 or m.keys for m in records):
            raise ValueError("a format 1 layer holds rank-one factors and no keys")
        if max(version, LAYER_FORMAT) != _format_of(records):  # format 1: plain factors, as 2
            raise ValueError(f"gated factors (a matrix with a threshold) are format {GATED_LAYER_FORMAT} and with a "
                             f"min_cosine format {COSINE_LAYER_FORMAT}, and each format holds at least one; this is "
                             f"format {version}, its matrices format {_format_of(records)}")  # fmt: skip
        base = BaseFingerprint.from_json(_object(doc, "base_fingerprint"))
        if set(base.matrices) != {m.name for m in records}:
            raise ValueError(
                "base_fingerprint.matrices must give the sha256 of exactly the touched matrices "
                f"{sorted(m.name for m in records)}, got {_short(sorted(base.matrices))}"
            )
        cov_cached = doc.get("covariance_from_cache", False)
        if not isinstance(cov_cached, bool):
            raise ValueError(f"covariance_from_cache must be true or false, got {_short(cov_cached)}")
        return cls(
            edit_id=check_edit_id(doc.get("edit_id")),
            version=_int(doc, "version", lo=1, hi=INT63_MAX),
            parent_version=_int(doc, "parent_version", hi=INT63_MAX),
            created_at=_str(doc, "created_at", limit=256, default=""),
            author=_str(doc, "author", limit=text_limit or MAX_AUTHOR_CHARS, default=""),
            comment=_str(doc, "comment", limit=text_limit or MAX_COMMENT_CHARS, default=""),
            facts=facts,
            method=method,
            layer=layer,
            layers=layers,
            matrices=records,
            base_fingerprint=base,
            probabilities=probabilities,
            compute_seconds=_number(doc, "compute_seconds", default=0.0),
            covariance_from_cache=cov_cached,
            model_id=_str(doc, "model_id", limit=256, default=""),
            extras=_extras(doc, _HEADER_KEYS),
        )

    def to_json(self) -> JsonObject:
        """The header in the format this code writes (LAYER_FORMAT), whatever format it was read from."""
        return {
            **self.extras,
            "format_version": self.format_version,
            "edit_id": self.edit_id,
            "version": self.version,
            "parent_version": self.parent_version,
            "created_at": self.created_at,
            "author": self.author,
            "comment": self.comment,
            "facts": [f.to_json() for f in self.facts],
            "method": self.method,
            "layer": self.layer,
            "layers": list(self.layers),
            "matrices": [m.to_json() for m in self.matrices],
            "base_fingerprint": self.base_fingerprint.to_json(),
            "probabilities": [p.to_json() for p in self.probabilities],
            "compute_seconds": self.compute_seconds,
            "covariance_from_cache": self.covariance_from_cache,
            "model_id": self.model_id,
        }


# ------------------------------------------------------------------ the manifest entry

OPS = ("apply", "import", "revert", "recover")
LAYERS = "layers"  # the store's folder of layer files
_ENTRY_KEYS = frozenset({
    "op", "version", "active", "at", "author", "comment", "parent_version", "edit_id", "file", "sha256",
    "from_version", "to_version", "origin_version", "reason",
})  # fmt: skip


@dataclass(frozen=True)
class ManifestEntry:
    """One step of the history (see ``edit_store``): the state ``version`` with its ``active`` layers.

    ``apply``/``import`` add a layer (``edit_id``, ``file``, ``sha256``, ``parent_version``;
    an import also its ``origin_version``); ``revert`` makes an earlier state the head
    (``to_version``) or removes one layer (``edit_id``); ``recover`` is a start's fallback (``reason``).
    """

    op: str
    version: int
    active: tuple[str, ...]  # edit ids, oldest first
    at: str = ""
    author: str = ""
    comment: str = ""
    parent_version: int | None = None
    edit_id: str | None = None
    file: str | None = None
    sha256: str | None = None
    from_version: int | None = None
    to_version: int | None = None
    origin_version: int | None = None
    reason: str | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def adds_layer(self) -> bool:
        return self.op in ("apply", "import")

    @classmethod
    def from_json(cls, doc: object) -> ManifestEntry:
        if not isinstance(doc, dict):
            raise ValueError(f"must be a JSON object, got {_short(doc)}")
        op = doc.get("op")
        if op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}, got {_short(op)}")
        active = doc.get("active")
        if not isinstance(active, list):
            raise ValueError(f"active must be a list of edit ids, got {_short(active)}")
        edit_id = None if doc.get("edit_id") is None else check_edit_id(doc.get("edit_id"))
        file = sha = None
        if op in ("apply", "import"):
            if edit_id is None:
                raise ValueError("edit_id must be a UUID, got None")
            file = doc.get("file")
            if file != f"{LAYERS}/{edit_id}.safetensors":
                raise ValueError(f"file must be {LAYERS}/{edit_id}.safetensors, got {_short(file)}")
            sha = doc.get("sha256")
            if not isinstance(sha, str):
                raise ValueError(f"sha256 must be a string, got {_short(sha)}")
        reason = doc.get("reason")
        return cls(
            op=op,
            version=_int(doc, "version", hi=INT63_MAX),
            active=tuple(check_edit_id(i) for i in active),
            at=_str(doc, "at", limit=256, default=""),
            author=_str(doc, "author", limit=MAX_STORED_TEXT_CHARS, default=""),
            comment=_str(doc, "comment", limit=MAX_STORED_TEXT_CHARS, default=""),
            parent_version=_opt_int(doc, "parent_version"),
            edit_id=edit_id,
            file=file,
            sha256=sha,
            from_version=_opt_int(doc, "from_version"),
            to_version=_opt_int(doc, "to_version"),
            origin_version=_opt_int(doc, "origin_version"),
            reason=None if reason is None else _str(doc, "reason", limit=MAX_STORED_TEXT_CHARS),
            extras=_extras(doc, _ENTRY_KEYS),
        )

    def to_json(self) -> JsonObject:
        doc: JsonObject = {**self.extras, "op": self.op, "version": self.version, "active": list(self.active),
                           "at": self.at, "author": self.author, "comment": self.comment}  # fmt: skip
        optional = {
            "parent_version": self.parent_version, "edit_id": self.edit_id, "file": self.file, "sha256": self.sha256,
            "from_version": self.from_version, "to_version": self.to_version, "origin_version": self.origin_version,
            "reason": self.reason,
        }  # fmt: skip
        doc.update({k: v for k, v in optional.items() if v is not None})
        if self.op == "revert":  # a revert names what it reverted to or removed, the other null
            doc.setdefault("to_version", None)
            doc.setdefault("edit_id", None)
        return doc


# ------------------------------------------------------------------ the API's view and requests


@dataclass(frozen=True)
class ApplyOptions:
    """How ApplyEdit treats a computed edit."""

    dry_run: bool = False  # compute and measure, store nothing
    expected_version: int | None = None  # refuse unless the head is this version (optimistic concurrency)
    author: str = ""
    comment: str = ""
    force: bool = False  # apply even when the target already is the model's greedy answer
    min_target_prob: float | None = None  # refuse when P(target) after the edit is below it; None: the server's
    method: str = ""  # one of METHODS; "": the server's default


@dataclass(frozen=True)
class RevertRequest:
    """Make version ``to_version`` the head again, or remove the layer ``edit_id`` (exactly one)."""

    to_version: int | None = None
    edit_id: str | None = None
    author: str = ""
    comment: str = ""


@dataclass(frozen=True)
class EditView:
    """A layer as the API shows it: its header, its manifest entry (None for a dry run), whether it is active."""

    header: LayerHeader
    entry: ManifestEntry | None
    active: bool

    @property
    def edit_id(self) -> str:
        return self.header.edit_id

    @property
    def version(self) -> int:
        return self.entry.version if self.entry else self.header.version

    @property
    def parent_version(self) -> int:
        if self.entry is not None and self.entry.parent_version is not None:
            return self.entry.parent_version
        return self.header.parent_version


@dataclass(frozen=True)
class VersionPin:
    """What version a request asks for: ``edit_version`` (None: the head when it starts), after the
    server knows ``min_edit_version`` (waiting at most ``wait_seconds``, the request's time left)."""

    edit_version: int | None = None
    min_edit_version: int | None = None
    wait_seconds: float | None = None

UNPINNED = VersionPin()  # the head when the request starts, no min_edit_version


def _format_of(matrices: Sequence[MatrixRecord]) -> int:
    """The layer format ``matrices`` need: 4 with a cosine condition, 3 with gated factors, else 2."""
    if any(m.min_cosine is not None for m in matrices):
        return COSINE_LAYER_FORMAT
    return GATED_LAYER_FORMAT if any(m.threshold is not None for m in matrices) else LAYER_FORMAT
