"""Rewrite: replace the residual-add chain by Block AttnRes depth attention.

For sublayer j the stream value h_j (the output of add j-1) is replaced, for every reader, by the
depth attention over [stream start, completed blocks, partial sum]; the final stream value by the
final aggregation. The residual adds themselves disappear. Every new node carries
`meta["attnres"]`, its PlanSite, so that later passes can find the sites without re-deriving the plan.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from . import ops
from .capture import CapturedGraph
from .plan import Plan, PlanSite
from .stream import Stream, same_shape


def rewrite(captured: CapturedGraph, stream: Stream, plan: Plan) -> None:
    """Rewrite `captured` in place; adds the query / key-weight graph inputs the plan names."""
    graph = captured.gm.graph
    params = {s.index: _param_inputs(captured, s) for s in plan.parametrised}
    blocks: list[Node] = [stream.start]
    partial: Node | None = None
    size = plan.block_size
    for j, site in enumerate(stream.sites):
        flattened = not same_shape(site.add.meta["val"].shape, stream.start.meta["val"].shape)  # [B*T, d] in a layer
        with graph.inserting_before(site.add):
            delta = _as_dtype(graph, site.branches[0], site.add)
            for branch in site.branches[1:]:  # a parallel sublayer written `(h + a) + m`
                delta = graph.call_function(torch.ops.aten.add.Tensor, (delta, _as_dtype(graph, branch, site.add)))
            if flattened:
                delta = graph.call_function(ops.reshape_like, (delta, stream.start))
            partial = delta if partial is None else graph.call_function(torch.ops.aten.add.Tensor, (partial, delta))
        if (j + 1) % size == 0:
            blocks.append(partial)
            partial = None
        plan_site = plan.sites[j + 1] if j + 1 < len(stream.sites) else plan.final
        sources = blocks + ([partial] if partial is not None else [])
        with graph.inserting_after(site.add):
            mixed = graph.call_function(ops.depth_attention, (sources, *params[plan_site.index], plan_site.eps))
        mixed.meta["attnres"] = plan_site
        mixed.meta["val"] = stream.start.meta["val"]
        read = mixed
        if flattened:  # what read the add reads the mix in the add's shape
            with graph.inserting_after(mixed):
                read = graph.call_function(ops.reshape_like, (mixed, site.branches[0]))
        site.add.replace_all_uses_with(read, delete_user_cb=lambda user, new=mixed: user is not new)
        graph.erase_node(site.add)
    graph.eliminate_dead_code()
    captured.gm.recompile()


def _param_inputs(captured: CapturedGraph, site: PlanSite) -> tuple[Node, Node]:
    return (
        captured.add_parameter_input(site.query.replace(".", "_"), site.query),
        captured.add_parameter_input(site.key_weight.replace(".", "_"), site.key_weight),
    )


def _as_dtype(graph: Graph, node: Node, like: Node) -> Node:
    """The branch output in the stream's dtype: all sources share one dtype."""
    dtype = like.meta["val"].dtype
    if node.meta["val"].dtype == dtype:
        return node
    return graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": dtype})
