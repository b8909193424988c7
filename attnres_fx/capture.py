"""Capture: run torch.export (non-strict, dynamic dims) once on the example, for the graph the stream is found in.

The graph is only read (which adds, which norms, which module calls); the transformed model runs its own forward.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from . import opaque
from .errors import CaptureError

_INNER = "inner"  # attribute under which the adapter holds the user's model


@dataclass(frozen=True)
class CallKey:
    """What a captured graph is specialised to, besides shapes: mode, structure, non-tensor args."""

    training: bool
    spec: TreeSpec
    constants: tuple[Hashable, ...]


@dataclass
class CapturedGraph:
    """The exported graph, with module paths as the model names them."""

    gm: torch.fx.GraphModule
    opaque_paths: tuple[str, ...] = ()  # submodules export could not trace inside: kept opaque while capturing


def split_inputs(args: tuple, kwargs: dict[str, Any], training: bool) -> tuple[CallKey, list[Tensor]]:
    """Separate a call's tensors (graph inputs) from everything a graph is specialised to."""
    leaves, spec = tree_flatten((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, Tensor)]
    constants = tuple(_TENSOR if isinstance(x, Tensor) else _hashable(x) for x in leaves)
    return CallKey(training, spec, constants), tensors


class _TensorSlot:
    def __repr__(self) -> str:
        return "<tensor>"


_TENSOR = _TensorSlot()


def _hashable(x: Any) -> Hashable:
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


class _FlatCall(nn.Module):
    """Calls the user's model from a flat tuple of tensors, with the call's other leaves fixed."""

    def __init__(self, model: nn.Module, key: CallKey):
        super().__init__()
        setattr(self, _INNER, model)
        self.key = key

    def forward(self, *tensors: Tensor) -> Any:
        it = iter(tensors)
        leaves = [next(it) if c is _TENSOR else c for c in self.key.constants]
        args, kwargs = tree_unflatten(leaves, self.key.spec)
        return getattr(self, _INNER)(*args, **kwargs)


_MAX_OPAQUE_TYPES = 4


def capture(model: nn.Module, key: CallKey, tensors: list[Tensor]) -> CapturedGraph:
    """Export `model` for calls like the given one, with every tensor dim dynamic where it can be.

    Where export fails inside a submodule, every module of that type is kept opaque (see
    `opaque.py`) and export runs again.
    """
    adapter = _FlatCall(model, key)
    adapter.train(key.training)
    opaque_types: list[type] = []
    calls: list[opaque.OpaqueCall] = []
    while True:
        try:
            ep = _export(adapter, tensors, calls)
            break
        except _ExportFailed as failed:
            exc = failed.__cause__
            failing = _failing_submodule(model, exc)
            if failing is None or type(failing) in opaque_types or len(opaque_types) == _MAX_OPAQUE_TYPES:
                sys.stderr.write(failed.log)
                raise _capture_error(adapter, tensors, exc) from exc
            opaque_types.append(type(failing))
            modules = [m for m in model.modules() if type(m) in opaque_types]
            try:
                calls = opaque.record_calls(lambda: adapter(*tensors), model, modules)
            except CaptureError:  # the module cannot be kept opaque either: that error says why
                raise
            except Exception:  # the model does not even run the example eagerly
                raise _capture_error(adapter, tensors, exc) from exc
    _strip_prefix_from_module_stacks(ep.graph_module)
    return CapturedGraph(ep.graph_module, tuple(c.path for c in calls))


class _ExportFailed(Exception):
    def __init__(self, log: str):
        self.log = log  # what export printed (its partial graph): shown only if the failure is final


def _export(adapter: _FlatCall, tensors: list[Tensor], calls: list[opaque.OpaqueCall]) -> torch.export.ExportedProgram:
    dynamic = tuple({i: Dim.AUTO for i in range(t.dim())} for t in tensors)
    printed = io.StringIO()
    try:
        with opaque.calling_through_ops(calls), contextlib.redirect_stderr(printed):
            ep = torch.export.export(adapter, tuple(tensors), dynamic_shapes=(dynamic,), strict=False)
    except Exception as exc:  # export raises many types; all mean "cannot capture"
        raise _ExportFailed(printed.getvalue()) from exc
    sys.stderr.write(printed.getvalue())
    return ep


def _failing_submodule(model: nn.Module, exc: BaseException) -> nn.Module | None:
    """The innermost submodule of `model` whose forward was running when export failed."""
    members = {id(m) for m in model.modules()} - {id(model)}
    found = None
    for error in (exc, exc.__cause__, exc.__context__):
        tb = error.__traceback__ if error is not None else None
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if tb.tb_frame.f_code.co_name == "forward" and id(owner) in members:
                found = owner
            tb = tb.tb_next
        if found is not None:
            return found
    return None


def _strip(path: str) -> str:
    """'inner.model.layers.0' -> 'model.layers.0'; 'inner' -> ''."""
    return "" if path == _INNER else path.removeprefix(_INNER + ".")


def _strip_prefix_from_module_stacks(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (_strip(path), cls) for k, (path, cls) in stack.items()}


def _capture_error(adapter: _FlatCall, tensors: list[Tensor], exc: Exception) -> CaptureError:
    model = getattr(adapter, _INNER)
    name = type(model).__name__
    try:
        with torch.no_grad():
            adapter(*tensors)
    except Exception as run_exc:
        return CaptureError(
            f"{name} cannot run the example inputs: {type(run_exc).__name__}: {run_exc}. "
            "attnres_fx runs the model once to capture its graph; pass `example_inputs` that a plain "
            "call `model(*args)` or `model(**kwargs)` accepts."
        )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CaptureError(
        f"torch.export could not capture {name}: {type(exc).__name__}: {first_line}. "
        "attnres_fx needs a graph of the whole forward; code with data-dependent shapes or Python "
        "side effects cannot be captured. Make that part capturable (see torch.export's docs), or "
        "transform a submodule that holds the residual stream."
    )
