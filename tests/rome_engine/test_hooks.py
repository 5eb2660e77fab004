"""Hooks act only on the thread that installed them, and always remove themselves."""

from __future__ import annotations

import threading

import torch

from rome_engine.hooks import Trace, replay, run_until_stopped, stop_after


def test_capture_and_edit_then_removed(tiny_llama) -> None:
    m, spec = tiny_llama.model, tiny_llama.spec
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        clean = m(ids).logits
    name = spec.mlp_name(1)
    with Trace(m, [name], capture_input=True) as tr, torch.no_grad():
        m(ids)
    assert tr[name].output.shape == (1, 4, 64)
    assert tr[name].input.shape == (1, 4, 64)

    def zero(_n: str, out: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(out)

    with Trace(m, [name], edit_output=zero), torch.no_grad():
        patched = m(ids).logits
    assert not torch.allclose(patched, clean)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, clean)  # the hook is gone


def test_other_threads_are_not_patched(tiny_llama) -> None:
    m, spec = tiny_llama.model, tiny_llama.spec
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        clean = m(ids).logits
    seen: dict[str, torch.Tensor] = {}

    def other() -> None:
        with torch.no_grad():
            seen["logits"] = m(ids).logits
            run_until_stopped(m, input_ids=ids)  # not stopped: the stop hook belongs to the main thread

    def zero(_n: str, out: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(out)

    with Trace(m, [spec.mlp_name(1)], edit_output=zero), stop_after(m, spec.block_name(0)):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert torch.equal(seen["logits"], clean)


def test_replay_skips_blocks_on_this_thread_only(tiny_llama) -> None:
    m, spec = tiny_llama.model, tiny_llama.spec
    ids = torch.tensor([[5, 6, 7, 8]])
    other_ids = torch.tensor([[9, 10, 11, 12]])
    with torch.no_grad():
        clean = m(ids).logits
        other_clean = m(other_ids).logits
    below = spec.block_name(1)
    with torch.no_grad(), Trace(m, [below]) as tr:
        m(ids)
    ran: list[str] = []
    hooks = [
        m.get_submodule(spec.mlp_name(i)).register_forward_hook(lambda *_a, i=i: ran.append(f"mlp{i}"))
        for i in range(spec.num_layers(m))
    ]
    seen: dict[str, torch.Tensor] = {}

    def other() -> None:
        with torch.no_grad():
            seen["logits"] = m(other_ids).logits

    try:
        with replay(m, {spec.block_name(0): tr[below].raw_output, below: tr[below].raw_output}), torch.no_grad():
            replayed = m(ids).logits
            assert ran == ["mlp2", "mlp3"]  # blocks 0 and 1 did not run on this thread
            t = threading.Thread(target=other)
            t.start()
            t.join()
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(replayed, clean)
    assert torch.equal(seen["logits"], other_clean)  # the other thread ran every block on its own input
    with torch.no_grad():
        assert torch.equal(m(other_ids).logits, other_clean)  # and nothing is replayed afterwards
