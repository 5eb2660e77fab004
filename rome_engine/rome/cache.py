"""Where ROME keeps what it computes once per model: prefixes, a text sample, C.

The server creates one ``RomeCache`` and passes it to every edit; nothing is
cached at module level. On disk everything sits under
``<cache_dir>/rome/<model key>/`` (the model key is the model id plus a hash of
its config, dtype and a few embedding values), written atomically (a temp
file, then a rename), so a crash never leaves a half-written file that a
later start would read.

    cache = RomeCache(default_cache_dir())                        # text sampled from the model
    cache = RomeCache(cache_dir, corpus=Path("wiki.jsonl"))     # or a local corpus for C
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..loading import LoadedModel, config_sha256, default_cache_dir, safe_model_id

T = TypeVar("T")


class RomeCache:
    """Disk folder + in-memory caches of ROME's per-model statistics (thread-safe)."""

    def __init__(
        self, cache_dir: Path | str | None = None, *, corpus: Path | str | None = None, max_entries: int = 16
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.corpus = Path(corpus) if corpus is not None else None
        if self.corpus is not None and not self.corpus.is_file():
            raise FileNotFoundError(f"corpus {self.corpus} is not a file (give a .txt or .jsonl)")
        # least recently used first; hparams that key an entry (layer, mom2_*, ctx_*) come from
        # callers, so the entries are bounded: the oldest goes once there are max_entries
        self._memory: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.max_entries = max_entries
        self._lock = threading.RLock()  # guards _memory; also serialises computing one entry
        self._model_keys: dict[int, str] = {}

    @property
    def root(self) -> Path:
        return self.cache_dir / "rome"

    def model_dir(self, loaded: LoadedModel) -> Path:
        return self.root / self.model_key(loaded)

    def model_key(self, loaded: LoadedModel) -> str:
        """``<model id>-<hash>``: the hash covers the config, the dtype and a few embedding values."""
        with self._lock:
            key = self._model_keys.get(id(loaded.model))
            if key is None:
                key = model_key(loaded)
                self._model_keys[id(loaded.model)] = key
            return key

    def get_or_compute(self, key: str, compute: Callable[[], T]) -> tuple[T, bool]:
        """The in-memory value of ``key``, else ``compute()`` (stored); and whether it was cached."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key], True  # type: ignore[return-value]
            value = compute()
            self._memory[key] = value
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)
            return value, False

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()


def model_key(loaded: LoadedModel) -> str:
    """``<model id>-<hash>``: the config's hash (``loading.config_sha256``) extended with
    the dtype and a few embedding values."""
    h = config_sha256(loaded)
    h.update(str(loaded.dtype).encode())
    emb = loaded.spec.embedding(loaded.model).weight
    h.update(emb[:4, :16].detach().float().cpu().numpy().tobytes())  # tells random tiny models apart
    return f"{safe_model_id(loaded.model_id)}-{h.hexdigest()[:12]}"


def read_json(path: Path) -> object | None:
    """The JSON in ``path``; None when it is missing or unreadable (then it is recomputed)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def file_digest(path: Path) -> str:
    """A short content hash of a file (the corpus: C depends on what it holds, not its name)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


# progress(stage, done, total): e.g. ("covariance", 12_288, 50_000); called from the worker thread.
ProgressFn = Callable[[str, int, int], None]
