"""The public verbs: `transform`, `plan`, `depth_weights`.

transform = capture -> find the stream -> find its layers -> plan blocks -> install: hooks on the model's own modules
(`hooks.py`), with a layer's forward rewritten one level deep where it computes a stream-reading norm itself
(`passes/functional_norms.py`). The model the user gets is their own, with an `attnres` submodule.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from . import cpu_kernels, hf, ops
from .capture import CapturedGraph, capture, split_inputs
from .errors import (
    AlreadyTransformedError,
    AttnResError,
    NoResidualStreamError,
    UnfollowableStreamError,
    UnnormalizedReadError,
)
from .hooks import DepthRuntime
from .inputs import ExampleInputs, as_call, default_example_inputs
from .layers import (
    LayerLayout,
    ModuleCall,
    find_layers,
    find_stream_start,
    innermost_common_call,
    recording_module_calls,
)
from .parallel import refuse_distributed
from .parameters import AttnResParameters, AttnResStreams
from .passes import DEFAULT_PASSES, check_pass_names
from .plan import PARAMETER_PREFIX, Plan, SkippedStream, make_plan
from .stream import RawResidual, Stream, find_streams

M = TypeVar("M", bound=nn.Module)


def transform(
    model: M,
    example_inputs: ExampleInputs | None = None,
    *,
    num_blocks: int = 8,
    block_size: int | None = None,
    allow_unnormalized_reads: bool = False,
    passes: Sequence[str] = DEFAULT_PASSES,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> M:
    """Apply Block AttnRes to a pre-norm residual model, without editing its code.

    Args:
        model: any module whose forward runs a pre-norm residual stream (HF transformers, timm, hand-written).
        example_inputs: one call's inputs: a tuple of positional args, a dict of keyword args or a tensor. Built
            from the config for HF text, vision and speech models and timm models when None.
        num_blocks: about how many blocks to cut the residual sublayers into.
        block_size: residual sublayers per block (1 = Full AttnRes); `ceil(sublayers / num_blocks)` when None.
        allow_unnormalized_reads: transform even where the stream is read without a norm (post-norm models, raw
            hidden-state outputs); the fresh model then no longer computes the original function.
        passes: the depth-attention optimisations to apply (all by default; `()` = one plain softmax per sublayer).
        filter_fn: `filter_fn(module, path)` for the module whose forward holds a stream's residual adds (an
            encoder, a decoder, a vision tower, a stage): transform that stream only where it returns True. Every
            pre-norm stream by default.

    Returns:
        `model` itself, modified in place: its own forward and modules run at every call, with an `attnres`
        submodule (state-dict keys `attnres.*`; `attnres.stream_<k>.*` where several streams are transformed) and
        hooks on the modules each stream crosses. A stream that cannot be transformed is left exactly as it was,
        with a warning, and `attnres_fx.plan(model)` says why.
    """
    _refuse_transformed(model)
    refuse_distributed(model)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        options = dict(num_blocks=num_blocks, block_size=block_size, passes=passes, filter_fn=filter_fn)
        return _transform_compiled(model, example_inputs, allow_unnormalized_reads=allow_unnormalized_reads, **options)
    check_pass_names(passes)
    if num_blocks < 1 or (block_size is not None and block_size < 1):
        raise AttnResError(
            f"num_blocks and block_size must be >= 1; got num_blocks={num_blocks}, block_size={block_size}."
        )
    if PARAMETER_PREFIX in model._modules or hasattr(model, PARAMETER_PREFIX):
        raise AttnResError(
            f"{type(model).__name__} already has an attribute `{PARAMETER_PREFIX}`, the name under which attnres_fx "
            "registers its parameters; rename that attribute before transforming."
        )
    args, kwargs = as_call(example_inputs) if example_inputs is not None else default_example_inputs(model)
    kwargs = hf.without_kv_cache(kwargs, hf.keeps_kv_cache(model))
    _report(hf.use_capturable_experts(model))
    key, tensors = split_inputs(args, kwargs, model.training)
    with recording_module_calls(model) as calls:
        captured = capture(model, key, tensors)
    streams = _found_streams(captured, type(model).__name__)
    chosen, skipped = _choose_streams(model, streams, calls, filter_fn, allow_unnormalized_reads)
    several = len(chosen) > 1
    device = next((p.device for p in model.parameters()), streams[0].start.meta["val"].device)
    options = dict(num_blocks=num_blocks, block_size=block_size, two_phase="two_phase" in passes, device=device)
    if options["two_phase"] and device.type == "cpu":  # built here, so that a compile traces the kernel's operator
        cpu_kernels.build(streams[0].start.meta["val"].dtype)
    runtimes = [
        _runtime(stream, layers, calls, f"stream_{k}" if several else "", **options)
        for k, (stream, layers) in enumerate(chosen)
    ]
    stream_params = [runtime.params for runtime in runtimes]
    prepared = [runtime.prepare(model) for runtime in runtimes]  # every refusal before the model is touched
    for runtime, installation in zip(runtimes, prepared):
        runtime.apply(model, installation)
    model_plan = Plan(tuple(p.plan for p in stream_params), tuple(skip for skip, _ in skipped))
    attnres = AttnResStreams(stream_params) if several else stream_params[0]
    attnres.model_plan = model_plan
    model.add_module(PARAMETER_PREFIX, attnres)
    hf.record_settings(model, model_plan, num_blocks, block_size)
    for skip, _ in skipped:
        _report(f"{type(model).__name__}: left `{skip.root or 'the model'}` ({skip.sublayers} sublayers) as it was: "
                f"{skip.reason}")
    return model


def _runtime(
    stream: Stream,
    layers: tuple[LayerLayout, ...],
    calls: dict[str, list[ModuleCall]],
    name: str,
    *,
    num_blocks: int,
    block_size: int | None,
    two_phase: bool,
    device: torch.device,
) -> DepthRuntime:
    """One stream's plan, parameters and hooks (not yet installed)."""
    branches, eps = [s.branch_modules for s in stream.sites], [s.eps for s in stream.sites]
    splan = make_plan(branches, eps, stream.final_eps, num_blocks, block_size, _rewritten(layers), _root(stream), name)
    start = stream.start.meta["val"]
    params = AttnResParameters(splan, _concrete(start.shape[stream.feature_dim]), device, start.dtype)
    start_module = find_stream_start(layers, calls)
    readers = stream.final_reader_paths
    return DepthRuntime(splan, layers, params, start_module, readers, two_phase, stream.feature_dim)


def from_pretrained(model_class: Any, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a transformed Hugging Face model that `save_pretrained` wrote: the original weights through
    `model_class.from_pretrained(path, **kwargs)`, then the transform with the saved settings, then `attnres.*`.

        model = attnres_fx.from_pretrained(AutoModelForCausalLM, "out/checkpoint")
    """
    model = model_class.from_pretrained(path, **kwargs)
    settings = hf.saved_settings(model)
    if settings is None:
        raise AttnResError(
            f"{path} holds no AttnRes settings (`{hf.SETTINGS_KEY}` in config.json): it was not saved from a "
            f"transformed model. Load it with `{getattr(model_class, '__name__', model_class)}.from_pretrained` and "
            "transform it."
        )
    if "streams" in settings:  # several streams: the same options, the same streams
        roots = set(settings["streams"])
        options = dict(num_blocks=settings["num_blocks"], block_size=settings["block_size"])
        model = transform(model, filter_fn=lambda module, path: path in roots, **options)
    else:
        model = transform(model, block_size=settings["block_size"])
    missing, unexpected = model.load_state_dict(hf.attnres_tensors(path), strict=False)
    absent = [k for k in missing if k.startswith(PARAMETER_PREFIX + ".")]
    if absent or unexpected:
        raise AttnResError(
            f"{path}: the checkpoint's AttnRes tensors do not match this model (missing {absent[:3]}, "
            f"unexpected {unexpected[:3]})."
        )
    return model


def plan(model: nn.Module) -> Plan:
    """What `transform` found and rewrote: each transformed stream's ordered sites and final aggregation, and the
    streams left as they were, with why."""
    params = _attnres_parameters(model)
    if params is None or params.model_plan is None:
        raise AttnResError(f"plan() takes a model returned by attnres_fx.transform; got {type(model).__name__}.")
    return params.model_plan


@torch.no_grad()
def depth_weights(model: nn.Module, *args: Any, per_token: bool = False, **kwargs: Any) -> dict[str, Tensor]:
    """Each site's softmax weights over its sources for one call of the model.

    Returns a dict from site name (`site_1`, ..., `final`; `stream_0.site_1`, ... with several streams) to weights
    of shape [num_sources] (averaged over tokens) or, with `per_token=True`, [num_sources, *token dims]. The
    sources are ordered as in the paper: stream start, completed blocks, partial sum.
    """
    records = site_records(model, args, kwargs)
    return {name: (r.weights if per_token else r.weights.flatten(1).mean(1)) for name, r in records.items()}


def site_records(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, ops.SiteRecord]:
    """Run the model once, each site computed the plain way, and return what each parametrised site computed."""
    names = [s.query.removeprefix(PARAMETER_PREFIX + ".").removesuffix(".query") for s in plan(model).parametrised]
    with ops.recording() as records:
        model(*args, **kwargs)
    if len(records) != len(names):
        raise AttnResError(f"expected {len(names)} depth-attention sites in one call, saw {len(records)}.")
    return dict(zip(names, records))


def _found_streams(captured: CapturedGraph, name: str) -> list[Stream]:
    streams, raw = find_streams(captured.gm.graph)
    if not streams:
        opaque = captured.opaque_paths
        hidden = (
            f" Note: export failed inside {', '.join(opaque[:3])}, which were kept opaque, so their insides were "
            "not searched."
            if opaque
            else ""
        )
        raise NoResidualStreamError(_no_stream_message(name, raw) + hidden)
    return streams


def _choose_streams(
    model: nn.Module,
    streams: list[Stream],
    calls: dict[str, list[ModuleCall]],
    filter_fn: Callable[[nn.Module, str], bool] | None,
    allow_unnormalized_reads: bool,
) -> tuple[list[tuple[Stream, tuple[LayerLayout, ...]]], list[tuple[SkippedStream, AttnResError]]]:
    """The streams to transform with their layers, and those left as they were (with the error each would raise
    alone). Where none is left to transform, the longest one's error."""
    name = type(model).__name__
    chosen, skipped = [], []
    for stream in streams:
        root = _root(stream)
        if filter_fn is not None and not filter_fn(model.get_submodule(root), root):
            error = AttnResError(f"{name}: filter_fn chose none of the {len(streams)} pre-norm streams found.")
            skipped.append((SkippedStream(root, len(stream.sites), _NOT_CHOSEN), error))
            continue
        if stream.unnormalized_reads and not allow_unnormalized_reads:
            error = UnnormalizedReadError(_raw_read_message(name, stream))
            skipped.append((SkippedStream(root, len(stream.sites), _raw_read_reason(stream)), error))
            continue
        layers = find_layers(stream, calls)
        if isinstance(layers, str):
            error = UnfollowableStreamError(_unfollowable_message(name, stream, layers))
            skipped.append((SkippedStream(root, len(stream.sites), layers), error))
            continue
        chosen.append((stream, layers))
    if not chosen:  # the longest stream's error, among those filter_fn chose
        considered = [s for s in skipped if s[0].reason != _NOT_CHOSEN] or skipped
        raise max(considered, key=lambda s: s[0].sublayers)[1]
    return chosen, skipped


_NOT_CHOSEN = "not chosen by filter_fn"


def _root(stream: Stream) -> str:
    """The module whose forward holds the stream: the innermost module call that holds all its residual adds."""
    return innermost_common_call([s.add for s in stream.sites])[0]


def _raw_read_reason(stream: Stream) -> str:
    r = stream.unnormalized_reads[0]
    where = r.module or "the model"
    return f"{_stream_value(r.stream_index)} is read without a norm by `{r.reader.target}` in `{where}`"


def _raw_read_message(name: str, stream: Stream) -> str:
    """What reads the stream without a norm, and what to do: only a returned value is the user's to choose."""
    reads = stream.unnormalized_reads
    returned = [r for r in reads if r.reader.op == "output"]
    inside = [r for r in reads if r.reader.op != "output"]
    head = f"{name}: found a pre-norm residual stream of {len(stream.sites)} sublayers, "
    if inside:
        r = inside[0]
        return head + (
            f"but inside the model {_stream_value(r.stream_index)} is also read without a norm, by "
            f"`{r.reader.target}` in `{r.module or name}` ({len(inside)} such reads). AttnRes would hand that op a "
            "depth mix (at init the stream over its number of sources) instead of the stream, so the transformed "
            "model would not compute the original function; attnres_fx transforms models whose stream is read only "
            "through norms (pre-norm)."
        )
    values = ", ".join(_stream_value(r.stream_index) for r in returned[:3])
    return head + (
        f"and this call returns stream values without a norm ({values}{', ...' if len(returned) > 3 else ''}; "
        "hidden states, e.g. `output_hidden_states=True`). Transformed, such outputs are depth mixes where they leave "
        "a layer (at init the stream over its number of sources), the block's partial sum inside one. Transform with "
        "an example call that does not return them, or pass allow_unnormalized_reads=True to accept mixes as those "
        "outputs."
    )


def _unfollowable_message(name: str, stream: Stream, reason: str) -> str:
    return (
        f"{name}: found a pre-norm residual stream of {len(stream.sites)} sublayers, but {reason}. A transformed "
        "model runs its own forward and modules, made AttnRes by hooks where the stream enters and leaves a module "
        "and where a norm reads it, so the stream must run through module calls in depth order. Transform the "
        "module that holds the residual layers (for example the decoder), or write the model so that each norm is "
        "a module."
    )


def _rewritten(layers: tuple[LayerLayout, ...]) -> tuple[str, ...]:
    """The layers whose forward computes a stream-reading norm itself: rewritten one level deep."""
    return tuple(dict.fromkeys(layer.path for layer in layers if any(r.functional for r in layer.readers)))


def _stream_value(index: int) -> str:
    return "the stream's start" if index == 0 else f"the stream after sublayer {index - 1}"


def _no_stream_message(name: str, raw: list[RawResidual]) -> str:
    if raw:
        r = raw[0]
        if r.post_norm:
            kind = "the sum is normalised after the add (post-norm)"
        elif r.branch_normed:
            kind = "the branch output is normalised before the add, not its input"
        else:
            kind = "no norm comes before it"
        return (
            f"{name}: found {len(raw)} residual adds `h + f(h)`, none of them pre-norm. In the first, in "
            f"`{r.module or name}`, the branch reads h first through `{r.first_read}` in "
            f"`{r.first_read_module or name}`, and {kind}. At zero init AttnRes would change such a model's "
            "function, so it is refused: attnres_fx transforms pre-norm residual models (`h + f(norm(h))`)."
        )
    return (
        f"{name}: found no residual add `h + f(norm(h))` in the captured graph, so there is no residual stream to "
        "rewrite. attnres_fx transforms pre-norm residual models (transformers, ViTs, MLP-mixers...); check that "
        "the example inputs run the layers you expect."
    )


def _report(message: str | None) -> None:
    if message:
        warnings.warn(f"attnres_fx: {message}", stacklevel=3)


def _concrete(size: int | torch.SymInt) -> int:
    """The example's value of a dim that export left symbolic."""
    return size.node.hint if isinstance(size, torch.SymInt) else size


def _attnres_parameters(model: nn.Module) -> AttnResParameters | AttnResStreams | None:
    return next((m for m in model.modules() if isinstance(m, (AttnResParameters, AttnResStreams))), None)


def _transform_compiled(compiled: nn.Module, example_inputs: ExampleInputs | None, **options: Any) -> nn.Module:
    """A model already wrapped by torch.compile: transform the model it wraps, in place, and keep the wrapper (and
    its compile options), so state-dict keys stay the model's own."""
    transform(compiled._orig_mod, example_inputs, **options)
    return compiled


def _refuse_transformed(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if isinstance(module, (AttnResParameters, AttnResStreams)):
            owner = path.rpartition(".")[0]
            where = f"submodule `{owner}`" if owner else "the model"
            raise AlreadyTransformedError(
                f"{where} was already transformed by attnres_fx; transforming again would stack depth attention on "
                "depth attention. Transform the original model once."
            )
