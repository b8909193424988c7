"""The public verbs: `transform`, `plan`, `depth_weights`.

transform = capture -> find the stream -> plan blocks -> rewrite -> graph passes -> AttnResModel.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .capture import (
    CallKey,
    CapturedGraph,
    capture,
    split_inputs,
    takes_use_cache,
    use_capturable_experts,
    with_capture_defaults,
)
from .errors import AlreadyTransformedError, AttnResError, NoResidualStreamError, UnnormalizedReadError
from .inputs import ExampleInputs, as_call, default_example_inputs
from .module import AttnResModel
from .passes import DEFAULT_PASSES, apply_passes, check_pass_names
from .plan import Plan, make_plan
from .rewrite import rewrite
from .stream import Stream, find_stream


def transform(
    model: nn.Module,
    example_inputs: ExampleInputs | None = None,
    *,
    num_blocks: int = 8,
    block_size: int | None = None,
    allow_unnormalized_reads: bool = False,
    passes: Sequence[str] = DEFAULT_PASSES,
) -> AttnResModel:
    """Apply Block AttnRes to a pre-norm residual model, without editing its code.

    Args:
        model: any module whose forward runs a pre-norm residual stream (HF transformers, timm,
            hand-written). The returned module shares its parameters; use it from now on.
        example_inputs: one call's inputs: a tuple of positional args, a dict of keyword args or a
            tensor. Built from the config for HF text models and timm models when None.
        num_blocks: about how many blocks to cut the residual sublayers into.
        block_size: residual sublayers per block (1 = Full AttnRes); `ceil(sublayers / num_blocks)`
            when None.
        allow_unnormalized_reads: transform even where the stream is read without a norm (post-norm
            models, raw hidden-state outputs); the fresh model then no longer computes the original
            function.
        passes: the graph optimisations to apply (all by default; `()` = the plain rewrite).

    Returns:
        An `AttnResModel`: call it like the original; its state dict holds the original keys plus
        `attnres.*`. Compile it with `torch.compile` as usual.
    """
    _refuse_transformed(model)
    check_pass_names(passes)
    if num_blocks < 1 or (block_size is not None and block_size < 1):
        raise AttnResError(f"num_blocks and block_size must be >= 1; got num_blocks={num_blocks}, block_size={block_size}.")
    args, kwargs = as_call(example_inputs) if example_inputs is not None else default_example_inputs(model)
    key, tensors = split_inputs(args, with_capture_defaults(kwargs, takes_use_cache(model)), model.training)
    _report(use_capturable_experts(model))
    captured = capture(model, key, tensors)
    stream = _checked_stream(captured, model, allow_unnormalized_reads)
    branches, eps = [s.branch_modules for s in stream.sites], [s.eps for s in stream.sites]
    plan = make_plan(branches, eps, stream.final_eps, num_blocks, block_size, captured.opaque_paths)
    _report(_opaque_message(type(model).__name__, captured.opaque_paths))
    _rewrite_and_optimise(captured, stream, plan, passes)
    start = stream.start.meta["val"]
    device = next((p.device for p in model.parameters()), start.device)
    build = functools.partial(_build_graph, allow_unnormalized_reads=allow_unnormalized_reads, passes=tuple(passes))
    tmodel = AttnResModel(model, plan, _concrete(start.shape[-1]), device, start.dtype, build)
    tmodel.add_graph(key, captured, optimized=True)
    return tmodel


def plan(model: nn.Module) -> Plan:
    """What `transform` found and rewrote: the ordered sites and the final aggregation."""
    if not isinstance(model, AttnResModel):
        raise AttnResError(f"plan() takes a model returned by attnres_fx.transform; got {type(model).__name__}.")
    return model.attnres_plan


@torch.no_grad()
def depth_weights(model: nn.Module, *args: Any, per_token: bool = False, **kwargs: Any) -> dict[str, Tensor]:
    """Each site's softmax weights over its sources for one call of the model.

    Returns a dict from site name (`site_1`, ..., `final`) to weights of shape [num_sources]
    (averaged over tokens) or, with `per_token=True`, [num_sources, *token dims]. The sources are
    ordered as in the paper: stream start, completed blocks, partial sum.
    """
    records = site_records(model, args, kwargs)
    return {name: (r.weights if per_token else r.weights.flatten(1).mean(1)) for name, r in records.items()}


def site_records(model: AttnResModel, args: tuple, kwargs: dict[str, Any]) -> dict[str, ops.SiteRecord]:
    """Run the plain rewritten graph once and return what each parametrised site computed, by name."""
    names = [s.name for s in plan(model).parametrised]
    with ops.recording() as records:
        model.run_graph(args, kwargs, optimized=False)
    if len(records) != len(names):
        raise AttnResError(f"expected {len(names)} depth-attention sites in the graph, saw {len(records)}.")
    return dict(zip(names, records))


# --- pipeline stages -------------------------------------------------------------------------------


def _build_graph(
    original: nn.Module, key: CallKey, tensors: list[Tensor], plan: Plan, optimized: bool, *, allow_unnormalized_reads: bool, passes: tuple[str, ...]
) -> CapturedGraph:
    """Capture and rewrite the graph for a new call structure or mode, following the existing plan."""
    captured = capture(original, key, tensors)
    stream = _checked_stream(captured, original, allow_unnormalized_reads)
    found = [s.branch_modules for s in stream.sites]
    if found != [s.branch for s in plan.sites]:
        mode = "training" if key.training else "eval"
        raise AttnResError(
            f"the graph captured for this call ({mode} mode) has a residual chain of {len(found)} sublayers "
            f"that differs from the one transformed ({len(plan.sites)} sublayers); the model's forward "
            "takes a different path for these inputs. Transform with example inputs of this kind instead."
        )
    _rewrite_and_optimise(captured, stream, plan, passes if optimized else ())
    return captured


def _rewrite_and_optimise(captured: CapturedGraph, stream: Stream, plan: Plan, passes: Sequence[str]) -> None:
    rewrite(captured, stream, plan)
    apply_passes(captured.gm, passes)


def _checked_stream(captured: CapturedGraph, model: nn.Module, allow_unnormalized_reads: bool) -> Stream:
    name = type(model).__name__
    stream = find_stream(captured.gm.graph)
    if not stream.sites:
        opaque = captured.opaque_paths
        hidden = f" Note: export failed inside {', '.join(opaque[:3])}, which were kept opaque, so their insides were not searched." if opaque else ""
        raise NoResidualStreamError(_no_stream_message(name, stream) + hidden)
    if stream.unnormalized_reads and not allow_unnormalized_reads:
        first = stream.unnormalized_reads[:3]
        where = "; ".join(f"stream value {r.stream_index} read by `{r.reader.target}` in `{r.module or name}`" for r in first)
        raise UnnormalizedReadError(
            f"{name}: found a pre-norm residual stream of {len(stream.sites)} sublayers, but the stream is also read "
            f"without a norm ({len(stream.unnormalized_reads)} reads: {where}). AttnRes feeds such readers the "
            "depth mix, which is the stream divided by the number of sources at init, so the transformed model "
            "would not compute the original function. Typical causes: returning hidden states "
            "(output_hidden_states=True), a norm after the branch, a post-norm layer. Call the model without "
            "those outputs, or pass allow_unnormalized_reads=True to transform anyway."
        )
    return stream


def _no_stream_message(name: str, stream: Stream) -> str:
    raw = [path for _, path in stream.unnormalized_adds]
    if raw:
        where = ", ".join(f"`{p or name}`" for p in raw[:3])
        return (
            f"{name}: found {len(raw)} residual adds `h + f(h)` (first in {where}) but in none of them does the "
            "branch read the stream through a norm: this is a post-norm model (norm after the add, like BERT) "
            "or one that normalises the branch output instead of its input (like OLMo2). At zero init AttnRes "
            "would change such a model's function, so it is refused: attnres_fx supports pre-norm residual "
            "models (`h + f(norm(h))`)."
        )
    return (
        f"{name}: found no residual add `h + f(norm(h))` in the captured graph, so there is no residual stream to "
        "rewrite. attnres_fx transforms pre-norm residual models (transformers, ViTs, MLP-mixers...); check that "
        "the example inputs run the layers you expect."
    )


def _opaque_message(name: str, paths: tuple[str, ...]) -> str | None:
    if not paths:
        return None
    return (
        f"{name}: torch.export could not trace inside {len(paths)} submodules ({', '.join(paths[:3])}"
        f"{', ...' if len(paths) > 3 else ''}), typically data-dependent routing; they run behind an opaque custom "
        "op (exact forward and backward, recomputed in the backward) and torch.compile cannot fuse inside them."
    )


def _report(message: str | None) -> None:
    if message:
        warnings.warn(f"attnres_fx: {message}", stacklevel=3)


def _concrete(size: int | torch.SymInt) -> int:
    """The example's value of a dim that export left symbolic."""
    return size.node.hint if isinstance(size, torch.SymInt) else size


def _refuse_transformed(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if isinstance(module, AttnResModel):
            where = f"submodule `{path}`" if path else "the model"
            raise AlreadyTransformedError(
                f"{where} ({type(module).__name__}) was already transformed by attnres_fx; transforming again would "
                "stack depth attention on depth attention. Transform the original model once."
            )
