"""Capture: run torch.export (non-strict, dynamic dims) and keep the lifted graph.

The lifted graph takes parameters and buffers as inputs. The transformed module passes its own
current tensors at every call, so `.to()`, `load_state_dict(assign=True)`, meta-device
materialisation and parameter sharding never leave the graph holding stale copies.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from collections.abc import Hashable
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind
from torch._export.utils import _check_input_constraints_for_graph
from torch.utils._pytree import SequenceKey, TreeSpec, tree_flatten, tree_unflatten

from . import opaque
from .errors import CaptureError

_INNER = "inner"  # attribute under which the adapter holds the user's model


@dataclass(frozen=True)
class CallKey:
    """What a captured graph is specialised to, besides shapes: mode, structure, non-tensor args."""

    training: bool
    spec: TreeSpec
    constants: tuple[Hashable, ...]


@dataclass(frozen=True)
class TensorGuard:
    """The device and dtype that a captured graph requires of one tensor input (shapes: see `admits`).

    The device matters because export bakes it into the graph (`arange(device=...)`, device-specific
    code paths): a model moved to another device, or built on meta and materialised, is re-captured.
    """

    device: torch.device
    dtype: torch.dtype

    def admits(self, t: Tensor) -> bool:
        return t.device == self.device and t.dtype == self.dtype


@dataclass
class Binding:
    """Where one graph input comes from at call time."""

    kind: str  # "param", "buffer", "constant" or "input"
    key: str | int  # FQN in the owning module, constant name, or index into the tensor inputs


@dataclass
class CapturedGraph:
    """A lifted export graph plus what is needed to call it with a module's current state."""

    gm: torch.fx.GraphModule
    bindings: list[Binding]
    guards: list[TensorGuard]
    input_nodes: list[torch.fx.Node]  # the user inputs' placeholders: their shapes, with export's symbols
    range_constraints: dict[Any, Any]  # export's ranges of those symbols
    shape_guards: CodeType  # export's other guards on the inputs' sizes (`seq % 8 == 0`), as one expression
    out_spec: TreeSpec
    output_kinds: list[tuple[str, str | int | None]]  # ("output", None) / ("buffer", fqn) / ("input", idx)
    constants: dict[str, Tensor] = field(default_factory=dict)
    opaque: list[opaque.OpaqueCall] = field(default_factory=list)  # kept alive as long as the graph calls them

    @property
    def opaque_paths(self) -> tuple[str, ...]:
        return tuple(c.path for c in self.opaque)

    def admits(self, tensors: list[Tensor]) -> bool:
        """Whether these inputs satisfy every guard export derived: device, dtype, static dims (also those held as
        constant symbols), the symbols' ranges and relations between dims (`4*s0`: a multiple of 4)."""
        if len(tensors) != len(self.guards) or not all(g.admits(t) for g, t in zip(self.guards, tensors)):
            return False
        try:
            args = [((SequenceKey(i),), t) for i, t in enumerate(tensors)]
            _check_input_constraints_for_graph(self.input_nodes, args, self.range_constraints)
        except RuntimeError:
            return False
        return bool(eval(self.shape_guards, {"torch": torch, "math": math}, {"L": {"tensors": tensors}}))

    def add_parameter_input(self, name: str, fqn: str) -> torch.fx.Node:
        """Add a graph input bound to parameter `fqn` of the owning module."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        with self.gm.graph.inserting_after(placeholders[-1]):
            node = self.gm.graph.placeholder(name)
        self.bindings.append(Binding("param", fqn))
        return node

    def run(self, owner: nn.Module, tensors: list[Tensor]) -> Any:
        """Call the graph with `owner`'s current parameters and buffers and the tensor inputs."""
        outs = self.gm(*[self._resolve(b, owner, tensors) for b in self.bindings])
        user_outs = []
        for (kind, key), value in zip(self.output_kinds, outs):
            if kind == "output":
                user_outs.append(value)
            else:  # a mutation the original forward made in place: make it again
                target = owner.get_buffer(key) if kind == "buffer" else tensors[key]
                with torch.no_grad():
                    target.copy_(value)
        return tree_unflatten(user_outs, self.out_spec)

    def _resolve(self, b: Binding, owner: nn.Module, tensors: list[Tensor]) -> Tensor:
        if b.kind == "input":
            return tensors[b.key]
        if b.kind == "param":
            return owner.get_parameter(b.key)
        if b.kind == "buffer":
            return owner.get_buffer(b.key)
        return self.constants[b.key]


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
    graph = _captured_graph(ep)
    graph.opaque = calls
    return graph


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


def _captured_graph(ep: torch.export.ExportedProgram) -> CapturedGraph:
    sig = ep.graph_signature
    user_index = {}
    bindings = []
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            user_index[spec.arg.name] = len(user_index)
            bindings.append(Binding("input", user_index[spec.arg.name]))
        elif spec.kind == InputKind.PARAMETER:
            bindings.append(Binding("param", _strip(spec.target)))
        elif spec.kind == InputKind.BUFFER:
            bindings.append(Binding("buffer", _strip(spec.target)))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            bindings.append(Binding("constant", spec.target))
        else:
            raise CaptureError(f"export produced an input of kind {spec.kind.name}, which attnres_fx does not support")
    output_kinds: list[tuple[str, str | int | None]] = []
    for spec in sig.output_specs:
        if spec.kind == OutputKind.USER_OUTPUT:
            output_kinds.append(("output", None))
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            output_kinds.append(("buffer", _strip(spec.target)))
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            output_kinds.append(("input", user_index[spec.target]))
        else:
            raise CaptureError(f"export produced an output of kind {spec.kind.name}, which attnres_fx does not support")
    placeholders = {n.name: n for n in ep.graph_module.graph.nodes if n.op == "placeholder"}
    inputs = [placeholders[name] for name in user_index]
    guards = [TensorGuard(n.meta["val"].device, n.meta["val"].dtype) for n in inputs]
    constants = {k: v for k, v in ep.constants.items() if isinstance(v, Tensor)}
    # export writes its guards as Python over the traced function's arguments: `_FlatCall.forward(*tensors)`
    shape_guards = compile(" and ".join(f"({g})" for g in ep._guards_code) or "True", "<export guards>", "eval")
    return CapturedGraph(
        ep.graph_module,
        bindings,
        guards,
        inputs,
        dict(ep.range_constraints),
        shape_guards,
        ep.call_spec.out_spec,
        output_kinds,
        constants,
    )


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
