"""Module-faithful execution: the model's own modules and forwards run at every call; hooks make its stream AttnRes.

Around each call of a layer (see `layers.py`):
- the layer's stream input is the depth mix its first sublayer reads, and it carries the depth state (`state.py`);
  the layer's forward is handed instead the current block's partial sum (zeros when a block starts with the layer),
  so that the layer's own residual adds, with whatever dropout, LayerScale or multiplier stands between a branch and
  its add, compute Block AttnRes's partial sums;
- the pre-hook of each norm that reads the stream inside the layer replaces the norm's input by its sublayer's depth
  mix over [stream start, completed blocks, partial sum];
- the layer returns, in place of the stream, the mix that the next sublayer reads (the final aggregation after the
  last layer), carrying the new state; readers between layers (`output_hidden_states`, the final norm) see mixes.
Depth attention runs in two phases (`ops.py`): when a block opens, all its sublayers are scored against the completed
blocks at once (phase 1, which the state carries to the next layer); each sublayer then merges its partial sum with
online softmax. Decoding (no autograd, a few tokens a call), each mix is one kernel call instead (`ops.plain_pays`).

Where the stream starts inside the first layer (the model's own forward holds the adds and the embedding; a
hierarchical stage starts in its first block), that layer is handed nothing: its first norm starts the state on the
stream value it reads, and each later norm's partial sum is the difference of two stream values it sees (the model's
own adds sum the branch outputs of the mixes). A module called at several depths (a shared layer) runs the program of
the depth its input's state says. A norm that a layer's forward computes itself (`F.rms_norm(x)`) is read through
that forward rewritten one level deep (`passes/functional_norms.py`), its submodules still called as modules.

What a layer does is written in positions within a block, not in sublayer indices (`LayerProgram`), and it is handed
the parameters it uses in order, so all layers of one configuration run the same code on state of the same shapes:
per-layer `torch.compile` compiles one graph per configuration, at any depth. The only per-call Python state is the
layer call in progress (`_LayerCall`), which the norms inside that call read.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.distributed.tensor import DTensor

from . import ops, state
from .errors import AttnResError
from .layers import LayerLayout
from .parallel import site_weights
from .parameters import AttnResParameters, SiteParameters
from .plan import Plan
from .passes.functional_norms import rewrite_forward
from .state import BlockScores, DepthState


@dataclass(frozen=True)
class LayerProgram:
    """A layer's part of the depth, relative to its first sublayer (offset 0); offsets 1..num_sites are the sublayers
    it computes mixes for (the last: the one after the layer), offsets up to len(eps) those it may score."""

    block_size: int
    first_position: int  # the position of the layer's first sublayer in its block
    num_sites: int
    eps: tuple[float, ...]  # key-norm eps per offset from 1 (the order of the parameters the layer is handed)
    in_place: bool  # its residual adds are in place (`x += f(x)`): it must be handed a copy of the partial sum
    stream_arg: int | str | None  # None: the stream starts inside the layer, at its first norm
    output_index: int | None
    returns_stream: bool  # False: its output is not the stream (the final norm reads the stream inside it)
    last: bool  # the mix it returns, or its last norm reads, is the final aggregation
    # per offset: the phase-1 calls that score its block from there, as (eps, the parameters' indices, the positions
    # in the block they score), worked out once here rather than in the code that Dynamo traces at every layer
    scoring: tuple[tuple[tuple[float, tuple[int, ...], tuple[int, ...]], ...], ...] = field(
        init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "scoring", tuple(self._scoring(o) for o in range(len(self.eps) + 1)))

    def position(self, offset: int) -> int:
        return (self.first_position + offset) % self.block_size

    def _scoring(self, offset: int) -> tuple[tuple[float, tuple[int, ...], tuple[int, ...]], ...]:
        """Offsets from `offset` to the end of its block, grouped by key-norm eps (offset 0 with the parameters of
        offset 1: see `DepthRuntime._score`)."""
        last = min(offset + self.block_size - self.position(offset) - 1, len(self.eps))
        groups: dict[float, list[int]] = {}
        for o in range(offset, last + 1):
            groups.setdefault(self.eps[max(o, 1) - 1], []).append(o)
        return tuple(
            (eps, tuple(max(o, 1) - 1 for o in offsets), tuple(self.position(o) for o in offsets))
            for eps, offsets in groups.items()
        )


class DepthRuntime:
    """Installs and runs the hooks of one transformed model."""

    def __init__(
        self,
        plan: Plan,
        layers: tuple[LayerLayout, ...],
        params: AttnResParameters,
        start: str | None,
        final_norms: tuple[str, ...],
        two_phase: bool,
        feature_dim: int = -1,
    ):
        self.plan, self.layers, self.params, self.two_phase = plan, layers, params, two_phase
        self.feature_dim = feature_dim  # the stream's channels, from the end: the depth state holds them last
        self.start_path, self.final_norms = start, final_norms  # where the stream starts, what reads its end
        self.slots = plan.final.num_completed  # the most completed sources any sublayer reads: a fixed bank's size
        self.shared_layers = len({layout.path for layout in layers}) < len(layers)  # a module called at two depths
        self._local = threading.local()  # .call: the layer call in progress on this thread

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, saved: dict[str, Any]) -> None:
        self.__dict__.update(saved)
        self._local = threading.local()

    def prepare(self, model: nn.Module) -> tuple[list[_DepthForward], dict[str, list[int]]]:
        """Each layer's forward, built (and rewritten where it computes a norm itself) without touching the model, so
        that a refusal leaves it as it was."""
        programs: dict[LayerProgram, LayerProgram] = {}  # one object per configuration
        plans: dict[str, list[_LayerPlan]] = {}
        reads: dict[str, list[int]] = {}  # per norm module: the offsets it reads at, in call order within a layer
        for layout in self.layers:
            program, params = self._program(layout)
            plans.setdefault(layout.path, []).append(_LayerPlan(programs.setdefault(program, program), params, layout))
            for r in layout.readers:
                offsets = reads.setdefault(r.path, []) if not r.functional else []
                if layout.call == 0 and r.offset not in offsets:
                    offsets.append(r.offset)
        forwards = []
        for path, layer_plans in plans.items():
            module = model.get_submodule(path)
            parent, _, key = path.rpartition(".")
            container = (model.get_submodule(parent), key) if path else (module, "")
            forwards.append(_DepthForward(self, module, tuple(layer_plans), container))
            forwards[-1].body()  # a forward that cannot be rewritten is refused here
        return forwards, reads

    def apply(self, model: nn.Module, prepared: tuple[list[_DepthForward], dict[str, list[int]]]) -> None:
        """Give each layer its forward and each stream-reading norm its pre-hook (the offsets it reads at)."""
        forwards, reads = prepared
        for forward in forwards:
            forward.module.forward = forward
        for path, offsets in reads.items():
            model.get_submodule(path).register_forward_pre_hook(functools.partial(self.read, tuple(offsets)))
        if self.start_path is not None:
            hook = functools.partial(self._start_hook, forwards[0])
            model.get_submodule(self.start_path).register_forward_hook(hook)

    def _program(self, layout: LayerLayout) -> tuple[LayerProgram, tuple[SiteParameters, ...]]:
        size, count = self.plan.block_size, len(self.plan.sites)
        end = layout.end_site
        reach = min((end // size + 1) * size - 1, count)  # the end of the block the layer's last mix belongs to
        sites = [self.plan.sites[j] if j < count else self.plan.final for j in range(layout.first_site + 1, reach + 1)]
        program = LayerProgram(
            block_size=size,
            first_position=layout.first_site % size,
            num_sites=layout.num_sites,
            eps=tuple(s.eps for s in sites),
            in_place=layout.in_place,
            stream_arg=layout.stream_arg,
            output_index=layout.output_index,
            returns_stream=layout.returns_stream,
            last=end == count,
        )
        return program, tuple(getattr(self.params, s.name) for s in sites)

    # --- hooks ---------------------------------------------------------------------------------------------------

    def enter(self, forward: _DepthForward, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        where = forward.plans[0].program.stream_arg
        if where is None:  # the stream starts inside: the layer is handed nothing, its first norm starts the state
            self._local.call, self._local.recomputing = _LayerCall(_LayerEntry(forward, forward.plans[0])), None
            return args, kwargs
        x = _get(args, kwargs, where)
        depth = state.find(x, state.DEPTH)
        plan = forward.select(depth)
        if depth is None:
            if plan.layout.first_site != 0:
                raise AttnResError(_no_state_message(plan.layout))
            depth = self.start(x, forward)
        program = plan.program
        entry = _LayerEntry(forward, plan, x, depth)
        self._local.call, self._local.recomputing = _LayerCall(entry), None
        partial, fresh, compiling = depth.partial, depth.partial is None, torch.compiler.is_compiling()
        if fresh:  # a block starts with the layer: zeros, with (eager) a node that the call is found on
            partial = torch.zeros_like(x) if compiling else state.tracked(torch.zeros_like(x), x)
        # its own tensor, in any case (a copy where the layer adds in place: `partial` may be a Function's view)
        handed = partial.clone() if program.in_place else partial if fresh else partial.view_as(partial)
        if not compiling and torch.is_grad_enabled():  # what a backward's recomputation finds: see `_current_call`
            state.attach(handed, entry, state.CALL)  # (a tensor of this call alone)
        return _put(args, kwargs, program.stream_arg, handed)

    def read(self, offsets: tuple[int, ...], module: nn.Module, args: tuple) -> tuple | None:
        """A norm module's pre-hook: its input becomes its sublayer's depth mix."""
        call = self._current_call(offsets[0] == 0, args[0])
        if call is None:
            if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
                raise AttnResError(
                    f"a norm that reads the residual stream ({type(module).__name__}) is recomputed in the backward "
                    "without the layer that holds it: activation checkpointing inside a layer is not supported by "
                    "a transformed model. Checkpoint whole layers (`gradient_checkpointing_enable()`, or "
                    "`apply_activation_checkpointing` on the decoder layers)."
                )
            return None  # the norm called on its own, outside a call of its layer: left as it is
        offset = offsets[0] if len(offsets) == 1 else call.next_offset(module, offsets)
        return (self.mix_for(call, offset, args[0]), *args[1:])

    def mix_for(self, call: _LayerCall, offset: int, value: Tensor) -> Tensor:
        """What the norm of sublayer `offset` reads, given the stream value it was handed."""
        if offset == 0:
            call.restart()
            if call.depth is None:  # the stream starts here, inside the first layer: the difference base
                call.begin(self.start(value, call.started.forward), value)
            return call.mix_in
        return self._mix_inside(call, offset, value)

    def current_call(self) -> _LayerCall | None:
        """The layer call in progress on this thread."""
        return getattr(self._local, "call", None)

    def _current_call(self, first: bool, given: Tensor) -> _LayerCall | None:
        """The layer call a norm reads in: the one in progress, or the one whose forward transformers'
        checkpointing recomputes in the backward (it reruns the layer's class forward, not `enter`), which the first
        norm finds on the tensor it is handed; that holds until the backward that recomputes it ends."""
        local = self._local
        if torch.compiler.is_compiling():
            return local.call
        task = torch._C._current_graph_task_id()
        if first and task != -1:
            entry = state.find(given, state.CALL)
            call = getattr(local, "call", None)
            if entry is not None and (call is None or call.started is not entry):
                if getattr(local, "recomputing", None) != task:  # drop it when this backward ends
                    torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_forget, local))
                local.call, local.recomputing = _LayerCall(entry), task
        return getattr(local, "call", None)

    def leave(self, call: _LayerCall, output: Any) -> Any:
        program = call.program
        if not program.returns_stream:
            return output
        stream = output if program.output_index is None else output[program.output_index]
        stream = _as_shape(stream, call.mix_in.shape)
        if program.in_place:  # the tensor the layer added to in place: what it holds now is kept as a copy
            stream = stream.clone()
        mix, partial = self._advance(call, program.num_sites, stream)
        if not program.last:
            # only where a layer is called at several depths: elsewhere a per-layer constant would make each layer
            # compiled on its own a graph of its own
            next_site = call.started.plan.layout.end_site if self.shared_layers else 0
            state.attach(mix, call.depth.moved(partial, call.scores, next_site), state.DEPTH)
        if program.output_index is None:
            return mix
        i = program.output_index
        return type(output)((*output[:i], mix, *output[i + 1 :]))

    def _start_hook(self, first: _DepthForward, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """The module whose output is the stream's start: that output, as a view that carries the initial state. Not
        where tensor parallelism's own hook turns the output into the local stream after this one: the first layer
        starts the state then."""
        if isinstance(output, DTensor):
            return None
        start = output.view_as(output)  # a view: the state holds `output`, and no tensor holds its own state
        state.attach(start, self.start(output, first), state.DEPTH)
        return start

    # --- depth attention -----------------------------------------------------------------------------------------

    def start(self, x: Tensor, first: _DepthForward) -> DepthState:
        """The state at the stream's start `x`, with the first block scored for the sublayers after the first."""
        depth = state.from_sources([self._features_last(x)], None)
        if self._uses_two_phase(x):  # the whole block, as where any other block opens, from the start alone
            plan = first.plans[0]
            scores, depth = self._score(depth, plan.program, plan.params, 0)
            depth.scores = scores
        slots = self.bank_slots(first)
        return depth if slots is None else depth.in_bank(slots)

    def bank_slots(self, first: _DepthForward) -> int | None:
        """The fixed size of the bank where the layer the state starts in is compiled on its own (`layer.compile()`,
        or `torch.compile(layer)` in its container), else None: the bank holds the blocks alone."""
        module, (container, key) = first.module, first.container
        alone = module._compiled_call_impl is not None or isinstance(container._modules.get(key), OptimizedModule)
        alone = alone and module is not container  # the model itself is the layer: compiled as a whole
        return self.slots if alone else None

    def _mix_inside(self, call: _LayerCall, offset: int, stream: Tensor) -> Tensor:
        """The mix that sublayer `offset` reads, given the stream value inside the layer (partial sums since the
        layer started, on top of the partial sum it was handed), in whatever view of the stream the norm reads (a
        layer may flatten it). A layer with in-place adds changes that value after the norm has read it: a copy."""
        if call.cached is not None and call.cached[0] == offset and call.cached[1] is stream:
            return call.cached[2]  # a second norm reading the same sublayer input (parallel residual)
        value = _as_shape(stream, call.mix_in.shape)
        value = value.clone() if call.program.in_place else value
        mix = _as_shape(self._advance(call, offset, value)[0], stream.shape)
        call.cached = (offset, stream, mix)
        return mix

    def _advance(self, call: _LayerCall, offset: int, value: Tensor) -> tuple[Tensor, Tensor | None]:
        """(the mix of sublayer `offset`, the current block's partial sum) given the stream value before it; a block
        that ends before that sublayer is completed first."""
        partial = value if call.base is None else value - call.base
        if call.program.position(offset) == 0:
            block = self._features_last(partial)
            call.depth, call.base, call.scores = call.depth.completed(block), value, None
            return self._mix(call, offset, None), None
        return self._mix(call, offset, partial), partial

    def _mix(self, call: _LayerCall, offset: int, partial: Tensor | None) -> Tensor:
        """The depth mix of sublayer `offset`, in the stream's layout."""
        if self.feature_dim == -1:  # channels last already: no views
            return self._attend(call, offset, partial)
        partial = None if partial is None else self._features_last(partial)
        return self._attend(call, offset, partial).movedim(-1, self.feature_dim)

    def _features_last(self, x: Tensor) -> Tensor:
        """A channels-first stream value with its channels last (a view), as depth attention computes over them."""
        return x if self.feature_dim == -1 else x.movedim(self.feature_dim, -1)

    def _attend(self, call: _LayerCall, offset: int, partial: Tensor | None) -> Tensor:
        program, depth = call.program, call.depth
        eps = program.eps[offset - 1]
        if call.two_phase is None:  # once per layer call: its tokens and modes are those of all its mixes
            call.two_phase = self._uses_two_phase(depth.blocks[-1])
        if not call.two_phase:
            query, key_weight = site_weights(call.params[offset - 1])
            blocks, bias = depth.sources()
            if partial is not None:
                blocks.append(partial)
                bias = None if bias is None else torch.cat([bias, bias.new_zeros(1)])
            return ops.depth_attention(blocks, query, key_weight, eps, bias)
        position = program.position(offset)
        if call.scores is None or eps not in call.scores or position not in call.scores[eps].positions:
            call.scores, call.depth = self._score(depth, program, call.params, offset)  # or a pipeline stage's start
            depth = call.depth
        scores = call.scores[eps]
        k = scores.positions.index(position)
        if partial is None:
            return ops.completed_only(scores.stats, k, depth.blocks[-1])
        return ops.merge_partial(scores.stats, k, partial, eps)

    def _score(
        self, depth: DepthState, program: LayerProgram, params: tuple[SiteParameters, ...], offset: int
    ) -> tuple[dict[float, BlockScores], DepthState]:
        """Phase 1 of the block of sublayer `offset`, for it and the block's sublayers after it, per key-norm eps; and
        the state that reads its sources through what phase 1 handed on (`ops.BlockStats.blocks`).
        Offset 0 is scored only at the stream's start, where sublayer 0 (one source, no parameters) reads the start
        itself: its row, computed with the next sublayer's parameters, is never read (and passes back no gradient)."""
        scores = {}
        for eps, indices, positions in program.scoring[offset]:
            blocks, bias = depth.sources()
            weights = [site_weights(params[i]) for i in indices]
            stats = ops.block_scores(blocks, [w[0] for w in weights], [w[1] for w in weights], eps, bias)
            scores[eps] = BlockScores(positions, stats)
            depth = depth.reading(stats)
        return scores, depth

    def _uses_two_phase(self, x: Tensor) -> bool:
        """Whether the mixes of stream value `x` (one call's tokens) are computed in two phases."""
        return self.two_phase and not ops.is_recording() and not ops.plain_pays(x)


@dataclass(frozen=True)
class _LayerPlan:
    """What one call of a layer computes: its program, the parameters it is handed, where it sits."""

    program: LayerProgram
    params: tuple[SiteParameters, ...]
    layout: LayerLayout


@dataclass(frozen=True)
class _LayerEntry:
    """What one call of a layer starts from: the layer and its plan for this call, the mix its first sublayer reads
    and the state it was handed (None for both where the stream starts inside the layer)."""

    forward: _DepthForward
    plan: _LayerPlan
    mix_in: Tensor | None = None
    depth: DepthState | None = None


class _LayerCall:
    """One call of one layer in progress: where it started and how far its norms got (reset when the first norm
    reads, so a recomputation starts from the same place)."""

    def __init__(self, started: _LayerEntry):
        self.started = started
        self.program, self.params = started.plan.program, started.plan.params
        self.restart()

    def restart(self) -> None:
        self.mix_in: Tensor | None = self.started.mix_in
        self.depth: DepthState | None = self.started.depth
        self.scores: dict[float, BlockScores] | None = None if self.depth is None else self.depth.scores
        self.base: Tensor | None = None  # the stream value where a block ended inside the layer (or started)
        self.cached: tuple[int, Tensor, Tensor] | None = None  # (offset, norm input, its mix)
        self.two_phase: bool | None = None  # whether its mixes are computed in two phases (decided at the first)
        self.reads: dict[int, int] = {}  # per norm module read at several offsets: how often it read so far

    def begin(self, depth: DepthState, start: Tensor) -> None:
        """The stream starts inside this layer at `start`, the value its first norm reads."""
        self.depth, self.scores, self.base, self.mix_in = depth, depth.scores, start, start

    def next_offset(self, module: nn.Module, offsets: tuple[int, ...]) -> int:
        """The offset of this read of a norm module that reads at several, in call order."""
        count = self.reads.get(id(module), 0)
        self.reads[id(module)] = count + 1
        return offsets[count % len(offsets)]


class _DepthForward:
    """A layer's `forward`, as an instance attribute over its class's (as accelerate's hooks do): the layer reads the
    depth mix and returns the next one, so every hook on the layer, the user's or a library's (FSDP2, transformers'
    output capture), sees those, while the class's forward (with transformers' checkpointing) runs in between. Where
    the layer's forward computes a stream-reading norm itself, the forward rewritten one level deep runs instead."""

    def __init__(
        self,
        runtime: DepthRuntime,
        module: nn.Module,
        plans: tuple[_LayerPlan, ...],
        container: tuple[nn.Module, str],
    ):
        self.runtime, self.module, self.plans = runtime, module, plans
        self.container = container  # the module that holds the layer, and its key there (the model: itself)
        self._body: Callable[..., Any] | None = None

    @property
    def layout(self) -> LayerLayout:
        """The layout of a layer called once per call of the model."""
        if len(self.plans) > 1:
            raise AttnResError(
                f"`{self.plans[0].layout.path}` is called at {len(self.plans)} depths (a shared layer): a pipeline "
                "stage cannot hold it."
            )
        return self.plans[0].layout

    def select(self, depth: DepthState | None) -> _LayerPlan:
        """The plan of this call: by the depth its input's state says, for a layer called at several depths."""
        if len(self.plans) == 1 or depth is None:
            return self.plans[0]
        plan = next((p for p in self.plans if p.layout.first_site == depth.next_site), None)
        if plan is None:
            raise AttnResError(
                f"`{self.plans[0].layout.path}` was called where sublayer {depth.next_site} comes next, but it holds "
                f"sublayers {[p.layout.first_site for p in self.plans]} onwards: the model's forward took another "
                "path than when it was transformed."
            )
        return plan

    def read(self, value: Tensor, offset: int) -> Tensor:
        """A norm that the layer's rewritten forward computes itself: what it reads instead of `value`."""
        call = self.runtime.current_call()
        return value if call is None else self.runtime.mix_for(call, offset, value)

    def body(self) -> Callable[..., Any]:
        if self._body is None:
            functional = [r for p in self.plans for r in p.layout.readers if r.functional]
            forward = type(self.module).forward
            self._body = rewrite_forward(self.module, self.plans[0].layout) if functional else forward
        return self._body

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_body": None}  # a rewritten forward is rebuilt where it is next called

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        local = self.runtime._local
        args, kwargs = self.runtime.enter(self, args, kwargs)
        call = local.call
        try:
            output = self.body()(self.module, *args, **kwargs)
            return self.runtime.leave(call, output)
        finally:
            local.call = None


def _forget(local: threading.local) -> None:
    """At the end of a backward: the layer call it recomputed is over."""
    local.call = local.recomputing = None


def _no_state_message(layout: LayerLayout) -> str:
    return (
        f"`{layout.path}` (sublayers {layout.first_site}-{layout.end_site - 1}) was called with a stream input that "
        "carries no depth state: a transformed model's layers read the state that the layer before them returns "
        "with its output. Call the model as a whole (or, in pipeline stages, wrap each stage with "
        "`attnres_fx.pipeline_stage`), and keep hooks and wrappers from replacing the tensor a layer returns before "
        "the next layer reads it."
    )


def _as_shape(x: Tensor, shape: torch.Size) -> Tensor:
    """`x` viewed in `shape` (a layer may flatten the stream); no op at all in the usual case, where it has it."""
    return x if x.shape == shape else x.reshape(shape)


def _get(args: tuple, kwargs: dict[str, Any], where: int | str) -> Any:
    return args[where] if isinstance(where, int) else kwargs[where]


def _put(args: tuple, kwargs: dict[str, Any], where: int | str, value: Tensor) -> tuple[tuple, dict[str, Any]]:
    if isinstance(where, int):
        return (*args[:where], value, *args[where + 1 :]), kwargs
    return args, {**kwargs, where: value}
