"""The swap gate and the live versions, on tiny models: pinned passes equal the version's own weights
(exactly, or within float32 rounding on the low-rank path), the cache keeps its bound, and a swap
lands only between forward passes."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rome_engine.gate import SwapGate
from rome_engine.layers import LayerWeights
from rome_engine.versions import LiveVersions
from tests.conftest import make_tiny
from tests.rome_engine.test_edit_store import random_layer

PROMPT_IDS = torch.tensor([[5, 17, 300, 42, 7, 1000, 12]])


def logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=PROMPT_IDS).logits[0, -1]


class History:
    """Versions 0..3 of random layers on a private tiny model, served by a LiveVersions."""

    def __init__(self, family: str, tokenizer, cache_bytes: int = 64 << 20) -> None:
        self.loaded = make_tiny(family, tokenizer)
        self.weights = LayerWeights(self.loaded)
        a, b, c = (random_layer(self.loaded, self.weights, i % 3 + 1, seed=i, version=i + 1) for i in range(3))
        self.at = {0: [], 1: [a], 2: [a, b], 3: [a, b, c]}
        self.logits = {}
        for v, layers in self.at.items():  # each version's output with its own weights materialized
            self.weights.materialize(layers)
            self.logits[v] = logits(self.loaded)
        self.weights.materialize([])
        self.versions = LiveVersions(self.loaded, self.weights, layers_at=self.at.__getitem__, cache_bytes=cache_bytes)

    def pinned(self, version: int) -> torch.Tensor:
        with self.versions.pinned(version):
            return logits(self.loaded)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pinned_passes_equal_each_version(family, tokenizer) -> None:
    h = History(family, tokenizer)
    assert not torch.equal(h.logits[0], h.logits[3])
    h.versions.swap(3, h.at[3])
    assert torch.equal(logits(h.loaded), h.logits[3])  # unpinned: the head, in place
    for v in (0, 1, 2, 3):
        assert torch.equal(h.pinned(v), h.logits[v]), v  # exact: the version's own matrices
    assert h.versions.low_rank_terms == 0
    rows = torch.cat([PROMPT_IDS, PROMPT_IDS, PROMPT_IDS])
    with torch.no_grad(), h.versions.rows([0, 3, 1]):
        mixed = h.loaded.model(input_ids=rows).logits[:, -1]
    for row, v in enumerate((0, 3, 1)):
        torch.testing.assert_close(mixed[row], h.logits[v], rtol=0, atol=1e-5)


def test_low_rank_side_path_when_over_the_bound(tokenizer) -> None:
    h = History("llama", tokenizer, cache_bytes=1)  # no version's matrices fit: the float32 side path
    h.versions.swap(3, h.at[3])
    for v in (0, 1, 2):
        torch.testing.assert_close(h.pinned(v), h.logits[v], rtol=0, atol=1e-4)
    assert h.versions.low_rank_terms == 3 and h.versions.exact_terms == 0
    assert h.versions.stats.bytes == 0  # nothing kept: each is over the bound


def test_the_cache_keeps_its_bound_and_holds_nothing_for_head_traffic(tokenizer) -> None:
    h = History("llama", tokenizer)
    one = h.loaded.spec.as_out_in(h.weights.parameter(h.at[1][0].factors[0].param))
    matrix_bytes = one.numel() * one.element_size()
    h.versions.cache_bytes = 2 * matrix_bytes
    h.versions.swap(3, h.at[3])
    for _ in range(3):
        logits(h.loaded)
    assert h.versions.stats.bytes == 0 and h.versions.stats.entries == 0
    for v in (0, 1, 2, 0, 1, 2):
        h.pinned(v)
        assert h.versions.stats.bytes <= h.versions.cache_bytes
    assert h.versions.stats.misses >= 3
    h.versions.swap(2, h.at[2])  # the old head's entries go
    assert all(key[1] == 2 for key in h.versions._cache)


def test_a_swap_keeps_the_old_head_for_requests_on_it(tokenizer) -> None:
    h = History("gpt2", tokenizer)
    h.versions.swap(1, h.at[1])
    with h.versions.using(1):
        h.versions.swap(3, h.at[3])
        assert (1, 3) in h.versions._cache  # copied before the swap, no rebuild
        assert torch.equal(h.pinned(1), h.logits[1])


def test_the_swap_waits_for_the_pass_in_flight_and_new_passes_wait_for_it() -> None:
    gate = SwapGate()
    order: list[str] = []
    in_pass, swap_wanted = threading.Event(), threading.Event()

    def forward_pass() -> None:
        with gate.reading():
            in_pass.set()
            swap_wanted.wait(5)
            time.sleep(0.1)
            order.append("pass ends")

    def swap() -> None:
        swap_wanted.set()
        with gate.writing():
            order.append("swap")

    def late_pass() -> None:
        with gate.reading():
            order.append("late pass")

    first = threading.Thread(target=forward_pass)
    first.start()
    assert in_pass.wait(5)
    writer = threading.Thread(target=swap)
    writer.start()
    assert swap_wanted.wait(5)
    while not gate._writers_waiting:
        time.sleep(0.001)
    late = threading.Thread(target=late_pass)
    late.start()
    for t in (first, writer, late):
        t.join(5)
    assert order == ["pass ends", "swap", "late pass"]
    assert gate.last_wait_seconds >= 0.05


def test_a_pass_cannot_swap_and_leases_are_reentrant() -> None:
    gate = SwapGate()
    with gate.reading(), gate.reading():
        assert gate.readers == 1
        with pytest.raises(RuntimeError, match="cannot swap"), gate.writing():
            pass
    assert gate.readers == 0
    with gate.writing():
        pass
