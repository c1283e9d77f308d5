"""The second perturbed pass reuses what the first computed below the perturbed parameters.

The passes at θ + εu and θ - εu differ only downstream of the parameters that are perturbed. When the meta-gradient
goes through the top of a network only (``SAMAConfig.meta_gradient_params``), the layers below compute the same
outputs in both passes: the first pass records them, the second returns the records instead of running those layers.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_map_only


__all__ = ["PrefixCache"]


class _Call(NamedTuple):
    reusable: bool
    output: Any = None
    draws: int = 0  # random draws the call made (recorded by the pass's draw replay, if any)
    rng: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # RNG states right after the call


class PrefixCache:
    """Record, in the first pass of a finite difference, the calls of ``model``'s submodules that cannot depend on
    the perturbed parameters, and return the records in the second pass instead of running them.

    A call is reused when its module holds none of the ``perturbed`` parameters and the call ends before any module
    that holds one starts, within the same forward of ``model``. This assumes that each parameter is used by the
    module that holds it (as in torch and transformers layers). Random draws inside a reused call (dropout) are taken
    out of the second pass's replay, or the RNG is set to where the first pass left it, so that the rest of the
    network sees the same random stream in both passes.
    """

    def __init__(self, model: nn.Module, perturbed: Sequence[torch.Tensor]):
        ids = {id(p) for p in perturbed}
        self.model = model
        self.holders = [m for m in model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]
        clean = {id(m) for m in model.modules() if not any(id(p) in ids for p in m.parameters())}
        # the largest modules free of perturbed parameters: their calls are the ones worth skipping
        tops = {id(c): c for m in model.modules() if id(m) not in clean for c in m.children() if id(c) in clean}
        self.candidates = list(tops.values())
        self.calls: dict[int, list[_Call]] = {}

    @property
    def reused_calls(self) -> int:
        """How many calls the last recording can return without running them."""
        return sum(call.reusable for calls in self.calls.values() for call in calls)

    @contextlib.contextmanager
    def recording(self, draws: Any = None, devices: Sequence[int] | None = None) -> Iterator[None]:
        """Record the calls of one pass; ``draws``: the pass's random-draw recorder (``core._RandomDraws``);
        ``devices``: the CUDA devices whose RNG state to save (None: leave the RNG alone)."""
        self.calls = defaultdict(list)
        state = {"dirty": False}
        starts: dict[int, list[tuple[bool, int]]] = defaultdict(list)

        def new_forward(module, args):
            state["dirty"] = False

        def holder_starts(module, args):
            state["dirty"] = True

        def call_starts(module, args):
            starts[id(module)].append((state["dirty"], len(draws.draws) if draws is not None else 0))

        def call_ends(module, args, output):
            was_dirty, first_draw = starts[id(module)].pop()
            if was_dirty or state["dirty"]:
                self.calls[id(module)].append(_Call(False))
                return
            rng = None
            if devices is not None:
                rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])
            made = len(draws.draws) - first_draw if draws is not None else 0
            self.calls[id(module)].append(_Call(True, tree_map_only(torch.Tensor, torch.clone, output), made, rng))

        handles = [self.model.register_forward_pre_hook(new_forward)]
        handles += [m.register_forward_pre_hook(holder_starts) for m in self.holders]
        for m in self.candidates:
            handles.append(m.register_forward_pre_hook(call_starts))
            handles.append(m.register_forward_hook(call_ends, prepend=True))  # before hooks that change the output
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def replaying(self, draws: Any = None, devices: Sequence[int] | None = None) -> Iterator[None]:
        """Run a pass that returns the recorded reusable calls instead of running them (in the recorded order)."""
        pending = {key: list(reversed(calls)) for key, calls in self.calls.items()}
        patched: list[tuple[nn.Module, Any]] = []

        def replacement(module: nn.Module, original: Any):
            def forward(*args, **kwargs):
                calls = pending.get(id(module))
                call = calls.pop() if calls else _Call(False)
                if not call.reusable:
                    return original(*args, **kwargs)
                if draws is not None and call.draws:
                    draws.skip(call.draws)
                if devices is not None and call.rng is not None:
                    torch.set_rng_state(call.rng[0])
                    for device, state in zip(devices, call.rng[1]):
                        torch.cuda.set_rng_state(state, device)
                return call.output

            return forward

        for m in self.candidates:
            if self.calls.get(id(m)):
                patched.append((m, m.__dict__.get("forward")))
                m.forward = replacement(m, m.forward)
        try:
            yield
        finally:
            for m, own in patched:
                if own is None:
                    del m.forward
                else:
                    m.forward = own
