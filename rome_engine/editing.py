"""Versioned editing of the live model: compute a ROME layer, store it, serve it.

``EditManager`` holds the edit store, the live weights (``LayerWeights``) and
the served head version. Its methods are blocking (torch and disk work); the
engine calls them on a worker thread, under its edit lock, and swaps weights
only inside its version gate, when no stream is running.

    manager = EditManager(loaded, EditStore(dir, loaded.model_id), compute=compute_fn)
    manager.restore()                       # at start: re-apply the stored stack
    layer = manager.compute_layer(request, author="ops", comment="ticket 42")
    entry = manager.store_layer(layer)      # durable from here on
    manager.activate(entry["active"], entry["version"])
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .bounds import clip
from .edit_store import (
    FORMAT_VERSION,
    EditLayer,
    EditStore,
    LayerHeader,
    RankOneFactor,
    decode_layer,
    sha256_bytes,
    utc_now,
)
from .errors import FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted, Unavailable
from .layers import LayerWeights, rank_one_patch
from .loading import LoadedModel
from .scoring import score_continuations

log = logging.getLogger(__name__)

# compute(loaded, request[, progress]) -> an object with: param_name, left (out,), right (in,), layer, hparams
# (with to_dict()), old_object, compute_seconds, cov_from_cache (see rome_engine.rome)
ComputeFn = Callable[..., object]
# progress(stage, done, total), called at each step of a computation; raising from it abandons the work
ProgressFn = Callable[[str, int, int], None]

# ||u v^T||_F <= ratio * ||W||_F for every imported or restored layer. Real ROME edits of
# SmolLM2-135M's layer-4 down_proj measure at most 0.14 (100 CounterFact edits, docs/eval_*).
DEFAULT_MAX_UPDATE_NORM_RATIO = 1.0


@dataclass(frozen=True)
class EditView:
    """A layer as the API shows it: its header, its manifest entry, whether it is active."""

    header: dict
    entry: dict | None
    active: bool

    @property
    def version(self) -> int:
        return int(self.entry["version"]) if self.entry else int(self.header["version"])


class EditManager:
    def __init__(
        self,
        loaded: LoadedModel,
        store: EditStore,
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
        decided = [e for e in manifest.entries if e["op"] != "recover"]
        intended = int(decided[-1]["version"]) if decided else 0
        for entry in reversed(decided):
            version, ids = int(entry["version"]), list(entry["active"])
            problem = self._load_all(ids)
            if problem is None:
                break
            log.error("edit store: version %d cannot be served: %s", version, problem)
        else:
            version, ids = 0, []
        for edit_id in ids:
            layer = self._layers[edit_id]
            log.info(
                "re-applying edit layer %s (created as version %s, %s -> %r)",
                edit_id, layer.header["version"], clip(layer.header["request"]["subject"]),
                clip(layer.header["request"]["target"]),
            )
        self.weights.materialize([self._layers[i] for i in ids])
        self.head_version, self.active = version, ids
        if version != recorded:
            if version == intended:
                reason = f"the layers of version {version} verify again"
                log.warning("edit store: serving version %d again (an earlier start served %d)", version, recorded)
            else:
                reason = f"layers of version {intended} failed verification"
                log.error("edit store: serving version %d instead of the recorded head %d", version, intended)
            try:
                self.store.add_state("recover", version=version, active=ids, reason=reason)
            except OSError as e:  # a read-only store: serve anyway, the next writable start records it
                log.warning("edit store %s: cannot record the recovery (%s); serving version %d", self.store.root,
                            e, version)
        log.info("edit store %s: head version %d, %d active layers", self.store.root, version, len(ids))
        return version

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

    def check_base(self, layer: EditLayer) -> str | None:
        """None when the layer was computed on this base (its fingerprint covers every touched matrix)."""
        params = [f.param for f in layer.factors]
        return self.weights.check_fingerprint(layer.header["base_fingerprint"], params)

    # -- apply --------------------------------------------------------------

    def compute_layer(
        self, request: object, *, author: str, comment: str, progress: ProgressFn | None = None
    ) -> EditLayer:
        """Compute a ROME edit on the current weights (which it leaves unchanged) as a layer.
        ``progress`` runs at every step of the computation; an exception it raises abandons it."""
        t0 = time.perf_counter()
        args = (self.loaded, request) if progress is None else (self.loaded, request, progress)
        result = self.compute(*args)
        left, right = result.left.detach().float().cpu(), result.right.detach().float().cpu()
        factor = RankOneFactor(result.param_name, left, right)
        probs = self._probabilities(request, result, factor)
        header = {
            "format_version": FORMAT_VERSION,
            "edit_id": str(uuid.uuid4()),
            "version": self.store.manifest.max_version + 1,
            "parent_version": self.head_version,
            "created_at": utc_now(),
            "author": author,
            "comment": comment,
            "request": {
                "prompt": request.prompt,
                "subject": request.subject,
                "target": request.target,
                "layer": int(result.layer),
                "hparams": result.hparams.to_dict(),
            },
            "layer": int(result.layer),
            "matrices": [
                {
                    "name": factor.param,
                    "shape": [factor.u.numel(), factor.v.numel()],
                    "dtype": self.loaded.dtype_name,
                    "update_norm": factor.norm,
                }
            ],
            "base_fingerprint": self.weights.fingerprint([factor.param]),
            "probabilities": probs,
            "compute_seconds": time.perf_counter() - t0,
            "covariance_from_cache": bool(getattr(result, "cov_from_cache", False)),
            "model_id": self.loaded.model_id,
        }
        layer = EditLayer(header, (factor,))
        self._check_computed(layer)
        return layer

    def _check_computed(self, layer: EditLayer) -> None:
        """A computed layer passes the checks a restart applies, or it is never stored."""
        for f in layer.factors:
            if not (bool(torch.isfinite(f.u).all()) and bool(torch.isfinite(f.v).all())):
                raise FailedPrecondition(
                    f"the computed update of {f.param} holds NaN or infinite values: try other hyperparameters"
                )
        try:
            LayerHeader.from_json(layer.header)
        except ValueError as e:
            raise InvalidRequest(f"the edit cannot be stored: {e}") from e
        problem = self.check_fit(layer)
        if problem:
            raise FailedPrecondition(f"the computed edit cannot be applied: {problem}")

    def _probabilities(self, request: object, result: object, factor: RankOneFactor) -> dict:
        """P(target) and P(old object) on the edit prompt, live weights vs with the layer (a hook, no mutation)."""
        prompt = request.filled()
        old = getattr(result, "old_object", "") or ""
        conts = [request.target] + ([old] if old and old != request.target else [])
        before = score_continuations(self.loaded, prompt, conts)
        with rank_one_patch(self.loaded, [factor]):
            after = score_continuations(self.loaded, prompt, conts)
        p = [math.exp(s.total_logprob) for s in before], [math.exp(s.total_logprob) for s in after]
        return {
            "target_before": p[0][0],
            "target_after": p[1][0],
            "old_before": p[0][1] if len(conts) > 1 else 0.0,
            "old_after": p[1][1] if len(conts) > 1 else 0.0,
            "old_object": old,
        }

    def store_layer(self, layer: EditLayer, *, op: str = "apply", extra: dict | None = None) -> dict:
        """Make the layer durable (file, then manifest entry); the weights do not change yet."""
        return self.store_layers([layer], op=op, extras=[extra or {}])[0]

    def store_layers(self, layers: list[EditLayer], *, op: str, extras: list[dict]) -> list[dict]:
        """Make several layers durable at once, each a version on top of the last (all or none);
        the weights do not change yet."""
        with self._storage_errors():
            entries = self.store.add_layers(layers, base_active=self.active, op=op, extras=extras)
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
                    f"the edit store's disk is full ({self.store.root}): free space, then retry; nothing was changed"
                ) from e
            raise Unavailable(f"cannot write the edit store {self.store.root}: {e}; nothing was changed") from e

    def activate(self, active: list[str], version: int) -> None:
        """Swap the live weights to a version (call only while no stream runs)."""
        self.weights.materialize([self._layers[i] for i in active])
        self.active, self.head_version = list(active), version

    # -- revert -------------------------------------------------------------

    def plan_revert(self, *, to_version: int | None, edit_id: str | None) -> tuple[int, list[str], list[str]]:
        """(new head version, its active layers, the layers it removes)."""
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

    def record_revert(
        self, version: int, active: list[str], *, to_version: int | None, edit_id: str | None, author: str, comment: str
    ) -> dict:
        with self._storage_errors():
            return self.store.add_state(
                "revert", version=version, active=active, to_version=to_version, edit_id=edit_id,
                author=author, comment=comment,
            )

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
            active = entry["edit_id"] in self.active
            if not include_inactive and not active:
                continue
            try:
                out.append(self.view(entry["edit_id"]))
            except FailedPrecondition as e:
                log.warning("listing edit %s: %s", entry["edit_id"], e)
        return out

    def export_files(self, from_version: int, to_version: int) -> list[tuple[dict, bytes]]:
        """(manifest entry, file bytes) of the layers created in [from_version, to_version], oldest first."""
        out = []
        for entry in self.store.manifest.apply_entries().values():
            if from_version <= int(entry["version"]) <= to_version:
                try:
                    _, data = self.store.read_layer(entry["edit_id"])
                except ValueError as e:
                    raise FailedPrecondition(f"cannot export edit {entry['edit_id']}: {e}") from e
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
        problem = self.check_fit(layer)
        if problem:
            raise FailedPrecondition(f"edit {layer.edit_id} cannot be applied to this model: {problem}")
        return layer

    def check_import_base(self, layer: EditLayer) -> None:
        """FailedPrecondition unless the layer is new to this store and was computed on this base
        (call under the edit lock, so that no edit is storing or swapping meanwhile)."""
        if layer.edit_id in self.store.manifest.apply_entries():
            raise FailedPrecondition(f"edit {layer.edit_id} is already in this store")
        problem = self.check_base(layer)
        if problem:
            raise FailedPrecondition(f"edit {layer.edit_id} was computed on another base model: {problem}")


def rome_compute(cache_dir: object = None, corpus: object = None) -> ComputeFn:
    """The ROME computation with its caches (covariance statistics, prefixes) under ``cache_dir``."""
    from .rome import RomeCache, compute_edit

    cache = RomeCache(cache_dir, corpus=corpus)

    def compute(loaded: LoadedModel, request: object, progress: ProgressFn | None = None) -> object:
        return compute_edit(loaded, request, cache, progress=progress)

    return compute
