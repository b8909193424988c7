"""The depth state: what the layers of a transformed model hand each other, riding on the stream tensor.

A layer returns, in place of the stream, the depth mix that the next sublayer reads, and that tensor carries the
Block AttnRes state as a Python attribute: the completed blocks, the current block's partial sum and the phase-1
scores of the current block. Because the state travels with the data, every call, microbatch and thread has its own,
a recomputation in the backward (activation checkpointing) finds it on the input it is handed, and a pipeline stage
sends it on as tensors (`pipeline.py`). Saved-tensor hooks (offloading) hand a recomputation a copy, which has no
attributes but keeps the original's autograd node: the state is kept on that node too.

Where layers are compiled one by one (per-layer compile), what crosses a layer boundary must not grow with depth:
the bank of completed blocks then has a fixed number of slots (the most any sublayer reads), the empty ones zero
placeholders that a bias of -inf masks out, so every layer of one configuration sees inputs of the same shapes and
compiles once. Elsewhere (eager, the whole model compiled) the bank holds the blocks alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import ops

DEPTH = "_attnres_depth"  # on the stream tensor between layers: its DepthState
CALL = "_attnres_call"  # on the tensor a layer's forward is handed: the layer call (see `hooks.py`)


@dataclass
class BlockScores:
    """Phase 1 of the open block for some of its sublayers, those at `positions` in the block (in stats order)."""

    positions: tuple[int, ...]
    stats: ops.BlockStats


@dataclass
class DepthState:
    """The stream between two layers."""

    blocks: tuple[Tensor, ...]  # the stream start and the completed blocks, oldest first (after placeholders)
    partial: Tensor | None  # the current block's partial sum; None right after a block completed
    scores: dict[float, BlockScores] | None  # per key-norm eps: the open block's phase 1
    bias: Tensor | None = None  # a fixed-size bank's [slots] fp32 mask: 0 for a source, -inf for a placeholder
    next_site: int = 0  # the sublayer that reads this state next (which call of a module called at several depths)

    def sources(self) -> tuple[list[Tensor], Tensor | None]:
        """(blocks, the bias that masks placeholders, if any)."""
        return list(self.blocks), self.bias

    def completed(self, block: Tensor) -> DepthState:
        """The state after `block` completed: the newest slot; a fixed-size bank drops its oldest placeholder."""
        drop = 0 if self.bias is None else 1
        bias = None if self.bias is None else torch.cat([self.bias[1:], self.bias.new_zeros(1)])
        return DepthState((*self.blocks[drop:], block), None, None, bias, self.next_site)

    def moved(self, partial: Tensor | None, scores: dict[float, BlockScores] | None, next_site: int) -> DepthState:
        """This bank with the current block's partial sum and phase 1: what a layer hands the next."""
        return DepthState(self.blocks, partial, scores, self.bias, next_site)

    def reading(self, stats: ops.BlockStats) -> DepthState:
        """This state with the sources that phase 1 read (its newest blocks) replaced by the aliases it handed on
        (`ops.BlockStats.blocks`), for later phase-1 calls to read."""
        return self._with_blocks((*self.blocks[: len(self.blocks) - len(stats.blocks)], *stats.blocks), self.bias)

    def in_bank(self, slots: int) -> DepthState:
        """This state in a fixed-size bank of `slots`: zero placeholders before its blocks, masked by a -inf bias."""
        empty, like = slots - len(self.blocks), self.blocks[0]
        # one allocation each: placeholders that share storage are one tensor to a compiled layer's autograd Functions
        placeholders = tuple(tracked(like.new_zeros(like.shape), like) for _ in range(empty))
        bias = torch.zeros(slots, device=like.device)
        bias[:empty] = float("-inf")
        return self._with_blocks((*placeholders, *self.blocks), bias)

    def _with_blocks(self, blocks: tuple[Tensor, ...], bias: Tensor | None) -> DepthState:
        # not `dataclasses.replace`: its introspection is most of the bytecode Dynamo traces for a state
        return DepthState(blocks, self.partial, self.scores, bias, self.next_site)


def from_sources(
    sources: list[Tensor], partial: Tensor | None, slots: int | None = None, next_site: int = 0
) -> DepthState:
    """A state holding `sources` (the stream start and the completed blocks, oldest first) and `partial`, read next
    by sublayer `next_site`; with `slots`, a fixed-size bank of that many."""
    depth = DepthState(tuple(sources), partial, None, next_site=next_site)
    return depth if slots is None else depth.in_bank(slots)


def attach(x: Tensor, value: object, key: str) -> None:
    """Let `x` carry `value` under `key` (and its autograd node, for copies made by saved-tensor hooks). `value` must
    hold only what `x` was computed from, or things beside it: no reference cycle through the autograd graph."""
    setattr(x, key, value)
    if not torch.compiler.is_compiling() and x.grad_fn is not None:  # in this order: Dynamo cannot read grad_fn
        x.grad_fn.metadata[key] = value


def find(x: Tensor, key: str) -> Any:
    """What `x` carries under `key`, if anything."""
    value = getattr(x, key, None)
    base = x._base if value is None else None
    if base is not None and base.shape == x.shape:  # an alias made on the way (by a backward hook, by FSDP2)
        value = getattr(base, key, None)
    if value is None and not torch.compiler.is_compiling() and x.grad_fn is not None:
        value = x.grad_fn.metadata.get(key)
    return value


def tracked(value: Tensor, like: Tensor) -> Tensor:
    """A view of `value` that autograd tracks as it tracks `like` (it requires grad, with a node of its own that a
    copy keeps), and that passes no gradient back: placeholders, and the zeros a layer that opens a block is handed.
    Without autograd (inference, decoding), `value` itself."""
    return _Tracked.apply(value, like) if torch.is_grad_enabled() else value


class _Tracked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, like: Tensor) -> Tensor:  # type: ignore[override]
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None]:  # type: ignore[override]
        return None, None
