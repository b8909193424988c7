"""The fallback module: the original's submodules plus `attnres`, run through rewritten graphs.

Used where the stream does not cross module boundaries in a way module hooks can follow (see `layers.py`).

State dict keys are the original's, unchanged, plus `attnres.*`. A graph is captured per call
structure and mode (train / eval, which keywords were given), lazily, so `.train()` / `.eval()`
and optional keywords behave as in the original; batch and sequence dims are dynamic.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import hf
from .capture import CallKey, CapturedGraph, split_inputs
from .errors import UnsupportedMethodError
from .parameters import AttnResParameters
from .plan import Plan

# (original model, call key, tensors, plan, optimized) -> the rewritten graph for that call
GraphBuilder = Callable[[nn.Module, CallKey, list[Tensor], Plan, bool], CapturedGraph]


class AttnResModel(nn.Module):
    """A transformed model. Use it exactly like the original; see `attnres_fx.transform`."""

    def __init__(self, original: nn.Module, params: AttnResParameters, build: GraphBuilder):
        super().__init__()
        self._modules.update(original._modules)
        self._parameters.update(original._parameters)
        self._buffers.update(original._buffers)
        self._non_persistent_buffers_set |= original._non_persistent_buffers_set
        self.training = original.training
        self.attnres = params
        object.__setattr__(self, "_attnres_original", original)
        object.__setattr__(self, "_attnres_build", build)
        self._attnres_keeps_cache = hf.keeps_kv_cache(original)  # once, not on the hot path
        self._attnres_graphs: dict[tuple[CallKey, bool], list[CapturedGraph]] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.run_graph(args, kwargs, optimized=True)

    def run_graph(self, args: tuple, kwargs: dict[str, Any], optimized: bool) -> Any:
        """Run the rewritten graph for this call (the optimised one, or the plain rewrite)."""
        kwargs = hf.without_kv_cache(kwargs, self._attnres_keeps_cache)
        key, tensors = split_inputs(args, kwargs, self.training)
        for graph in self._attnres_graphs.get((key, optimized), ()):
            if graph.admits(tensors):
                return graph.run(self, tensors)
        return self._capture(key, tensors, optimized).run(self, tensors)

    @torch.compiler.disable
    def _capture(self, key: CallKey, tensors: list[Tensor], optimized: bool) -> CapturedGraph:
        graph = self._attnres_build(self._attnres_original, key, tensors, self.attnres.plan, optimized)
        self.add_graph(key, graph, optimized)
        return graph

    def add_graph(self, key: CallKey, graph: CapturedGraph, optimized: bool) -> None:
        """Keep a rewritten graph for calls with this key (and shapes it admits)."""
        self._attnres_graphs.setdefault((key, optimized), []).append(graph)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        original = self.__dict__.get("_attnres_original")
        if original is None or name.startswith("__"):
            raise AttributeError(name)
        value = getattr(original, name)
        if inspect.ismethod(value):
            raise UnsupportedMethodError(
                f"`{type(original).__name__}.{name}` is a method of the original model. This model's stream could not "
                f"be followed through its modules ({self.attnres.plan.execution}), so it runs as a replayed graph, "
                "and the method would run the original forward without AttnRes: it is not exposed. Call the "
                "transformed model itself."
            )
        return value
