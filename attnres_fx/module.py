"""The module the user gets: the original's submodules plus `attnres`, run through rewritten graphs.

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

from .capture import CallKey, CapturedGraph, split_inputs, takes_use_cache, with_capture_defaults
from .errors import AttnResError, UnsupportedMethodError
from .parameters import AttnResParameters
from .plan import PARAMETER_PREFIX, Plan

# (original model, call key, tensors, plan, optimized) -> the rewritten graph for that call
GraphBuilder = Callable[[nn.Module, CallKey, list[Tensor], Plan, bool], CapturedGraph]


class AttnResModel(nn.Module):
    """A transformed model. Use it exactly like the original; see `attnres_fx.transform`."""

    def __init__(self, original: nn.Module, plan: Plan, dim: int, device: torch.device, dtype: torch.dtype, build: GraphBuilder):
        super().__init__()
        if PARAMETER_PREFIX in original._modules or hasattr(original, PARAMETER_PREFIX):
            raise AttnResError(
                f"{type(original).__name__} already has an attribute `{PARAMETER_PREFIX}`, the name under "
                "which attnres_fx registers its parameters; rename that attribute before transforming."
            )
        self._modules.update(original._modules)
        self._parameters.update(original._parameters)
        self._buffers.update(original._buffers)
        self._non_persistent_buffers_set |= original._non_persistent_buffers_set
        self.training = original.training
        self.attnres = AttnResParameters(plan, dim, device, dtype)
        object.__setattr__(self, "_attnres_original", original)
        object.__setattr__(self, "_attnres_build", build)
        self._attnres_use_cache_arg = takes_use_cache(original)  # once, not on the hot path
        self.attnres_plan = plan
        self._attnres_graphs: dict[tuple[CallKey, bool], list[CapturedGraph]] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.run_graph(args, kwargs, optimized=True)

    def run_graph(self, args: tuple, kwargs: dict[str, Any], optimized: bool) -> Any:
        """Run the rewritten graph for this call (the optimised one, or the plain rewrite)."""
        kwargs = with_capture_defaults(kwargs, self._attnres_use_cache_arg)
        key, tensors = split_inputs(args, kwargs, self.training)
        for graph in self._attnres_graphs.get((key, optimized), ()):
            if graph.admits(tensors):
                return graph.run(self, tensors)
        return self._capture(key, tensors, optimized).run(self, tensors)

    @torch.compiler.disable
    def _capture(self, key: CallKey, tensors: list[Tensor], optimized: bool) -> CapturedGraph:
        graph = self._attnres_build(self._attnres_original, key, tensors, self.attnres_plan, optimized)
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
                f"`{type(original).__name__}.{name}` is a method of the original model; calling it would "
                "run the original forward without AttnRes, so the transformed model does not expose it. "
                "Call the transformed model itself (KV-cache generation is not supported yet)."
            )
        return value
