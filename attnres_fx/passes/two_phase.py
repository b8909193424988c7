"""Two-phase depth attention (exact), as in the paper.

Phase 1, once per block: score every sublayer of the block against the completed blocks together,
keeping per sublayer the running max, the sum of exponentials and the unnormalised weighted sum.
Phase 2, per sublayer: score the partial sum alone and merge it with online softmax. Completed
blocks are read once per block instead of once per sublayer, no sources are stacked, and each
completed block's inverse RMS is computed once for the rest of the depth.
"""

from __future__ import annotations

from collections import defaultdict

from torch.fx import GraphModule, Node

from .. import ops
from ..plan import PlanSite


def two_phase(gm: GraphModule) -> None:
    graph = gm.graph
    groups: dict[tuple[tuple[Node, ...], float], list[Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.target is ops.depth_attention:
            meta: PlanSite = node.meta["attnres"]
            groups[tuple(node.args[0][: meta.num_completed]), meta.eps].append(node)
    inverse_rms: dict[tuple[Node, float], Node] = {}
    for (blocks, eps), sites in groups.items():
        _rewrite_block(gm, list(blocks), eps, sites, inverse_rms)


def _rewrite_block(
    gm: GraphModule, blocks: list[Node], eps: float, sites: list[Node], inverse_rms: dict[tuple[Node, float], Node]
) -> None:
    """Replace the depth attention of one block's sites (all sharing `blocks`) by phase 1 + phase 2."""
    graph = gm.graph
    rms = [_inverse_rms(gm, b, eps, inverse_rms) for b in blocks]
    queries = [s.args[1] for s in sites]
    key_weights = [s.args[2] for s in sites]
    with graph.inserting_before(sites[0]):
        stats = graph.call_function(ops.block_scores, (blocks, rms, queries, key_weights))
    for k, site in enumerate(sites):
        meta: PlanSite = site.meta["attnres"]
        with graph.inserting_before(site):
            if meta.has_partial:
                args = (stats, k, site.args[0][-1], site.args[1], site.args[2], eps)
                merged = graph.call_function(ops.merge_partial, args)
            else:
                merged = graph.call_function(ops.completed_only, (stats, k, site.args[0][0]))
        merged.meta.update(site.meta)
        site.replace_all_uses_with(merged)
        graph.erase_node(site)


def _inverse_rms(gm: GraphModule, block: Node, eps: float, cache: dict[tuple[Node, float], Node]) -> Node:
    """One inverse-RMS node per completed block, placed right where the block is complete."""
    if (block, eps) not in cache:
        with gm.graph.inserting_after(block):
            cache[block, eps] = gm.graph.call_function(ops.inverse_rms, (block, eps))
    return cache[block, eps]
