"""The depth-attention functions that rewritten graphs call.

They live at module level because a GraphModule's generated code refers to them as globals.
Statistics (RMS, logits, softmax) are computed in fp32 whatever the model's dtype; the result is
cast back to the dtype of the sources.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SiteRecord:
    """What one depth-attention site computed, for analysis (`attnres_fx.depth_weights`, the demo)."""

    weights: Tensor  # [num_sources, *token dims], fp32
    sources: list[Tensor]  # stream start, completed blocks, partial sum (the last source is always the
    # running sum of the current or just-completed block)


# Set by `recording()`; the plain op appends a SiteRecord for each site it computes.
_record: list[SiteRecord] | None = None


def inverse_rms(x: Tensor, eps: float) -> Tensor:
    """1 / RMS(x) over the last dim, in fp32, keeping the dim (shape [..., 1])."""
    xf = x.float()
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def depth_attention(sources: list[Tensor], query: Tensor, key_weight: Tensor, eps: float) -> Tensor:
    """Softmax attention over depth, the plain way: stack the sources and attend.

    h = sum_i softmax_i(q . (g * rmsnorm(v_i))) * v_i, per token.
    """
    values = torch.stack(sources).float()
    keys = values * inverse_rms(values, eps) * key_weight.float()
    weights = (keys * query.float()).sum(-1).softmax(0)
    if _record is not None:
        _record.append(SiteRecord(weights.detach(), [s.detach() for s in sources]))
    return (weights.unsqueeze(-1) * values).sum(0).to(sources[0].dtype)


@contextlib.contextmanager
def recording() -> Iterator[list[SiteRecord]]:
    """Collect a SiteRecord for every `depth_attention` call made inside the block."""
    global _record
    previous, _record = _record, []
    try:
        yield _record
    finally:
        _record = previous


# --- two-phase form (attnres_fx.passes.two_phase) ------------------------------------------------

BlockStats = tuple[Tensor, Tensor, Tensor]  # running max [..., J], sum of exp [..., J], weighted sum [..., J, d]


def block_scores(blocks: list[Tensor], inv_rms: list[Tensor], queries: list[Tensor], key_weights: list[Tensor]) -> BlockStats:
    """Phase 1: score the J sublayers of a block against all completed blocks at once (fp32)."""
    w = torch.stack([q.float() * g.float() for q, g in zip(queries, key_weights)])  # [J, d]
    values = [b.float().unsqueeze(-2) for b in blocks]  # [..., 1, d] each, converted once
    logits = [(v * w).sum(-1) * r for v, r in zip(values, inv_rms)]  # [..., J] each
    m = functools.reduce(torch.maximum, logits)
    exps = [torch.exp(x - m) for x in logits]
    denom = functools.reduce(torch.add, exps)
    weighted = functools.reduce(torch.add, (e.unsqueeze(-1) * v for e, v in zip(exps, values)))
    return m, denom, weighted


def merge_partial(stats: BlockStats, k: int, partial: Tensor, query: Tensor, key_weight: Tensor, eps: float) -> Tensor:
    """Phase 2: add the partial sum as one more source to sublayer k's phase-1 result (online softmax)."""
    m1, l1, o1 = stats[0][..., k], stats[1][..., k], stats[2][..., k, :]
    p = partial.float()
    score = (p * (query.float() * key_weight.float())).sum(-1) * inverse_rms(p, eps).squeeze(-1)
    m = torch.maximum(m1, score)
    a, b = torch.exp(m1 - m), torch.exp(score - m)
    return ((a.unsqueeze(-1) * o1 + b.unsqueeze(-1) * p) / (a * l1 + b).unsqueeze(-1)).to(partial.dtype)


def completed_only(stats: BlockStats, k: int, like: Tensor) -> Tensor:
    """Phase 2 for a block's first sublayer: no partial sum yet, phase 1 is the whole answer."""
    return (stats[2][..., k, :] / stats[1][..., k].unsqueeze(-1)).to(like.dtype)
