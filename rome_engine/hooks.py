"""Forward hooks as context managers that always remove themselves.

PyTorch hooks are global state on a module: every forward pass through it,
from any thread, runs them. The server runs generation streams on worker
threads while a trace or an edit patches the same modules, so each hook here
acts only on forward passes of the thread that installed it and lets every
other thread's pass through untouched.

    with Trace(model, ["model.layers.3.mlp"]) as tr:
        model(input_ids)
    h = tr["model.layers.3.mlp"].output     # (B, T, D)

    def patch(name, output):                # return a new output, or None
        output[:, 2] += delta
    with Trace(model, [name], edit_output=patch):
        model(input_ids)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .arch import get_module

EditFn = Callable[[str, torch.Tensor], torch.Tensor | None]


@dataclass
class Captured:
    input: torch.Tensor | None = None  # first positional input, (B, T, D_in)
    output: torch.Tensor | None = None  # first element of the output, (B, T, D_out)
    raw_output: object = None  # the module's output as returned (a tensor or a tuple), for ``replay``


def first_tensor(x: object) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x  # blocks and attention return tuples


def replace_first(x: object, value: torch.Tensor) -> object:
    return (value, *x[1:]) if isinstance(x, tuple) else value


class Trace:
    """Capture (and optionally edit) the inputs/outputs of named modules."""

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        capture_input: bool = False,
        capture_output: bool = True,
        detach: bool = True,
        edit_output: EditFn | None = None,
        edit_input: EditFn | None = None,
    ) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._owner = threading.get_ident()
        self.captured: dict[str, Captured] = {}
        for name in dict.fromkeys(names):
            module = get_module(model, name)
            self.captured[name] = Captured()
            if capture_input or edit_input is not None:
                self._handles.append(
                    module.register_forward_pre_hook(self._pre_hook(name, capture_input, detach, edit_input))
                )
            if capture_output or edit_output is not None:
                self._handles.append(
                    module.register_forward_hook(self._post_hook(name, capture_output, detach, edit_output))
                )

    def _pre_hook(self, name: str, capture: bool, detach: bool, edit: EditFn | None):
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            if threading.get_ident() != self._owner:
                return None
            x = args[0]
            if edit is not None:
                new = edit(name, x)
                if new is not None:
                    x = new
                    args = (new, *args[1:])
            if capture:
                self.captured[name].input = x.detach() if detach else x
            return args

        return hook

    def _post_hook(self, name: str, capture: bool, detach: bool, edit: EditFn | None):
        def hook(_module: nn.Module, _args: tuple, output: object) -> object:
            if threading.get_ident() != self._owner:
                return output
            y = first_tensor(output)
            if edit is not None:
                new = edit(name, y)
                if new is not None:
                    y = new
                    output = replace_first(output, new)
            if capture:
                self.captured[name].output = y.detach() if detach else y
                self.captured[name].raw_output = output
            return output

        return hook

    def __getitem__(self, name: str) -> Captured:
        return self.captured[name]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (see ``stop_after``)."""


class stop_after:  # used like a function in a with statement
    """End forward passes right after module ``name`` has run.

        with Trace(model, [k], capture_input=True) as tr, stop_after(model, k):
            run_until_stopped(model, ids)
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        owner = threading.get_ident()

        def hook(*_: object) -> None:
            if threading.get_ident() == owner:
                raise StopForward

        self._handle = get_module(model, name).register_forward_hook(hook)

    def __enter__(self) -> stop_after:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def run_until_stopped(model: nn.Module, **inputs: torch.Tensor) -> None:
    """A forward pass that a ``stop_after`` hook may cut short."""
    with contextlib.suppress(StopForward):
        model(**inputs)


# -- replay: skip modules on one thread ---------------------------------------

_replay = threading.local()  # .table: {id(module): output} of the current thread


def _install_dispatch(module: nn.Module) -> None:
    """Give ``module`` a forward that returns this thread's replayed output, if any.

    Installed once per module and left in place: on a thread with nothing to
    replay it costs one thread-local lookup and runs the original forward.
    """
    if getattr(module, "_romegw_replay_dispatch", False):
        return
    original = module.forward
    key = id(module)

    def forward(*args: object, **kwargs: object) -> object:
        table = getattr(_replay, "table", None)
        if table and key in table:
            return table[key]
        return original(*args, **kwargs)

    module.forward = forward
    module._romegw_replay_dispatch = True


@contextlib.contextmanager
def replay(model: nn.Module, outputs: dict[str, object]) -> Iterator[None]:
    """On this thread, each named module returns the given output without running.

    Other threads' forward passes run the modules as usual. Used to skip the
    blocks below an edited layer, whose outputs do not change between the
    optimisation steps of ROME's v*:

        with Trace(model, [lower], detach=True) as tr:
            model(...)                                   # once
        with replay(model, {name: tr[lower].raw_output for name in lower_blocks}):
            model(...)                                   # each step: lower blocks cost nothing
    """
    table: dict[int, object] = {}
    for name, out in outputs.items():
        module = get_module(model, name)
        _install_dispatch(module)
        table[id(module)] = out
    before = getattr(_replay, "table", None)
    _replay.table = {**(before or {}), **table}
    try:
        yield
    finally:
        _replay.table = before
