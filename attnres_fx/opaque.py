"""Opaque submodules: code no capture can trace, called behind a custom-op boundary while capturing.

A MoE block that loops over experts with `torch.where` / `nonzero` has data-dependent shapes, and
export fails inside it. Capture then calls every module of that type through
`attnres_fx::opaque_forward`: a custom op whose implementation is the module's own eager forward
(`functional_call`, with its parameters passed in, so the graph still names them). The module's
internals stay out of the graph, and the residual stream around it is found as usual. The captured graph
is only read: at run time the module runs as itself.

Output shapes are read off one eager call: each output either keeps the first input's leading dims,
flattens them into one, or is fixed (a scalar, for instance).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from .errors import CaptureError


class _Slot:
    def __repr__(self) -> str:
        return "<tensor>"


_TENSOR = _Slot()


@dataclass(frozen=True)
class OutputShape:
    """How one output's shape follows the first tensor input `x`: `x.shape[:-1] + tail`
    ("leading"), `(x.shape[:-1].numel(),) + tail` ("flat"), or `tail` alone ("fixed")."""

    kind: str
    tail: tuple[int, ...]
    dtype: torch.dtype

    def empty(self, x: Tensor) -> Tensor:
        lead = {"leading": tuple(x.shape[:-1]), "flat": (math.prod(x.shape[:-1]),), "fixed": ()}[self.kind]
        return x.new_empty((*lead, *self.tail), dtype=self.dtype)


@dataclass
class OpaqueCall:
    """One opaque module and the call structure recorded for it."""

    path: str
    module: nn.Module
    state_names: list[str]  # parameters then buffers: the order of the op's `state` argument
    in_spec: TreeSpec
    in_leaves: tuple[Any, ...]  # non-tensor leaves, `_TENSOR` where a tensor goes
    out_spec: TreeSpec
    out_shapes: list[OutputShape]
    handle: int = -1

    def run(self, inputs: list[Tensor], state: list[Tensor]) -> list[Tensor]:
        it = iter(inputs)
        args, kwargs = tree_unflatten([next(it) if c is _TENSOR else c for c in self.in_leaves], self.in_spec)
        out = torch.func.functional_call(self.module, dict(zip(self.state_names, state)), args, kwargs, strict=True)
        flat, spec = tree_flatten(out)
        if spec != self.out_spec:
            raise CaptureError(
                f"opaque submodule `{self.path}` returned a different structure than when it was recorded."
            )
        return flat

    def state(self) -> list[Tensor]:
        named = dict(itertools.chain(self.module.named_parameters(), self.module.named_buffers()))
        return [named[n] for n in self.state_names]


_CALLS: weakref.WeakValueDictionary[int, OpaqueCall] = weakref.WeakValueDictionary()
_next_handle = itertools.count()


@torch.library.custom_op("attnres_fx::opaque_forward", mutates_args=())
def opaque_forward(handle: int, inputs: list[Tensor], state: list[Tensor]) -> list[Tensor]:
    outs = _CALLS[handle].run(inputs, state)
    owned = {t.untyped_storage().data_ptr() for t in (*inputs, *state)}
    return [o.clone() if o.untyped_storage().data_ptr() in owned else o for o in outs]  # ops may not alias


@opaque_forward.register_fake
def _(handle: int, inputs: list[Tensor], state: list[Tensor]) -> list[Tensor]:
    return [shape.empty(inputs[0]) for shape in _CALLS[handle].out_shapes]


def record_calls(run_example: Any, root: nn.Module, modules: list[nn.Module]) -> list[OpaqueCall]:
    """Run the model once eagerly and record how each of `modules` is called and what it returns."""
    paths = {id(m): p for p, m in root.named_modules()}
    calls: dict[int, OpaqueCall] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if id(module) not in calls:
            calls[id(module)] = _record(paths[id(module)], module, args, kwargs, output)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            run_example()
    finally:
        for h in handles:
            h.remove()
    for call in calls.values():
        call.handle = next(_next_handle)
        _CALLS[call.handle] = call
    return list(calls.values())


def _record(path: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> OpaqueCall:
    leaves, in_spec = tree_flatten((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, Tensor)]
    outs, out_spec = tree_flatten(output)
    if not tensors or not all(isinstance(o, Tensor) for o in outs):
        raise CaptureError(
            f"`{path}` ({type(module).__name__}) cannot be captured (export failed inside it), and it cannot be kept "
            "opaque either: it must take at least one tensor and return only tensors."
        )
    names = [*(n for n, _ in module.named_parameters()), *(n for n, _ in module.named_buffers())]
    return OpaqueCall(
        path=path,
        module=module,
        state_names=names,
        in_spec=in_spec,
        in_leaves=tuple(_TENSOR if isinstance(x, Tensor) else x for x in leaves),
        out_spec=out_spec,
        out_shapes=[_output_shape(path, tensors[0], o) for o in outs],
    )


def _output_shape(path: str, x: Tensor, out: Tensor) -> OutputShape:
    lead = tuple(x.shape[:-1])
    if out.dim() >= len(lead) and tuple(out.shape[: len(lead)]) == lead:
        return OutputShape("leading", tuple(out.shape[len(lead) :]), out.dtype)
    if out.dim() >= 1 and out.shape[0] == math.prod(lead):
        return OutputShape("flat", tuple(out.shape[1:]), out.dtype)
    if out.dim() == 0:
        return OutputShape("fixed", (), out.dtype)
    raise CaptureError(
        f"`{path}` cannot be captured (export failed inside it) and cannot be kept opaque: one of its outputs has "
        f"shape {tuple(out.shape)}, which neither keeps nor flattens the leading dims {lead} of its first input."
    )


@contextlib.contextmanager
def calling_through_ops(calls: list[OpaqueCall]) -> Iterator[None]:
    """While capturing, route each recorded module's forward through `opaque_forward`."""
    for call in calls:
        call.module.forward = _opaque_forward_method(call)  # instance attribute shadows the class's
    try:
        yield
    finally:
        for call in calls:
            del call.module.forward


def _opaque_forward_method(call: OpaqueCall) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        structure = tuple(_TENSOR if isinstance(x, Tensor) else x for x in leaves)
        if spec != call.in_spec or structure != call.in_leaves:
            raise CaptureError(
                f"opaque submodule `{call.path}` is called with other arguments than when it was recorded."
            )
        outs = torch.ops.attnres_fx.opaque_forward(
            call.handle, [x for x in leaves if isinstance(x, Tensor)], call.state()
        )
        return tree_unflatten(outs, call.out_spec)

    return forward
