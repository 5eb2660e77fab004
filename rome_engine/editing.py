"""Versioned editing of the live model: compute an edit layer (any method), store it, serve it.

``EditManager`` holds the edit store, the live weights (``LayerWeights``) and
the served head version. Its methods are blocking (torch and disk work); the
engine calls them on a worker thread, under its edit lock, and swaps weights
through ``versions.LiveVersions`` (between forward passes; streams keep their version).

    manager = EditManager(loaded, EditStore(dir, loaded.model_id), compute=method_compute(cache_dir))
    manager.restore()                       # at start: re-apply the stored stack
    layer = manager.compute_layer([request], "rome", author="ops", comment="ticket 42")
    entry = manager.store_layer(layer)      # durable from here on
    manager.activate(entry.active, entry.version)
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from .bounds import clip
from .delta import LowRankFactor, as_if_applied
from .edit_store import EditLayer, HistoryStore, StateChange, decode_layer, sha256_bytes, utc_now
from .errors import (
    EngineError,
    FailedPrecondition,
    HistoryMoved,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from .layers import LayerWeights
from .loading import LoadedModel
from .methods import MethodResult
from .methods.projection import KeyBlock, PriorKeys, prior_width
from .records import (
    EditView,
    LayerHeader,
    ManifestEntry,
    MatrixRecord,
    Probabilities,
    RevertRequest,
    StoredRequest,
)
from .rome import EditRequest
from .rome.cache import ProgressFn
from .rome.compute import first_answer, greedy_text
from .scoring import score_continuations

log = logging.getLogger(__name__)

__all__ = ["ComputeFn", "EditManager", "EditView", "fact_probabilities", "method_compute"]


class ComputeFn(Protocol):
    """How an edit is computed (``method_compute``; a test's fake): the facts of ``requests`` by
    ``method``, on the given weights, which it leaves unchanged. ``prior_keys[param]`` are the
    keys of the edits active on that matrix, one (edit id, (in, r)) block per edit, oldest first
    (the projected method protects them). ``progress`` runs at each step; an exception it raises
    abandons the work."""

    def __call__(
        self,
        loaded: LoadedModel,
        requests: Sequence[EditRequest],
        method: str,
        prior_keys: Mapping[str, PriorKeys],
        progress: ProgressFn | None = None,
    ) -> MethodResult: ...


# ||u v^T||_F <= ratio * ||W||_F for every imported or restored layer. Real ROME edits of
# SmolLM2-135M's layer-4 down_proj measure at most 0.14 (100 CounterFact edits, docs/eval_*).
DEFAULT_MAX_UPDATE_NORM_RATIO = 1.0


def fact_probabilities(loaded: LoadedModel, request: EditRequest, factors: Sequence[LowRankFactor]) -> Probabilities:
    """P(target) and P(old object) on the filled edit prompt (whole continuation, as the API reports
    them): on the weights as they are, then as if ``factors`` were applied (a hook, no mutation).
    The old object is the model's greedy answer before the edit. The one place an edit's effect is
    measured."""
    prompt = request.filled()
    old_object = first_answer(greedy_text(loaded, prompt, max_new_tokens=8))
    old_object = old_object if old_object.strip() else ""
    conts = [request.target] + ([old_object] if old_object and old_object != request.target else [])
    with_old = len(conts) > 1

    def probs() -> list[float]:
        return [math.exp(s.total_logprob) for s in score_continuations(loaded, prompt, conts)]

    before = probs()
    with as_if_applied(loaded, factors):
        after = probs()
    return Probabilities(
        target_before=before[0], target_after=after[0], old_before=before[1] if with_old else 0.0,
        old_after=after[1] if with_old else 0.0, old_object=old_object,
    )  # fmt: skip


class EditManager:
    def __init__(
        self,
        loaded: LoadedModel,
        store: HistoryStore,
        compute: ComputeFn,
        *,
        max_update_norm_ratio: float = DEFAULT_MAX_UPDATE_NORM_RATIO,
    ) -> None:
        self.loaded = loaded
        self.store = store
        self.compute = compute
        self.max_update_norm_ratio = max_update_norm_ratio
        self.editable = loaded.spec.editable_weight_names(loaded.num_layers)
        self.weights = LayerWeights(loaded)
        self._layers: dict[str, EditLayer] = {}
        self._reported: set[tuple[int, str]] = set()  # (version, problem) already logged as an ERROR
        # param -> input dims the hard projected mode may write along with no edit active
        # (d - preserved eigenvectors of C), learned from this process's projected edits
        self._writable: dict[str, int] = {}
        self.head_version = 0
        self.active: list[str] = []

    # -- start --------------------------------------------------------------

    def restore(self) -> int:
        """Re-apply the stored stack: the newest version whose layers all verify.

        A layer that cannot be read, fails its checksum or schema, or does not fit
        this model makes its versions unservable, never the start: the newest
        version whose layers all check out is served (and a ``recover`` entry
        recorded, unless the store is read-only). ``recover`` entries are an earlier
        start's fallback, not a decision: each start aims at the newest version an
        apply, import or revert made, so a layer that verifies again is served again.
        """
        self.store.remove_orphans()
        manifest = self.store.manifest
        recorded = manifest.head_version  # where the history stands (perhaps an earlier start's recovery)
        # the operators' last decision, not an earlier start's fallback: a layer that failed to
        # verify once (a transient read error, a stricter limit) is served again once it verifies
        decided = [e for e in manifest.entries if e.op != "recover"]
        intended = decided[-1].version if decided else 0
        version, ids = self._newest_servable(decided)
        for edit_id in ids:
            layer = self._layers[edit_id]
            log.info(
                "re-applying edit layer %s (created as version %s, %s -> %r)",
                edit_id, layer.version, clip(layer.header.request.subject), clip(layer.header.request.target),
            )
        self.weights.materialize([self._layers[i] for i in ids])
        self.head_version, self.active = version, ids
        if version != recorded and self.store.shared:
            # a history other replicas write: their state is theirs; this one serves its fallback alone
            log.error("edit store: serving version %d here; the history's head is %d", version, recorded)
        elif version != recorded:
            if version == intended:
                reason = f"the layers of version {version} verify again"
                log.warning("edit store: serving version %d again (an earlier start served %d)", version, recorded)
            else:
                reason = f"layers of version {intended} failed verification"
                log.error("edit store: serving version %d instead of the recorded head %d", version, intended)
            try:
                self.store.add_state(StateChange("recover", version, tuple(ids), reason=reason))
            except (OSError, EngineError) as e:  # a read-only store: serve anyway, the next writable start records it
                log.warning("edit store %s: cannot record the recovery (%s); serving version %d", self.store.location,
                            e, version)
        log.info("edit store %s: head version %d, %d active layers", self.store.location, version, len(ids))
        return version

    def _newest_servable(self, decided: list[ManifestEntry]) -> tuple[int, list[str]]:
        """(version, active) of the newest of ``decided`` whose layers all load and verify (each one
        that does not gets an ERROR line saying why); (0, []) when none does."""
        for entry in reversed(decided):
            version, ids = entry.version, list(entry.active)
            problem = self._load_all(ids)
            if problem is None:
                return version, ids
            if (version, problem) not in self._reported:  # once: a follower retries every few seconds
                self._reported.add((version, problem))
                log.error("edit store: version %d cannot be served: %s", version, problem)
        return 0, []

    def _served_position(self) -> int:
        """How many entries of the history lead up to the state served: 1 + the index of the newest
        entry whose state (version and layers) it is; 0 when none is (the base before any entry)."""
        entries = self.store.manifest.entries
        for i in range(len(entries) - 1, -1, -1):
            if entries[i].version == self.head_version and list(entries[i].active) == self.active:
                return i + 1
        return 0

    @property
    def history_lag(self) -> int:
        """Entries of the history (as the store last saw it: another replica's commits included) after
        the newest one this manager serves: 0 when it is caught up."""
        remote = max(getattr(self.store, "remote_entries", 0), len(self.store.manifest.entries))
        return remote - self._served_position()

    @property
    def served_history_version(self) -> int:
        """The newest version the history held when it reached the state served (``min_edit_version``
        waits for it: a version this server has read but not made live does not count)."""
        return max((e.version for e in self.store.manifest.entries[: self._served_position()]), default=0)

    def _check_on_head(self) -> None:
        """HistoryMoved unless the state served is the history's head: a change computed on another
        state would be committed on top of layers it never saw (or drop them)."""
        head = self.store.manifest.head
        state = (head.version, list(head.active)) if head is not None else (0, [])
        if state != (self.head_version, self.active):
            raise HistoryMoved(
                f"this server serves version {self.head_version}, but the edit history's head is version "
                f"{state[0]} (not followed yet, or its layers do not verify here; the log says which): nothing "
                "was written; retry, or edit through a replica that serves the head"
            )

    def follow(self) -> tuple[int, list[str]] | None:
        """What other writers of a shared history (replicas) appended since the last read: the state
        to serve now, (version, active), or None when nothing is new. The history's head when its
        layers verify, else the newest version whose layers do (nothing is recorded: the history is
        not this replica's to amend). The weights do not change here (``activate`` does that)."""
        new = self.store.refresh()
        decided = [e for e in self.store.manifest.entries if e.op != "recover"]
        newest = (decided[-1].version, list(decided[-1].active)) if decided else (0, [])
        if not new and newest == (self.head_version, self.active):
            return None
        # something new, or an earlier version that did not verify here: (re)try, newest first
        return self._newest_servable(decided)

    def _load_all(self, ids: list[str]) -> str | None:
        """None when every layer of ``ids`` is loaded and fits the model, else why not (never raises)."""
        for edit_id in ids:
            if edit_id in self._layers:
                continue
            try:
                layer, _ = self.store.read_layer(edit_id)
                problem = self.check_fit(layer) or self.check_base(layer)
            except Exception as e:  # a damaged store entry is refused like a damaged layer, never a crash
                return f"layer {edit_id}: {type(e).__name__}: {e}"
            if problem:
                return f"layer {edit_id} does not fit this model: {problem}"
            self._layers[edit_id] = layer
        return None

    def check_fit(self, layer: EditLayer) -> str | None:
        """None when a (decoded, schema-checked) layer may be applied to this model, else why not:
        it touches only editable matrices, with factors of their shapes, and no update is too large."""
        return (
            self.weights.check_targets(layer, self.editable)
            or self.weights.check_shapes(layer)
            or self.weights.check_norms(layer, self.max_update_norm_ratio)
        )

    def _fitting(self, layer: EditLayer, what: str) -> EditLayer:
        """``layer``, or FailedPrecondition saying why ``what`` cannot be applied to this model."""
        problem = self.check_fit(layer)
        if problem:
            raise FailedPrecondition(f"{what} cannot be applied to this model: {problem}")
        return layer

    def check_base(self, layer: EditLayer) -> str | None:
        """None when the layer was computed on this base (its fingerprint covers every touched matrix)."""
        params = [f.param for f in layer.factors]
        return self.weights.check_fingerprint(layer.header.base_fingerprint, params)

    # -- apply --------------------------------------------------------------

    def active_key_blocks(self) -> dict[str, list[KeyBlock]]:
        """param -> [(edit id, its keys (in, r)), ...]: the edit keys stored in the active layers,
        oldest first. Derived from the layers every time (never accumulated), so any version's
        statistic is exactly its layers'."""
        blocks: dict[str, list[KeyBlock]] = {}
        for edit_id in self.active:
            for param, k in self._layers[edit_id].keys.items():
                blocks.setdefault(param, []).append((edit_id, k))
        return blocks

    def free_dims(self) -> dict[str, int]:
        """param -> input dimensions a (hard) projected edit may still write along: d - the
        preserved eigenvectors of C - the active layers' keys (each independent key takes one
        for as long as it is active; at 0 projected edits on that matrix are refused). Known
        for the matrices a projected edit was computed on since this process started."""
        blocks = self.active_key_blocks()
        return {param: max(w - prior_width(blocks.get(param)), 0) for param, w in dict(self._writable).items()}

    def active_keys(self) -> dict[str, torch.Tensor]:
        """param -> (in, n): ``active_key_blocks`` side by side."""
        return {param: torch.cat([k for _, k in b], dim=1) for param, b in self.active_key_blocks().items()}

    def compute_layer(
        self,
        requests: Sequence[EditRequest],
        method: str,
        *,
        author: str,
        comment: str,
        progress: ProgressFn | None = None,
    ) -> EditLayer:
        """Compute the edit of ``requests`` by ``method`` on the current weights (which it leaves
        unchanged) as one layer, measured fact by fact. ``progress`` runs at every step of the
        computation; an exception it raises abandons it."""
        t0 = time.perf_counter()
        prior = self.active_key_blocks() if method in ("projected", "gated") else {}
        result = self.compute(self.loaded, requests, method, prior, progress)
        if result.method == "projected" and getattr(result.hparams, "hard_prior", 0):
            for info in result.layer_info:
                if info.free_dims is not None:  # free = writable - the earlier keys it was given
                    self._writable[info.param] = info.free_dims + prior_width(prior.get(info.param))
        factors = tuple(f.cpu() for f in result.factors)
        self._check_factors(factors)
        probs = tuple(fact_probabilities(self.loaded, r, factors) for r in requests)
        hparams = result.hparams.to_dict()
        header = LayerHeader(
            edit_id=str(uuid.uuid4()),
            version=self.store.manifest.max_version + 1,
            parent_version=self.head_version,
            created_at=utc_now(),
            author=author,
            comment=comment,
            facts=tuple(StoredRequest(r.prompt, r.subject, r.target, result.layers[-1], hparams) for r in requests),
            method=result.method,
            layer=result.layers[-1],
            layers=tuple(result.layers),
            matrices=tuple(
                MatrixRecord(f.param, f.shape, f.norm, self.loaded.dtype_name, f.rank,
                             int(result.keys[f.param].shape[1]) if f.param in result.keys else 0, f.threshold,
                             f.cosine_gate.min_cosine if f.cosine_gate is not None else None)
                for f in factors
            ),  # fmt: skip
            base_fingerprint=self.weights.fingerprint([f.param for f in factors]),
            probabilities=probs,
            compute_seconds=time.perf_counter() - t0,
            covariance_from_cache=result.cov_from_cache,
            model_id=self.loaded.model_id,
        )
        for r, p in zip(requests, probs, strict=True):
            log.info(
                "edit %r -> %r (%s, layers %s): P(target) %.3f -> %.3f, P(%r) %.3f -> %.3f, %.1f s",
                clip(r.filled()), clip(r.target), result.method, list(result.layers), p.target_before,
                p.target_after, clip(p.old_object), p.old_before, p.old_after, header.compute_seconds,
            )  # fmt: skip
        try:  # what a restart checks of the stored header, checked before it is ever stored
            LayerHeader.from_json(header.to_json())
        except ValueError as e:
            raise InvalidRequest(f"the edit cannot be stored: {e}") from e
        keys = {p: k.detach().float().cpu().contiguous() for p, k in result.keys.items()}
        return self._fitting(EditLayer(header, factors, keys), "the computed edit")

    @staticmethod
    def _check_factors(factors: Sequence[LowRankFactor]) -> None:
        for f in factors:
            if not f.finite:
                raise FailedPrecondition(
                    f"the computed update of {f.param} holds NaN or infinite values: try other hyperparameters"
                )

    def store_layer(self, layer: EditLayer) -> ManifestEntry:
        """Make the layer durable (file, then manifest entry); the weights do not change yet."""
        return self.store_layers([layer], op="apply")[0]

    def store_layers(
        self, layers: list[EditLayer], *, op: str, author: str = "", origin_versions: list[int] | None = None
    ) -> list[ManifestEntry]:
        """Make several layers durable at once, each a version on top of the last (all or none);
        the weights do not change yet (see ``EditStore.add_layers`` for ``author`` and ``origin_versions``)."""
        self._check_on_head()
        with self._storage_errors():
            entries = self.store.add_layers(
                layers, base_active=self.active, op=op, author=author, origin_versions=origin_versions
            )
        for layer in layers:
            self._layers[layer.edit_id] = layer
        return entries

    @contextlib.contextmanager
    def _storage_errors(self):
        """Disk failures become errors that say nothing changed (the write is atomic)."""
        try:
            yield
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ResourceExhausted(
                    f"the edit store's disk is full ({self.store.location}): free space, then retry; "
                    "nothing was changed"
                ) from e
            raise Unavailable(f"cannot write the edit store {self.store.location}: {e}; nothing was changed") from e

    def activate(
        self, active: Sequence[str], version: int, swap: Callable[[int, list[EditLayer]], float] | None = None
    ) -> float:
        """Make a version the head: ``swap(version, layers)`` puts its weights live (the server's
        ``versions.LiveVersions.swap``, between forward passes); without it, the weights are set
        directly (no forward pass may run meanwhile). Returns the seconds until it was live."""
        t0 = time.perf_counter()
        layers = [self._layers[i] for i in active]
        if swap is None:
            self.weights.materialize(layers)
            live = time.perf_counter() - t0
        else:
            live = swap(version, layers)
        self.active, self.head_version = list(active), version
        return live

    def version_layers(self, version: int) -> list[EditLayer]:
        """The active layers of any version of the history, loaded (blocking: may read layer files).
        NotFound for a version that never existed, FailedPrecondition when its layers do not verify."""
        if version == self.head_version:
            return [self._layers[i] for i in self.active]
        ids = self.store.manifest.active_at(version)
        problem = self._load_all(ids)
        if problem:  # the detail (paths of the store) is for the operators' log, not for any reader
            log.error("edit store: version %d cannot be served: %s", version, problem)
            raise FailedPrecondition(f"version {version} cannot be served: a layer of it does not verify "
                                     "(the server log says which and why)")  # fmt: skip
        return [self._layers[i] for i in ids]

    # -- revert -------------------------------------------------------------

    def plan_revert(self, revert: RevertRequest) -> tuple[int, list[str], list[str]]:
        """(new head version, its active layers, the layers it removes)."""
        to_version, edit_id = revert.to_version, revert.edit_id
        manifest = self.store.manifest
        if to_version is not None:
            if to_version > manifest.max_version:
                raise NotFound(f"version {to_version} does not exist (versions 0..{manifest.max_version} exist)")
            active = manifest.active_at(to_version)
            problem = self._load_all(active)
            if problem:
                raise FailedPrecondition(f"version {to_version} cannot be rebuilt: {problem}")
            return to_version, active, [i for i in self.active if i not in active]
        if edit_id is None:
            raise InvalidRequest("say what to revert: to_version or edit_id")
        if edit_id not in manifest.apply_entries():
            raise NotFound(f"no edit with id {edit_id!r}")
        if edit_id not in self.active:
            raise FailedPrecondition(f"edit {edit_id} is not active at version {self.head_version}")
        return manifest.max_version + 1, [i for i in self.active if i != edit_id], [edit_id]

    def record_revert(self, version: int, active: list[str], revert: RevertRequest) -> ManifestEntry:
        self._check_on_head()
        with self._storage_errors():
            return self.store.add_state(StateChange(
                "revert", version, tuple(active), author=revert.author, comment=revert.comment,
                to_version=revert.to_version, edit_id=revert.edit_id,
            ))  # fmt: skip

    # -- reading ------------------------------------------------------------

    def view(self, edit_id: str) -> EditView:
        entry = self.store.manifest.apply_entries().get(edit_id)
        if entry is None:
            raise NotFound(f"no edit with id {edit_id!r}")
        if edit_id not in self._layers:
            problem = self._load_all([edit_id])
            if problem:
                raise FailedPrecondition(problem)
        return EditView(self._layers[edit_id].header, entry, edit_id in self.active)

    def views(self, *, include_inactive: bool) -> list[EditView]:
        """Layers, newest first."""
        out = []
        for entry in reversed(list(self.store.manifest.apply_entries().values())):
            edit_id = entry.edit_id or ""
            if not include_inactive and edit_id not in self.active:
                continue
            try:
                out.append(self.view(edit_id))
            except FailedPrecondition as e:
                log.warning("listing edit %s: %s", edit_id, e)
        return out

    def export_files(self, from_version: int, to_version: int) -> list[tuple[ManifestEntry, bytes]]:
        """(manifest entry, file bytes) of the layers created in [from_version, to_version], oldest first."""
        out = []
        for edit_id, entry in self.store.manifest.apply_entries().items():
            if from_version <= entry.version <= to_version:
                try:
                    _, data = self.store.read_layer(edit_id)
                except ValueError as e:
                    raise FailedPrecondition(f"cannot export edit {edit_id}: {e}") from e
                out.append((entry, data))
        return out

    # -- import -------------------------------------------------------------

    def check_import(self, data: bytes, sha256: str | None) -> EditLayer:
        """A layer file sent by a caller, fully checked; nothing is written.

        InvalidRequest for anything malformed (sha256, safetensors, header schema,
        factors: dtype, shape, non-finite values), FailedPrecondition when it does not
        fit this model or store (parameters, shapes, update norm, base, an id already stored).
        Call it under the engine's edit lock (see check_import_base).
        """
        layer = self.check_import_file(data, sha256)
        self.check_import_base(layer)
        return layer

    def check_import_file(self, data: bytes, sha256: str | None) -> EditLayer:
        """The checks of one file that need no lock (see check_import): safe while edits and streams run
        (the norm bound reads a matrix that an edit may be swapping, so it can be off by that edit)."""
        if sha256 and sha256_bytes(data) != sha256:
            raise InvalidRequest("layer file does not match the sha256 sent with it (damaged in transit)")
        try:
            layer = decode_layer(data)
        except ValueError as e:
            raise InvalidRequest(f"not a valid layer file: {e}") from e
        return self._fitting(layer, f"edit {layer.edit_id}")

    def check_import_base(self, layer: EditLayer) -> None:
        """FailedPrecondition unless the layer is new to this store and was computed on this base
        (call under the edit lock, so that no edit is storing or swapping meanwhile)."""
        if layer.edit_id in self.store.manifest.apply_entries():
            raise FailedPrecondition(f"edit {layer.edit_id} is already in this store")
        problem = self.check_base(layer)
        if problem:
            raise FailedPrecondition(f"edit {layer.edit_id} was computed on another base model: {problem}")


def method_compute(cache_dir: Path | str | None = None, corpus: Path | str | None = None) -> ComputeFn:
    """The editing methods (``methods.compute_method``) with their caches (covariance statistics,
    eigenbases, prefixes) under ``cache_dir``."""
    from .methods import compute_method
    from .rome import RomeCache

    cache = RomeCache(cache_dir, corpus=corpus)

    def compute(
        loaded: LoadedModel,
        requests: Sequence[EditRequest],
        method: str,
        prior_keys: Mapping[str, PriorKeys],
        progress: ProgressFn | None = None,
    ) -> MethodResult:
        return compute_method(method, loaded, requests, cache, prior_keys=prior_keys, progress=progress)

    return compute
