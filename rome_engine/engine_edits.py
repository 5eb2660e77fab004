"""The edit half of the engine: ApplyEdit, RevertEdit, the listings, export and import.

``EngineEdits`` is a mixin of ``engine.Engine`` (which owns the threads, the
admission table and the live versions it uses). Edits are serialized by one
lock; at most ``max_queued_edits`` wait behind the running one. Every change
of the head takes the same path, ``_commit``: store it (one atomic manifest
write), make it live (``versions.LiveVersions.swap``: the new matrices are built
aside, then copied in between two forward passes; running streams go on, on the
version they started with, through the side path), then run the caller's audit
line, all shielded from the caller's cancellation, so a caller that goes away
never leaves an edit stored but not live, nor unaudited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .admission import Admission, ModelShape, check_memory, edit_bytes
from .bounds import clip
from .edit_store import EditLayer
from .editing import EditManager
from .errors import EngineError, FailedPrecondition, HistoryMoved, InvalidRequest, ResourceExhausted, Unavailable
from .loading import LoadedModel
from .methods import work_hparams
from .records import METHODS, ApplyOptions, EditView, LayerHeader, ManifestEntry, RevertRequest
from .rome.compute import target_is_answer
from .rome.request import EditRequest
from .scoring import encode_prompt
from .versions import LiveVersions

if TYPE_CHECKING:
    from .engine import EngineLimits

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class EngineEdits:
    """The edit operations of ``Engine`` (see the module docstring); uses these of the engine:"""

    loaded: LoadedModel
    limits: EngineLimits
    edits: EditManager | None
    versions: LiveVersions | None
    on_live: Callable[[float], None] | None  # called with each change of the head's stored -> live seconds
    notify_history: Callable[[], Awaitable[None]]
    admission: Admission
    shape: ModelShape
    context_length: int
    _edit_lock: asyncio.Lock | None
    _queued_edits: int
    _stopping: threading.Event
    edit_version: int
    default_edit_method: str  # limits.edit_method, "auto" resolved for this model
    run: Callable[..., Awaitable[Any]]  # run(fn, *args): fn on a worker thread
    run_to_end: Callable[[Callable[[Callable[[], bool]], Any]], Awaitable[Any]]  # run_to_end(fn(should_stop))

    def _manager(self) -> EditManager:
        if self.edits is None:
            raise FailedPrecondition("this server was started without editing support")
        return self.edits

    def _check_expected(self, expected_version: int | None) -> None:
        if expected_version is not None and expected_version != self.edit_version:
            raise FailedPrecondition(
                f"expected_version {expected_version} does not match the head version {self.edit_version}: "
                "list the edits, then retry against the new head"
            )

    @contextlib.asynccontextmanager
    async def _edit_turn(self):
        """Edits are serialized; at most max_queued_edits wait behind the running one."""
        if self._edit_lock is None:
            self._edit_lock = asyncio.Lock()
        if self._queued_edits >= self.limits.max_queued_edits + 1:
            raise ResourceExhausted(
                f"{self._queued_edits} edits are running or queued, the limit "
                f"max_queued_edits={self.limits.max_queued_edits} is reached: retry later"
            )
        self._queued_edits += 1
        try:
            async with self._edit_lock:
                yield
        finally:
            self._queued_edits -= 1

    async def _commit(self, store: Callable[[], list[ManifestEntry]], after: Callable[[list[ManifestEntry]], R]) -> R:
        """Make a change of the head durable and live: ``store()`` (one manifest write, on a worker
        thread), the swap to its last entry's state (between two forward passes; nothing waits for
        a stream), then ``after(entries)`` (the log and audit lines). Shielded: once it starts, it
        runs to its end whatever happens to the caller (a deadline, a cancel)."""
        manager = self._manager()
        swap = self.versions.swap if self.versions is not None else None

        async def commit() -> R:
            try:
                entries = await self.run(store)
            except HistoryMoved as e:  # another replica committed first: serve its history, refuse this one
                await self._catch_up()
                raise HistoryMoved(f"{e}; this server now serves version {self.edit_version}: retry") from None
            live = await self.run(manager.activate, entries[-1].active, entries[-1].version, swap)
            if self.on_live is not None:
                self.on_live(live)
            try:
                return after(entries)  # audited as soon as it is live, before anything else awaits
            finally:
                await self.notify_history()

        return await asyncio.shield(asyncio.ensure_future(commit()))

    async def follow(self) -> None:
        """Keep this server on the newest state of a shared history for as long as it serves (a task
        the server runs; cancel it to stop). A store that others write (``listen``: the database
        store) wakes it on every commit and every few seconds; a folder store has one writer, so
        this returns at once."""
        listen = getattr(self.edits.store, "listen", None) if self.edits is not None else None
        if listen is None:
            return
        loop = asyncio.get_running_loop()
        wake, stop = asyncio.Event(), threading.Event()

        def woken() -> None:  # on the listening thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server has stopped
                loop.call_soon_threadsafe(wake.set)

        threading.Thread(target=listen, args=(woken, stop), name="romegw-history", daemon=True).start()
        try:
            while True:
                await wake.wait()
                wake.clear()
                try:
                    await self.follow_history()
                except EngineError as e:  # the database is down: keep serving what is live
                    log.warning("shared history: not followed now (%s); serving version %d", e, self.edit_version)
                except Exception:  # never let the follower die silently: log it and try again at the next wake
                    log.exception("shared history: following failed; serving version %d", self.edit_version)
        finally:
            stop.set()

    async def follow_history(self) -> None:
        """Serve the newest state of a shared history (a database store that other replicas write):
        read what they appended, verify its layers, make it live without a drain (as an edit of
        this server would be) and wake the requests waiting for a min_edit_version. Runs in the
        edit lock's turn (never beside an edit of this server), without counting as a queued edit."""
        if self.edits is None:
            return
        if self._edit_lock is None:
            self._edit_lock = asyncio.Lock()
        async with self._edit_lock:
            await self._catch_up()

    async def _catch_up(self) -> None:
        """``follow_history`` with the edit lock held."""
        manager = self._manager()
        state = await self.run(manager.follow)
        if state is None:
            return
        version, active = state
        try:
            if (version, active) != (self.edit_version, manager.active):
                swap = self.versions.swap if self.versions is not None else None
                live = await self.run(manager.activate, active, version, swap)
                log.info("shared history: version %d live here (%d active layers, %.1f ms)", version, len(active),
                         live * 1e3)  # fmt: skip
                if self.on_live is not None:
                    self.on_live(live)
        finally:
            await self.notify_history()

    def min_target_prob(self, options: ApplyOptions) -> float:
        """The threshold an edit's P(target) must reach: the request's, else the server's (InvalidRequest
        unless it is a probability)."""
        value = self.limits.min_target_prob if options.min_target_prob is None else options.min_target_prob
        if not 0.0 <= value <= 1.0:  # NaN too
            raise InvalidRequest(f"min_target_prob must be a probability in [0, 1], got {value}")
        return value

    def check_edit_chars(self, prompt: str, subject: str, target: str) -> None:
        """The cheap checks of an edit's texts, before any parsing or tokenizing (InvalidRequest)."""
        limit = self.limits.max_edit_chars
        for name, value in (("prompt", prompt), ("subject", subject), ("target", target)):
            if len(value) > limit:
                raise InvalidRequest(f"edit {name} has {len(value)} characters, over the limit max_edit_chars={limit}")

    def _check_edit_size(self, request: EditRequest, method: str) -> tuple[int, int]:
        """Token limits, the hparams that size memory, the memory estimate (blocking: tokenizes).
        Returns the tokens the computation holds in flight and its memory estimate (bytes)."""
        lim, tok = self.limits, self.loaded.tokenizer
        counts = {
            "prompt": (len(encode_prompt(tok, request.filled())), lim.max_edit_prompt_tokens),
            "subject": (len(tok(request.subject, add_special_tokens=False)["input_ids"]), lim.max_edit_subject_tokens),
            "target": (len(tok(request.target, add_special_tokens=False)["input_ids"]), lim.max_edit_target_tokens),
        }
        for name, (n, limit) in counts.items():
            if n > limit:
                raise InvalidRequest(f"edit {name} has {n} tokens, over the limit max_edit_{name}_tokens={limit}")
        hp = work_hparams(method, self.loaded, request.hparams)
        if hp.mom2_seq_len > self.context_length:
            raise InvalidRequest(
                f"hparam mom2_seq_len={hp.mom2_seq_len} exceeds the model's context length {self.context_length}"
            )
        prompts = 1 + hp.ctx_n_short + hp.ctx_n_long  # the identity template and the prefixed ones
        longest_prefix = max(hp.ctx_len_short, hp.ctx_len_long) + 4  # a seed word, ". "
        tokens = longest_prefix + counts["prompt"][0] + counts["target"][0]
        estimate = edit_bytes(
            self.shape, prompts=prompts, tokens=tokens, prefix_tokens=max(hp.ctx_len_short, hp.ctx_len_long),
            mom2_rows=hp.mom2_batch_size, mom2_seq_len=hp.mom2_seq_len,
        )  # fmt: skip
        # refused here already (admit checks it again): before the greedy check's forward pass runs
        check_memory("edit", estimate, lim.max_request_memory_mb)
        return (prompts + 1) * tokens, estimate

    def edit_method(self, options: ApplyOptions) -> str:
        """The method an edit is computed by: the request's, else the server's (InvalidRequest if unknown)."""
        method = options.method or self.default_edit_method
        if method not in METHODS:
            raise InvalidRequest(f"unknown edit method {clip(method)!r}: use one of {', '.join(METHODS)}")
        return method

    async def apply_edits(
        self,
        requests: Sequence[EditRequest],
        options: ApplyOptions,
        on_commit: Callable[[EditView], None] | None = None,
    ) -> tuple[EditView, int]:
        """Compute the edit of ``requests`` (one fact, or a batch that becomes ONE layer and one
        version) and, unless dry_run, make it the new head. Returns (layer, head version).

        Refused (FAILED_PRECONDITION) when a target already is the model's greedy answer, unless
        ``options.force``, and when a fact did not take (P(target) after the edit below
        ``min_target_prob``), with nothing stored. If the caller goes away (cancel, deadline) or
        ``close()`` runs while the layer is computed, the computation stops at its next step; the
        edit lock is held until it has stopped, so computations never overlap. Once the layer is
        being stored the commit runs to its end whatever happens to the caller, ``on_commit`` (an
        audit line) included."""
        manager = self._manager()
        self._check_expected(options.expected_version)
        threshold = self.min_target_prob(options)
        method = self.edit_method(options)
        if not 0 < len(requests) <= self.limits.max_batch_facts:
            raise InvalidRequest(
                f"an edit holds 1 to max_batch_facts={self.limits.max_batch_facts} facts, got {len(requests)}"
            )
        if method in ("rome", "ft") and len(requests) > 1:
            raise InvalidRequest(f"{method} edits one fact at a time: use memit, projected or gated for a batch")
        for request in requests:
            self.check_edit_chars(request.prompt, request.subject, request.target)
        async with self._edit_turn():
            self._check_expected(options.expected_version)
            sizes = [await self.run(self._check_edit_size, r, method) for r in requests]
            for request in requests:
                if not options.force and await self.run(target_is_answer, self.loaded, request):
                    raise FailedPrecondition(
                        f"the model already answers {clip(request.target)!r} to {clip(request.filled())!r} "
                        "(greedy): nothing to edit; set force to apply it anyway"
                    )
            # the facts' value optimisations run one after another: the largest one's memory at a time
            tokens, estimate = max(t for t, _ in sizes), max(e for _, e in sizes)
            with self.admission.admit("edit", tokens=tokens, memory=estimate):

                def compute(should_stop: Callable[[], bool]) -> EditLayer:
                    def progress(stage: str, done: int, total: int) -> None:
                        if should_stop():
                            raise Unavailable(f"the edit was cancelled during {stage}; nothing was stored")

                    return manager.compute_layer(
                        requests, method, author=options.author, comment=options.comment, progress=progress
                    )

                layer = await self.run_to_end(compute)
            if options.dry_run:
                return EditView(layer.header, None, False), self.edit_version
            refusal = below_min_target_prob(layer.header, threshold)
            if refusal:
                raise FailedPrecondition(f"{refusal}; nothing was stored: try other hyperparameters, layer or "
                                         "method, or a lower min_target_prob")  # fmt: skip

            def applied(entries: list[ManifestEntry]) -> EditView:
                entry, req = entries[0], layer.header.request
                log.info(
                    "edit %s applied: version %s -> %d (%s: %r -> %r) by %r", layer.edit_id, entry.parent_version,
                    entry.version, clip(req.subject), clip(req.prompt), clip(req.target), clip(options.author),
                )  # fmt: skip
                view = EditView(layer.header, entry, True)
                if on_commit is not None:
                    on_commit(view)
                return view

            view = await self._commit(lambda: [manager.store_layer(layer)], applied)
            return view, self.edit_version

    async def revert_edit(
        self, revert: RevertRequest, on_commit: Callable[[int, list[str]], None] | None = None
    ) -> tuple[int, list[str], float]:
        """Revert to a version, or remove one layer. Returns (head version, removed ids, seconds).
        ``on_commit(version, removed)`` runs once it is live, even if the caller has gone."""
        manager = self._manager()
        t0 = time.perf_counter()
        async with self._edit_turn():
            version, active, removed = await self.run(manager.plan_revert, revert)
            if version == self.edit_version:
                return version, [], time.perf_counter() - t0  # already there: nothing to record

            def record() -> list[ManifestEntry]:
                return [manager.record_revert(version, active, revert)]

            def reverted(_: list[ManifestEntry]) -> None:
                log.info("revert by %r: head version now %d, removed %s", clip(revert.author), version,
                         removed or "nothing")  # fmt: skip
                if on_commit is not None:
                    on_commit(version, removed)

            await self._commit(record, reverted)
            return version, removed, time.perf_counter() - t0

    async def list_edits(self, *, include_inactive: bool) -> list[EditView]:
        return await self.run(lambda: self._manager().views(include_inactive=include_inactive))

    async def get_edit(self, edit_id: str) -> EditView:
        if not edit_id:
            raise InvalidRequest("edit_id must not be empty")
        return await self.run(self._manager().view, edit_id)

    async def export_edits(self, from_version: int, to_version: int | None) -> list[tuple[ManifestEntry, bytes]]:
        manager = self._manager()
        top = manager.store.manifest.max_version if to_version is None else to_version
        if top < from_version:
            raise InvalidRequest(f"to_version {top} is below from_version {from_version}")
        return await self.run(manager.export_files, from_version, top)

    async def import_edits(
        self,
        files: AsyncIterable[tuple[bytes, str | None]] | Iterable[tuple[bytes, str | None]],
        *,
        author: str = "",
        on_commit: Callable[[list[EditView]], None] | None = None,
    ) -> list[EditView]:
        """Apply layer files computed elsewhere on the same base, oldest first, each as a new version.

        Each file is checked as it arrives (reading stops at the first bad one, or past
        max_import_files / max_import_bytes); the files are stored only once all of them
        passed, all in one manifest write, so a refused import changes nothing.
        ``on_commit`` (an audit line) runs once they are live, even if the caller has gone.
        """
        manager = self._manager()
        lim = self.limits
        layers: list[EditLayer] = []
        count = size = 0
        async for data, sha in _aiter(files):
            count, size = count + 1, size + len(data)
            if count > lim.max_import_files:
                raise ResourceExhausted(
                    f"an import holds at most max_import_files={lim.max_import_files} layer files: send fewer per call"
                )
            if size > lim.max_import_bytes:
                raise ResourceExhausted(
                    f"an import holds at most max_import_bytes={lim.max_import_bytes} bytes of layer files "
                    f"({size} so far): send fewer per call"
                )
            try:
                layer = await self.run(manager.check_import_file, data, sha)
            except EngineError as e:  # the same kind of error, saying which file of the stream it was
                raise type(e)(f"layer file {count} of the import: {e}") from e
            if any(x.edit_id == layer.edit_id for x in layers):
                raise InvalidRequest(f"edit {layer.edit_id} is sent twice")
            layers.append(layer)
        if not layers:
            return []
        async with self._edit_turn():
            for layer in layers:
                await self.run(manager.check_import_base, layer)
            origins = [x.version for x in layers]

            def imported(entries: list[ManifestEntry]) -> list[EditView]:
                views = [EditView(x.header, e, True) for x, e in zip(layers, entries, strict=True)]
                if on_commit is not None:
                    on_commit(views)
                return views

            # all the layers are stored in one manifest write and made live together
            return await self._commit(
                lambda: manager.store_layers(layers, op="import", author=author, origin_versions=origins), imported
            )


def below_min_target_prob(header: LayerHeader, threshold: float) -> str | None:
    """Why an edit did not take (a fact's P(target) on its prompt after it is below ``threshold``),
    else None."""
    for i, (fact, p) in enumerate(zip(header.facts, header.probabilities, strict=True)):
        if p.target_after >= threshold:
            continue
        which = f"fact {i + 1} of {len(header.facts)} ({clip(fact.subject)!r}): " if len(header.facts) > 1 else ""
        return (
            f"the edit did not take: {which}P({clip(fact.target)!r}) on its prompt went {p.target_before:.3g} -> "
            f"{p.target_after:.3g}, below min_target_prob={threshold:g}"
            + (f" (P({clip(p.old_object)!r}) {p.old_before:.3g} -> {p.old_after:.3g})" if p.old_object else "")
        )
    return None


async def _aiter(items: AsyncIterable[T] | Iterable[T]) -> AsyncIterator[T]:
    """Iterate a list or an async stream alike (import_edits takes either)."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
