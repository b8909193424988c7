"""Pipeline parallelism (`torch.distributed.pipelining`) for a transformed model: the depth state crosses stages.

A stage sends what its module returns and hands what it receives to the next stage's module as positional args. So
a stage module of a transformed model (`pipeline_stage`) returns, after the hidden state, the depth state as tensors:
the completed blocks (the stream start first) and the current block's partial sum where a block is open at the
boundary; the next stage's module rebuilds the state from them. Their number is fixed per boundary by the plan, so
every boundary has static shapes. Phase-1 scores are not sent: the next stage scores its first block again.

Cross-stage caching (`pipeline_stages`, several stages per rank as in interleaved schedules): a rank keeps the
blocks its earlier stage returned for each microbatch, and a hop sends only the blocks the receiving rank has not
seen. The later stage reads the kept blocks as leaves of its own graph (so its backward cannot run, and free, the
earlier stage's graph) and their gradients are handed to the earlier stage's backward, as the gradients of extra
outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage

from . import hf, state
from .errors import AttnResError
from .hooks import DepthRuntime, _DepthForward


@dataclass
class _Boundary:
    """What crosses into or out of a stage, beside the hidden state: `blocks` completed sources (the newest
    `blocks - cached` of them travel) and the partial sum if a block is open there."""

    site: int  # the first sublayer after the boundary
    blocks: int
    partial: bool
    cached: int = 0  # how many of the oldest blocks the receiving rank keeps from its earlier stage


def pipeline_stage(module: nn.Module, call: Callable[[Tensor], Tensor] | None = None) -> nn.Module:
    """Make `module`, a pipeline stage of a transformed model (a copy that holds consecutive layers of it, as
    torchtitan makes them), send and receive the depth state with the hidden state. In place; returns `module`.

    `call(x)` runs the stage on its input (token ids in the first stage, else the hidden state) and returns the hidden
    state after its last layer (the logits, or what the loss reads, in the last stage); by default the module's own
    forward. For a Hugging Face model, `pipeline_split` makes the stage copies and their calls.
    """
    forwards = _depth_forwards(module)
    if not forwards:
        raise AttnResError(
            f"{type(module).__name__} holds no layer of a model transformed by attnres_fx: make the stage from a "
            "transformed model (`attnres_fx.transform(model)` first, then copy it per stage and remove the layers "
            "of the other stages)."
        )
    if len({id(f.runtime) for f in forwards}) > 1:
        raise AttnResError(
            f"{type(module).__name__} holds layers of {len({id(f.runtime) for f in forwards})} transformed streams "
            "(an encoder's and a decoder's, say): a pipeline stage holds consecutive layers of one stream."
        )
    layouts = [f.layout for f in forwards]
    for a, b in zip(layouts, layouts[1:]):
        if a.end_site != b.first_site:
            raise AttnResError(
                f"the layers of this stage are not consecutive: `{a.path}` ends at sublayer {a.end_site - 1} and the "
                f"next one held, `{b.path}`, starts at {b.first_site}. A stage holds one run of layers."
            )
    module.forward = _StageForward(forwards[0], call or module.forward, layouts[-1].end_site)
    return module


def _depth_forwards(module: nn.Module) -> list[_DepthForward]:
    """The transformed layers `module` holds, in depth order."""
    forwards = [m.forward for m in module.modules() if isinstance(m.forward, _DepthForward)]
    return sorted(forwards, key=lambda f: f.layout.first_site)


class _StageForward:
    """A stage module's forward: (x, *state in) -> (hidden, *state out)."""

    def __init__(self, first_layer: _DepthForward, call: Callable[[Tensor], Tensor], exit: int):
        self.runtime, self.first_layer, self.call = first_layer.runtime, first_layer, call
        entry = first_layer.layout.first_site
        self.entry, self.exit = _boundary(self.runtime, entry), _boundary(self.runtime, exit)
        self.first, self.last = entry == 0, exit == len(self.runtime.plan.sites)
        self.cache: _BlockCache | None = None  # set by `pipeline_stages`
        self.index = -1  # the stage index, where a cache is kept

    def __call__(self, x: Tensor, *received: Tensor) -> Any:
        if not self.first:
            state.attach(x, self._state_in(received), state.DEPTH)
        out = self.call(x)
        if self.last:
            return out
        depth = state.find(out, state.DEPTH)
        if depth is None:
            raise AttnResError(
                "this stage's last layer returned a hidden state without its depth state: the stage's call must "
                "return the tensor its last layer returns (no final norm or head in a stage before the last)."
            )
        blocks = depth.blocks[len(depth.blocks) - self.exit.blocks :]
        if self.cache is not None:
            self.cache.keep(self.index, blocks)
        sent = blocks[self.exit.cached :]
        return (out, *sent, *([depth.partial] if self.exit.partial else []))

    def _state_in(self, received: tuple[Tensor, ...]) -> state.DepthState:
        boundary = self.entry
        count = boundary.blocks - boundary.cached
        if len(received) != count + boundary.partial:
            raise AttnResError(
                f"stage input: expected the hidden state, {count} blocks"
                f"{' and the partial sum' if boundary.partial else ''} (sublayer {boundary.site} follows), "
                f"got {1 + len(received)} tensors."
            )
        kept = self.cache.reuse(self.index, boundary.cached) if boundary.cached else []
        partial = received[count] if boundary.partial else None
        slots = self.runtime.bank_slots(self.first_layer)
        return state.from_sources([*kept, *received[:count]], partial, slots)


def _boundary(runtime: DepthRuntime, site: int) -> _Boundary:
    size = runtime.plan.block_size
    return _Boundary(site, site // size + 1, site % size != 0)


# --- cross-stage caching ---------------------------------------------------------------------------------------


@dataclass
class _BlockCache:
    """One rank's kept blocks, per (stage, microbatch), and the gradients its later stages hand back."""

    previous: dict[int, int]  # stage -> the rank's stage before it, whose blocks it reuses
    chunk: Any = None  # the microbatch the stages work on now
    kept: dict[tuple[int, Any], tuple[Tensor, ...]] = field(default_factory=dict)
    leaves: dict[tuple[int, Any], list[Tensor]] = field(default_factory=dict)
    grads: dict[tuple[int, Any], list[Tensor | None]] = field(default_factory=dict)

    def keep(self, stage: int, blocks: tuple[Tensor, ...]) -> None:
        if stage in self.previous.values():
            self.kept[stage, self.chunk] = blocks

    def reuse(self, stage: int, count: int) -> list[Tensor]:
        """The oldest `count` blocks of the rank's earlier stage, as leaves of this stage's graph."""
        blocks = self.kept[self.previous[stage], self.chunk][:count]
        leaves = [b.detach().requires_grad_(b.requires_grad) for b in blocks]
        self.leaves[stage, self.chunk] = leaves
        return leaves

    def hand_back(self, stage: int, chunk: Any) -> None:
        """After `stage`'s backward: the gradients of the blocks it reused go to the stage that made them."""
        leaves = self.leaves.pop((stage, chunk), None)
        if leaves is not None:
            self.grads[self.previous[stage], chunk] = [leaf.grad for leaf in leaves]

    def taken(self, stage: int, chunk: Any) -> tuple[list[Tensor], list[Tensor]]:
        """The blocks a later stage reused, with their gradients: extra outputs of `stage`'s backward."""
        blocks = self.kept.pop((stage, chunk), ())
        grads = self.grads.pop((stage, chunk), [])
        pairs = [(b, g) for b, g in zip(blocks, grads) if g is not None and b.requires_grad]
        return [b for b, _ in pairs], [g for _, g in pairs]

    def clear(self) -> None:
        self.kept.clear()
        self.leaves.clear()
        self.grads.clear()


class _CachingStage(PipelineStage):
    """A PipelineStage whose module keeps and reuses blocks through the rank's `_BlockCache`."""

    def __init__(self, submodule: nn.Module, stage_index: int, *args: Any, cache: _BlockCache, **kwargs: Any):
        super().__init__(submodule, stage_index, *args, **kwargs)
        self._cache = cache

    def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        self._cache.chunk = fwd_chunk_id
        return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
        self._cache.chunk = "metadata"
        return super()._forward_metadata_inference(*args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> None:
        self._cache.chunk = bwd_chunk_id
        super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
        self._cache.hand_back(self.stage_index, bwd_chunk_id)

    def backward_maybe_with_nosync(self, backward_type: str, bwd_kwargs: dict, *args: Any, **kwargs: Any) -> Any:
        blocks, grads = self._cache.taken(self.stage_index, self._cache.chunk)
        if blocks and backward_type != "weight":
            outputs, output_grads = bwd_kwargs["stage_output"], bwd_kwargs["output_grads"]
            bwd_kwargs = {**bwd_kwargs, "stage_output": (*outputs, *blocks), "output_grads": (*output_grads, *grads)}
        return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, *args, **kwargs)

    def clear_runtime_states(self) -> None:
        super().clear_runtime_states()
        self._cache.clear()


def pipeline_stages(
    modules: Sequence[nn.Module],
    stage_indices: Sequence[int],
    num_stages: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> list[PipelineStage]:
    """This rank's pipeline stages of a transformed model, with cross-stage caching of the blocks.

    `modules` are this rank's stage modules (made by `pipeline_stage` or `pipeline_split`), `stage_indices` their
    indices; stages sit on ranks as the interleaved schedules place them (stage i on rank i % ranks). Every rank calls
    it (it gathers every stage's boundaries). A hop then carries only the blocks its receiving rank has not kept from
    its earlier stage; with one stage per rank nothing is kept and every hop carries the bank.
    """
    ranks = dist.get_world_size(group)
    forwards = [_stage_forward(m) for m in modules]
    mine = {i: (f.entry.site, f.exit.site) for i, f in zip(stage_indices, forwards)}
    gathered: list[dict[int, tuple[int, int]]] = [{} for _ in range(ranks)]
    dist.all_gather_object(gathered, mine, group=group)
    entries = {i: bounds[0] for part in gathered for i, bounds in part.items()}
    if sorted(entries) != list(range(num_stages)):
        raise AttnResError(f"the ranks hold stages {sorted(entries)}; expected each of 0..{num_stages - 1} once.")
    previous = {s: s - ranks for s in range(ranks, num_stages)}
    kept = {s: _boundary(forwards[0].runtime, entries[p + 1]).blocks for s, p in previous.items()}
    cache = _BlockCache({s: p for s, p in previous.items() if s in mine})
    stages = []
    for index, module, forward in zip(stage_indices, modules, forwards):
        forward.cache, forward.index = cache, index
        forward.entry.cached = kept.get(index, 0)
        forward.exit.cached = kept.get(index + 1, 0)
        stages.append(_CachingStage(module, index, num_stages, device, group=group, cache=cache))
    return stages


def _stage_forward(module: nn.Module) -> _StageForward:
    forward = module.__dict__.get("forward")
    if not isinstance(forward, _StageForward):
        raise AttnResError(
            f"{type(module).__name__} is not a pipeline stage of a transformed model: make it one with "
            "`attnres_fx.pipeline_stage(module)` (or `attnres_fx.pipeline_split(model, num_stages)`)."
        )
    return forward


# --- Hugging Face models -----------------------------------------------------------------------------------------


def pipeline_split(model: nn.Module, num_stages: int) -> list[nn.Module]:
    """Split a transformed Hugging Face model into `num_stages` stage modules of consecutive layers, each a copy of the
    model that keeps only its own layers (and the embedding in the first, the final norm and head in the last).

    The first stage takes token ids, the others the hidden state and the depth state; the last returns the logits.
    Build the model on the meta device for a large one: the copies share nothing, so each rank materialises only
    its own stages. Then `PipelineStage(stage, i, num_stages, device)` per stage, or `pipeline_stages(...)`.
    """
    layouts = _layouts(model)
    if not 1 <= num_stages <= len(layouts):
        raise AttnResError(f"num_stages must be between 1 and the {len(layouts)} layers; got {num_stages}.")
    bounds = [round(k * len(layouts) / num_stages) for k in range(num_stages + 1)]
    return [_hf_stage(model, layouts, bounds[k], bounds[k + 1]) for k in range(num_stages)]


def _layouts(model: nn.Module) -> list[Any]:
    forwards = _depth_forwards(model)
    otherwise = (
        "For other models copy the model per stage, remove the other stages' layers and wrap each copy with "
        "`attnres_fx.pipeline_stage(copy, call)`."
    )
    if not forwards or not hf.is_pipelinable(model):
        raise AttnResError(
            "pipeline_split takes a transformed Hugging Face model with a `base_model` that accepts `inputs_embeds` "
            f"(got {type(model).__name__}). {otherwise}"
        )
    embeddings = next((path for path, m in model.named_modules() if m is model.get_input_embeddings()), None)
    start = forwards[0].runtime.start_path
    if start is None or start != embeddings:
        raise AttnResError(
            f"{type(model).__name__}: the first layer does not read the input embeddings as they are (its forward "
            f"computes the stream from them{', in `' + start + '`' if start else ''}: position embeddings, a scale), "
            "so a later stage could not hand its input back as `inputs_embeds` without that being applied again. "
            f"{otherwise}"
        )
    return [f.layout for f in forwards]


def _hf_stage(model: nn.Module, layouts: list[Any], start: int, stop: int) -> nn.Module:
    stage = copy.deepcopy(model)
    for i, layout in enumerate(layouts):
        if not start <= i < stop:
            parent, _, name = layout.path.rpartition(".")
            stage.get_submodule(parent).register_module(name, _Passthrough(layout.stream_arg, layout.output_index))
    first, last = start == 0, stop == len(layouts)
    if not last:
        for path in _depth_forwards(stage)[0].runtime.final_norms:
            parent, _, name = path.rpartition(".")
            stage.get_submodule(parent).register_module(name, nn.Identity())
    return pipeline_stage(stage, hf.StageCall(stage, first, last))


class _Passthrough(nn.Module):
    """A layer of another stage: returns the stream it is handed, as the layer would return it."""

    def __init__(self, stream_arg: int | str, output_index: int | None):
        super().__init__()
        self.stream_arg, self.output_index = stream_arg, output_index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[self.stream_arg] if isinstance(self.stream_arg, int) else kwargs[self.stream_arg]
        return x if self.output_index is None else (x,)
