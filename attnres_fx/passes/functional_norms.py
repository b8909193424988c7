"""Graph pass: a layer's forward rewritten one level deep, where the layer computes a stream-reading norm itself.

A norm module gets a pre-hook (`hooks.py`); a norm written in the layer's own forward (`F.rms_norm(x)`, or by hand)
has no module boundary to hook. The layer's forward is traced with torch.fx one level deep: every submodule stays a
`call_module`, so its hooks, wrappers and own forward still run. Each stream value that such a norm reads is replaced
by `self.forward.read(value, offset)`, the depth mix of its sublayer. The rest is the layer's own code, run as
generated Python on the layer itself, with its parameters as they are at each call.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, Node

from ..errors import AttnResError
from ..layers import LayerLayout

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_VIEW_FUNCTIONS = {torch.reshape, torch.flatten}
_VIEW_METHODS = {"view", "reshape", "flatten", "contiguous", "view_as", "reshape_as"}
_METADATA = {"size", "dim", "shape", "dtype", "device", "ndim"}


def rewrite_forward(module: nn.Module, layout: LayerLayout) -> Callable[..., Any]:
    """`type(module).forward`, with the stream values that the forward's own norms read replaced by depth mixes."""
    graph = _trace(module, layout)
    found = _read_through_mixes(graph, layout)
    expected = {r.offset for r in layout.readers if r.functional}
    if found != expected:
        raise _refusal(
            module,
            layout,
            f"its traced forward reads the stream itself at sublayers {sorted(found)}, where the captured graph has "
            f"norms computed in it at {sorted(expected)}",
        )
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    # the generated source of our own rewritten graph (as torch.fx's GraphModule.recompile does)
    source = compile(code.src, f"<attnres_fx: {type(module).__name__}.forward, rewritten>", "exec")
    exec(source, namespace)  # noqa: S102
    return namespace["forward"]


class _OneLevel(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace(module: nn.Module, layout: LayerLayout) -> Graph:
    if layout.stream_arg is None:
        raise _refusal(module, layout, "the stream starts inside it, so there is no stream argument to follow")
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    loose = [p.name for p in params if p.default is None or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if loose:
        raise _refusal(module, layout, f"its forward takes optional or variadic arguments ({', '.join(loose)})")
    try:
        return _OneLevel().trace(module)
    except Exception as e:  # torch.fx cannot follow data-dependent control flow
        raise _refusal(module, layout, f"torch.fx cannot trace its forward ({type(e).__name__}: {e})") from e


def _read_through_mixes(graph: Graph, layout: LayerLayout) -> set[int]:
    """Insert the depth reads; return the offsets at which the forward reads the stream itself."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    arg = layout.stream_arg
    entry = placeholders[arg] if isinstance(arg, int) else next(n for n in placeholders if n.target == arg)
    offsets: dict[Node, int | None] = {entry: 0}  # stream values -> the sublayer offset whose input they are
    mixes: dict[Node, Node] = {}
    adds = 0
    found: set[int] = set()
    for node in list(graph.nodes):
        read = [a for a in node.all_input_nodes if a in offsets]
        if not read or node.op in ("output", "call_module") or _reads_metadata(node):
            continue  # a submodule reads the stream through its own hooks (a norm module's pre-hook)
        if _is_add(node) and len(read) == 1 and adds < len(layout.add_offsets):
            offsets[node], adds = layout.add_offsets[adds], adds + 1
        elif _is_view(node) and node.args[0] in offsets:
            offsets[node] = offsets[node.args[0]]
        else:
            for value in read:
                if offsets[value] is None:
                    continue  # inside a parallel sublayer `(h + a) + m`: read by nothing but its next add
                if value not in mixes:
                    with graph.inserting_after(value):
                        owner = graph.get_attr("forward")
                    with graph.inserting_after(owner):
                        mixes[value] = graph.call_method("read", (owner, value, offsets[value]))
                node.replace_input_with(value, mixes[value])
                found.add(offsets[value])
    return found


def _is_add(node: Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def _is_view(node: Node) -> bool:
    return (node.op == "call_function" and node.target in _VIEW_FUNCTIONS) or (
        node.op == "call_method" and node.target in _VIEW_METHODS
    )


def _reads_metadata(node: Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _METADATA
    return node.op == "call_method" and node.target in _METADATA


def _refusal(module: nn.Module, layout: LayerLayout, why: str) -> AttnResError:
    return AttnResError(
        f"`{layout.path or 'the model'}` ({type(module).__name__}) computes a norm that reads the residual stream in "
        f"its own forward, not in a submodule, and attnres_fx could not rewrite that forward one level deep: {why}. "
        "Compute the norm with a module (nn.RMSNorm, nn.LayerNorm, or your own norm module), so that its input can "
        "be replaced by the depth mix."
    )
