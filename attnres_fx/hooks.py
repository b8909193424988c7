"""Module-faithful execution: the model's own modules and forwards run at every call; hooks make its stream AttnRes.

Around each call of a layer (see `layers.py`):
- the layer's forward is handed, in place of the stream, the current block's partial sum (zeros when a block starts
  with the layer), so that the layer's own residual adds, with whatever dropout, LayerScale or multiplier stands
  between a branch and its add, compute Block AttnRes's partial sums;
- the pre-hook of each norm that reads the stream inside the layer replaces the norm's input by its sublayer's depth
  mix over [stream start, completed blocks, partial sum];
- the layer returns, in place of the stream, the mix that the next layer's first sublayer reads (the
  final aggregation after the last layer), so readers between layers (the final norm, `output_hidden_states`) see
  depth mixes.
Depth attention runs in two phases (`ops.py`): when a block opens, all its sublayers are scored against the completed
blocks at once; each sublayer then merges its partial sum with online softmax.

Activation checkpointing runs a layer's forward (and, with some wrappers, its hooks) again in the backward. What one
layer call needs is kept in a `_LayerCall`, which the recomputation finds again from the very tensors it is given;
nothing is taken from whatever call happens to be in progress then. State lives per thread and is dropped when the
last layer returns.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .errors import AttnResError
from .layers import LayerLayout
from .parameters import AttnResParameters
from .plan import Plan, PlanSite


class _Depth:
    """The stream between two sublayers: completed blocks, the current block's partial sum, and that block's phase 1
    (every sublayer of the block scored against the completed blocks, per key-norm eps)."""

    def __init__(
        self,
        site: int,
        blocks: tuple[Tensor, ...],
        inv_rms: dict[float, tuple[Tensor, ...]],
        partial: Tensor | None,
        phase1: dict[float, ops.BlockStats],
    ):
        self.site = site  # the next sublayer to run
        self.blocks = blocks
        self.inv_rms = inv_rms
        self.partial = partial
        self.phase1 = phase1


class _LayerCall:
    """One call of one layer: the depth it started from, the mix its first sublayer reads, and what its norms have
    seen so far (reset when the first norm reads, so a recomputation starts from the same place)."""

    def __init__(self, layer: int, depth: _Depth, mix_in: Tensor, handed_in: Tensor):
        self.layer = layer
        self.entry = _Depth(depth.site, depth.blocks, depth.inv_rms, None, depth.phase1)  # the partial is handed in
        self.mix_in = mix_in
        self.handed_in = weakref.ref(handed_in)  # weak: a recomputation may be handed it again, or a copy
        self.restart()

    def restart(self) -> None:
        self.depth = self.entry
        self.base: Tensor | None = None  # the stream value where a block ended inside the layer
        self.cached: tuple[int, Tensor, Tensor] | None = None  # (sublayer, norm input, its mix)


class DepthRuntime:
    """Installs and runs the hooks of one transformed model."""

    def __init__(self, plan: Plan, layers: tuple[LayerLayout, ...], params: AttnResParameters, two_phase: bool):
        self.plan, self.layers, self.params, self.two_phase = plan, layers, params, two_phase
        self.num_sites = len(plan.sites)
        groups: dict[tuple[int, float], list[PlanSite]] = defaultdict(list)
        for site in plan.parametrised:
            groups[site.block, site.eps].append(site)
        self._groups = dict(groups)  # (block, eps) -> the block's sites that share one phase 1
        self._slot = {s.index: k for sites in groups.values() for k, s in enumerate(sites)}
        self._eps = tuple(sorted({s.eps for s in plan.parametrised}))
        self._init_per_call_state()

    def _init_per_call_state(self) -> None:
        self._local = threading.local()  # .depth: after the last layer that returned; .layer: the layer running
        # eager: per layer, its calls whose autograd graph is alive (each call is held by its output's graph node),
        # for recomputations in the backward
        self._recomputable: dict[int, list[weakref.ref[_LayerCall]]] = defaultdict(list)

    def __getstate__(self) -> dict[str, Any]:
        per_call = ("_local", "_recomputable")
        return {k: v for k, v in self.__dict__.items() if k not in per_call}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_per_call_state()

    def install(self, model: nn.Module) -> None:
        for i, layer in enumerate(self.layers):
            module = model.get_submodule(layer.path)
            module.forward = _DepthForward(self, i, module)
            for path, site in layer.readers:
                model.get_submodule(path).register_forward_pre_hook(functools.partial(self._read, i, site))

    # --- hooks ---------------------------------------------------------------------------------------------------

    def enter_layer(self, i: int, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        layer = self.layers[i]
        x = _get(args, kwargs, layer.stream_arg)
        eager = not torch.compiler.is_compiling()
        if layer.first_site == 0:
            depth = self._start(x)
        else:
            depth = getattr(self._local, "depth", None)  # what the layer before left, in this call
            if (depth is None or depth.site != layer.first_site) and eager:  # a recomputation in the backward
                recomputed = self._recomputed_call(i, x, lambda c: c.mix_in)
                depth = recomputed.entry if recomputed is not None else None
            if depth is None or depth.site != layer.first_site:
                raise AttnResError(
                    f"`{layer.path}` (sublayers {layer.first_site}-{layer.end_site - 1}) was called without the layers "
                    "before it in the same call of the model; a transformed model's layers read the depth state that "
                    "the layers before them leave, so call the model as a whole."
                )
        if depth.partial is None:
            handed_in = torch.zeros_like(x)
        else:
            handed_in = depth.partial.clone() if layer.in_place else depth.partial
        call = _LayerCall(i, depth, x, handed_in)
        self._local.layer = call
        return _put(args, kwargs, layer.stream_arg, handed_in)

    def _read(self, i: int, site: int, module: nn.Module, args: tuple) -> tuple | None:
        call = getattr(self._local, "layer", None)
        if call is None or call.layer != i:  # not in a forward of this layer: a recomputation, or the norm alone
            call = self._recomputing(i, site, args[0])
            if call is None:
                return None  # the norm called on its own, outside a call of its layer: left as it is
        if site == call.entry.site:
            call.restart()
            return (call.mix_in, *args[1:])
        return (self._mix_inside(call, site, args[0], self.layers[i].in_place), *args[1:])

    def leave_layer(self, i: int, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        layer = self.layers[i]
        call = self._local.layer
        stream = output if layer.output_index is None else output[layer.output_index]
        stream = _as_shape(stream, call.mix_in.shape)
        if layer.in_place:  # the tensor the layer added to in place: what it holds now is kept as a copy
            stream = stream.clone()
        partial = stream if call.base is None else stream - call.base
        end = layer.end_site
        if end % self.plan.block_size == 0:
            depth = self._complete(call.depth, partial, end)
        else:
            depth = _Depth(end, call.depth.blocks, call.depth.inv_rms, partial, call.depth.phase1)
        mix = self._mix(depth, end, depth.partial)
        self._local.layer = None
        if end == self.num_sites:  # the final aggregation: nothing of this call stays behind
            self._local.depth = None
        else:
            self._local.depth = depth
        if not torch.compiler.is_compiling() and mix.grad_fn is not None:  # a backward may recompute this call
            mix.grad_fn.metadata.setdefault("attnres_fx", []).append(call)  # downstream of all it holds: no cycle
            self._recomputable[i].append(weakref.ref(call))
        if layer.output_index is None:
            return mix
        return type(output)((*output[: layer.output_index], mix, *output[layer.output_index + 1 :]))

    def _recomputing(self, i: int, site: int, given: Tensor) -> _LayerCall | None:
        """The call of layer i that transformers' checkpointing recomputes (it reruns the layer's forward, not these
        hooks): found by its first norm's input, then kept (weakly) for the layer's later norms."""
        if torch.compiler.is_compiling():
            return None
        if site == self.layers[i].first_site:
            call = self._recomputed_call(i, given, lambda c: c.handed_in())
            self._local.recomputing = weakref.ref(call) if call is not None else None
            return call
        ref = getattr(self._local, "recomputing", None)
        call = ref() if ref is not None else None
        return call if call is not None and call.layer == i else None

    def _recomputed_call(
        self, i: int, given: Tensor, handed: Callable[[_LayerCall], Tensor | None]
    ) -> _LayerCall | None:
        """The call of layer i that a recomputation in the backward redoes, among those whose graph is alive: the one
        that was handed the very tensor `given`, else the only one handed a tensor equal to it (a copy, under
        saved-tensor hooks or offloading). None if none was: this is no recomputation."""
        alive = [c for c in (ref() for ref in self._recomputable[i]) if c is not None]
        self._recomputable[i] = [weakref.ref(c) for c in alive]
        same = [c for c in alive if handed(c) is given]
        found = same or [c for c in alive if (t := handed(c)) is not None and _same_tensor(t, given)]
        if len(found) > 1:
            raise AttnResError(
                f"`{self.layers[i].path}` is recomputed (activation checkpointing) from copies of its inputs, and "
                f"{len(found)} of its calls that await their backward were handed equal inputs, so the depth state of "
                "the one being recomputed cannot be told. Run each backward before the next forward with the same "
                "inputs, or checkpoint without offloading."
            )
        return found[0] if found else None

    # --- depth attention -----------------------------------------------------------------------------------------

    def _mix_inside(self, call: _LayerCall, site: int, stream: Tensor, in_place: bool) -> Tensor:
        """The mix that sublayer `site` reads, given the stream value inside the layer (partial sums since the layer
        started, on top of the partial sum it was handed), in whatever view of the stream the norm reads (a layer may
        flatten it). A layer with in-place adds changes that value after the norm has read it, so a copy is kept."""
        if call.cached is not None and call.cached[0] == site and call.cached[1] is stream:
            return call.cached[2]  # a second norm reading the same sublayer input (parallel residual)
        value = _as_shape(stream, call.mix_in.shape)
        value = value.clone() if in_place else value
        partial = value if call.base is None else value - call.base
        if site % self.plan.block_size == 0:
            call.depth, call.base = self._complete(call.depth, partial, site), value
            mix = self._mix(call.depth, site, None)
        else:
            mix = self._mix(call.depth, site, partial)
        mix = _as_shape(mix, stream.shape)
        call.cached = (site, stream, mix)
        return mix

    def _start(self, x: Tensor) -> _Depth:
        return self._open(_Depth(0, (x,), self._inverse_rms({}, x), None, {}))

    def _complete(self, depth: _Depth, block: Tensor, site: int) -> _Depth:
        """The depth after `block` completed, with the next block's phase 1 computed."""
        inv_rms = self._inverse_rms(depth.inv_rms, block)
        return self._open(_Depth(site, (*depth.blocks, block), inv_rms, None, {}))

    def _inverse_rms(self, previous: dict[float, tuple[Tensor, ...]], block: Tensor) -> dict[float, tuple[Tensor, ...]]:
        if not self._uses_two_phase():
            return previous
        return {eps: (*previous.get(eps, ()), ops.inverse_rms(block, eps)) for eps in self._eps}

    def _open(self, depth: _Depth) -> _Depth:
        if self._uses_two_phase():
            block = depth.site // self.plan.block_size
            for eps in self._eps:
                sites = self._groups.get((block, eps))
                if sites:
                    queries = [self._param(s, "query") for s in sites]
                    key_weights = [self._param(s, "key_weight") for s in sites]
                    depth.phase1[eps] = ops.block_scores(
                        list(depth.blocks), list(depth.inv_rms[eps]), queries, key_weights
                    )
        return depth

    def _mix(self, depth: _Depth, site: int, partial: Tensor | None) -> Tensor:
        """The input of sublayer `site` (the final aggregation when `site` is the number of sublayers)."""
        s = self.plan.sites[site] if site < self.num_sites else self.plan.final
        if s.query is None:
            return depth.blocks[0]
        query, key_weight = self._param(s, "query"), self._param(s, "key_weight")
        if not self._uses_two_phase():
            sources = [*depth.blocks, partial] if partial is not None else list(depth.blocks)
            return ops.depth_attention(sources, query, key_weight, s.eps)
        stats, k = depth.phase1[s.eps], self._slot[site]
        if partial is None:
            return ops.completed_only(stats, k, depth.blocks[0])
        return ops.merge_partial(stats, k, partial, query, key_weight, s.eps)

    def _uses_two_phase(self) -> bool:
        return self.two_phase and not ops.is_recording()

    def _param(self, site: PlanSite, name: str) -> Tensor:
        return getattr(getattr(self.params, site.name), name)


class _DepthForward:
    """A layer's `forward`, as an instance attribute over its class's (as accelerate's hooks do): the layer reads the
    depth mix and returns the next one, so every hook on the layer, the user's or a library's (FSDP2, transformers'
    output capture), sees those, while the class's forward (with transformers' checkpointing) runs in between."""

    def __init__(self, runtime: DepthRuntime, index: int, module: nn.Module):
        self.runtime, self.index, self.module = runtime, index, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self.runtime.enter_layer(self.index, args, kwargs)
        output = type(self.module).forward(self.module, *args, **kwargs)
        return self.runtime.leave_layer(self.index, args, kwargs, output)


def _as_shape(x: Tensor, shape: torch.Size) -> Tensor:
    """`x` viewed in `shape` (a layer may flatten the stream); no op at all in the usual case, where it has it."""
    return x if x.shape == shape else x.reshape(shape)


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _get(args: tuple, kwargs: dict[str, Any], where: int | str) -> Any:
    return args[where] if isinstance(where, int) else kwargs[where]


def _put(args: tuple, kwargs: dict[str, Any], where: int | str, value: Tensor) -> tuple[tuple, dict[str, Any]]:
    if isinstance(where, int):
        return (*args[:where], value, *args[where + 1 :]), kwargs
    return args, {**kwargs, where: value}
