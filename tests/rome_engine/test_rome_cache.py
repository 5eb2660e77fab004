"""The in-memory cache of ROME statistics is bounded (callers choose the hparams that key it)."""

from __future__ import annotations

from rome_engine.rome.cache import RomeCache


def test_the_memory_cache_keeps_the_most_recently_used_entries(tmp_path) -> None:
    cache = RomeCache(tmp_path, max_entries=2)
    computed: list[str] = []

    def get(key: str) -> bool:
        return cache.get_or_compute(key, lambda: computed.append(key) or key)[1]

    assert (get("a"), get("b"), get("a")) == (False, False, True)
    assert get("c") is False  # evicts b, the least recently used
    assert (get("a"), get("b")) == (True, False)
    assert computed == ["a", "b", "c", "b"]
