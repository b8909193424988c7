"""The depth-attention functions that rewritten graphs call.

They live at module level because a GraphModule's generated code refers to them as globals.
Statistics (RMS, logits, softmax) are computed in fp32 whatever the model's dtype; the result is
cast back to the dtype of the sources.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from . import cpu_kernels


@dataclass(frozen=True)
class SiteRecord:
    """What one depth-attention site computed, for analysis (`attnres_fx.depth_weights`, the demo)."""

    weights: Tensor  # [num_sources, *token dims], fp32
    sources: list[Tensor]  # stream start, completed blocks, partial sum (the last source is always the
    # running sum of the current or just-completed block)


if importlib.util.find_spec("triton") is not None:
    from . import kernels as _kernels
else:  # a torch build without triton: the torch implementation below is the only one
    _kernels = None

# Set by `recording()`; the plain op appends a SiteRecord for each site it computes.
_record: list[SiteRecord] | None = None


def inverse_rms(x: Tensor, eps: float) -> Tensor:
    """1 / RMS(x) over the last dim, in fp32, keeping the dim (shape [..., 1])."""
    xf = x.float()
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def reshape_like(x: Tensor, like: Tensor) -> Tensor:
    """`x` in the shape of `like`: a stream flattened inside a layer ([B*T, d]) against its [B, T, d] sources."""
    return x.reshape(like.shape)


def depth_attention(
    sources: list[Tensor], query: Tensor, key_weight: Tensor, eps: float, bias: Tensor | None = None
) -> Tensor:
    """Softmax attention over depth, the plain way: stack the sources and attend.

    h = sum_i softmax_i(q . (g * rmsnorm(v_i)) + bias_i) * v_i, per token; `bias` [sources] masks placeholder
    slots with -inf (see `state.py`). With nothing to differentiate or trace, on CPU tensors the C++ kernel computes
    it in one call.
    """
    if _record is None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        out = cpu_kernels.mix(sources, query, key_weight, bias, eps)
        if out is not None:
            return out
    values = torch.stack(sources).float()
    keys = values * inverse_rms(values, eps) * key_weight.float()
    logits = (keys * query.float()).sum(-1)
    if bias is not None:
        logits = logits + bias.view(-1, *(1,) * (logits.dim() - 1))
    weights = logits.softmax(0)
    if _record is not None:
        _record.append(SiteRecord(weights.detach(), [s.detach() for s in sources]))
    return (weights.unsqueeze(-1) * values).sum(0).to(sources[0].dtype)


# Without autograd, a site's plain mix is one C++ call over its sources, where the two phases are two calls (phase 1
# at the block's opening, the merge) and a dozen torch ops around them per sublayer, each costing more than its math
# when a call holds few tokens: decoding a token at a time went from 1.39-1.46x the original's time per token to
# 1.23-1.27x (`benchmarks.generate`). Phase 1's one read of each block for all of the block's sublayers wins from many
# tokens on: eager forwards of a 32-layer Llama (d=256, 8 blocks of 8 sublayers) took 0.92-0.97x the two phases' time
# on the plain mix up to 256 tokens, 1.11x at 1024.
_PLAIN_TOKENS = 64


def plain_pays(x: Tensor) -> bool:
    """Whether the plain form computes the depth mixes of stream value `x` at less cost than the two phases: with
    nothing to differentiate or trace, on CPU tensors (the kernel's), for a few tokens."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():  # first: nothing more for Dynamo to trace
        return False
    return x.numel() <= _PLAIN_TOKENS * x.shape[-1] and x.is_cpu


def is_recording() -> bool:
    """Whether a `recording()` block is active: sites are then computed the plain way, one record each."""
    return _record is not None


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
#
# Both phases are autograd Functions with hand-written backwards, so that what is kept for the
# backward is chosen here, not left to autograd: the per-token softmax statistics (m, l), the
# sources and outputs the graph keeps anyway, and nothing of shape [tokens, J, d]. The cheap parts
# (logits, exponentials) are recomputed. The running max m only keeps exp() in range: the result
# does not depend on it, so it carries no gradient. Phase 1's forward and backward are computed by
# kernels: the Triton ones (`kernels.py`) for CUDA tensors, the C++ one (`cpu_kernels.py`) for CPU
# tensors; the merge's too, in eager mode only: under torch.compile Inductor fuses the torch code of
# the merge into the kernel of the norm that reads its output (one pass over the partial sum instead
# of a write and a read of the mix, which an opaque kernel would cost). Everywhere else (other
# dtypes, no triton or no C++ compiler) the torch code below computes.

class BlockStats(NamedTuple):
    """Phase 1 of a block's J sublayers over its completed blocks."""

    m: Tensor  # [..., J] the running max of the logits, fp32 (no gradient: the result does not depend on it)
    l: Tensor  # [..., J] the sum of the exponentials, fp32
    # per sublayer its weighted sum [..., d], in the blocks' dtype: a tensor of its own, so that its gradient is too
    # (slices of one [..., J, d] tensor would each get a full-size zero-filled gradient, summed by autograd)
    rows: tuple[Tensor, ...]
    weight: Tensor  # [J, d] q * g per sublayer, fp32: the merge scores the partial sum with it too
    # the blocks as later phase-1 calls must read them: aliases through which those calls pass their gradients back to
    # this one, whose kernel adds them to its own (autograd would sum a block's gradients from every call that read
    # it in one n-ary sum, which compiled is a kernel per block count)
    blocks: tuple[Tensor, ...]


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def block_scores(
    blocks: list[Tensor], queries: list[Tensor], key_weights: list[Tensor], eps: float, bias: Tensor | None = None
) -> BlockStats:
    """Phase 1: score the J sublayers of a block against all completed blocks at once (statistics in fp32), each
    block's keys RMS-normed with `eps` as phase 1 reads it. `bias` [blocks], if given, is added to every logit of a
    block: -inf masks a placeholder slot."""
    weight = torch.stack([_as_float(q) * _as_float(g) for q, g in zip(queries, key_weights)])  # [J, d]
    if not torch.is_grad_enabled():  # nothing to keep; and Dynamo (2.14) mis-binds the inputs of a Function with
        # *args when grad mode is off
        stats = _phase_one(weight, bias, blocks, eps, _operator_pays(blocks[0]))
        return BlockStats(*stats, weight, tuple(blocks))
    m, l, *outputs = _block_scores_call(weight, bias, eps, *blocks)
    return BlockStats(m, l, tuple(outputs[: len(queries)]), weight, tuple(outputs[len(queries) :]))


# Compiled without a backward (inference, decoding), the C++ phase-1 operator costs a fixed ~15 us a call (the
# dispatcher and its Python wrapper), where Inductor's code for phase 1 fuses with its readers: decoding one token at a
# time, it made a step 1.24x the original's against 1.11x (`benchmarks.generate --compiled`). From this many tokens a
# call on, its one pass over the blocks runs as fast as Inductor's code (the suite's small size, 512 tokens), and it
# compiles once for every block count (Inductor's code is a kernel per block count: the suite's inference compile went
# from 2.09x the original's to 1.27x).
_COMPILED_OPERATOR_TOKENS = 128


def _operator_pays(block: Tensor) -> bool:
    """Whether phase 1 without a backward runs on the C++ operator (where it handles the blocks)."""
    return not torch.compiler.is_compiling() or block.numel() >= _COMPILED_OPERATOR_TOKENS * block.shape[-1]


def _as_float(x: Tensor) -> Tensor:
    """`x` in fp32: itself where it is (no dispatch at all, which at decode sizes costs more than the math)."""
    return x if x.dtype == torch.float32 else x.float()


def merge_partial(stats: BlockStats, k: int, partial: Tensor, eps: float) -> Tensor:
    """Phase 2: add the partial sum as one more source to sublayer k's phase-1 result (online softmax)."""
    m, l, o, weight = stats.m[..., k], stats.l[..., k], stats.rows[k], stats.weight[k]
    if not torch.is_grad_enabled():  # decoding: nothing to keep, and a Function call costs more than the merge
        return _merge(m, l, o, partial, weight, eps)
    return _merge_call(m, l, o, partial, weight, eps)


def completed_only(stats: BlockStats, k: int, like: Tensor) -> Tensor:
    """Phase 2 for a block's first sublayer: no partial sum yet, phase 1 is the whole answer."""
    if not torch.is_grad_enabled():
        return _normalize(stats.l[..., k], stats.rows[k], like.dtype)
    return _normalize_call(stats.l[..., k], stats.rows[k], like.dtype)


def _on_kernels(x: Tensor) -> bool:
    """Whether the Triton kernels compute for `x`: CUDA tensors of the dtypes they handle, triton installed."""
    return _kernels is not None and x.is_cuda and x.dtype in _KERNEL_DTYPES


def _merge_kernels(partial: Tensor, *others: Tensor) -> ModuleType | None:
    """The kernels that compute the merge, in eager mode only (compiled, Inductor fuses its torch code with the norm
    that follows): the Triton ones for CUDA tensors, the C++ one for CPU tensors (of one dtype with `others`); None:
    the torch code."""
    if torch.compiler.is_compiling():
        return None
    if _on_kernels(partial):
        return _kernels
    return cpu_kernels if cpu_kernels.handles(partial, *others) else None


def _keys_dot(values: Tensor, weight: Tensor) -> Tensor:
    """values [..., d] . weight [J, d] -> [..., J], written so that Inductor fuses it into one read."""
    return (values.unsqueeze(-2) * weight).sum(-1)


def _weight_grad(grad_logits: Tensor, values: Tensor) -> Tensor:
    """Sum over tokens of grad_logits[..., J] (x) values[..., d] -> [J, d] (fp32), one matmul in the values' dtype."""
    grad = grad_logits.flatten(0, -2).t().to(values.dtype)
    return torch.matmul(grad, values.flatten(0, -2)).float()


def _phase_one(
    weight: Tensor, bias: Tensor | None, blocks: Sequence[Tensor], eps: float, cpu_kernel: bool = True
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """Phase 1's forward: logits per completed block, then the online statistics over all of them (on CPU tensors by
    the C++ kernel, unless `cpu_kernel` is False); (m, l, the weighted sum of each sublayer)."""
    if _on_kernels(blocks[0]):
        m, l, o = _kernels.phase_one(weight, list(blocks), eps, bias)
        return m, l, o.unbind(-2)
    if cpu_kernel and cpu_kernels.handles(*blocks):
        return cpu_kernels.phase_one(weight, bias, list(blocks), eps)
    values = [b.float() for b in blocks]
    logits = [_keys_dot(v, weight) * inverse_rms(v, eps) + _bias(bias, i) for i, v in enumerate(values)]
    m = functools.reduce(torch.maximum, logits)
    exps = [torch.exp(x - m) for x in logits]
    weighted = functools.reduce(torch.add, (e.unsqueeze(-1) * v.unsqueeze(-2) for e, v in zip(exps, values)))
    return m, functools.reduce(torch.add, exps), weighted.to(blocks[0].dtype).unbind(-2)


def _phase_one_grads(
    weight: Tensor,
    bias: Tensor | None,
    m: Tensor,
    blocks: Sequence[Tensor],
    eps: float,
    grad_l: Tensor,
    grad_rows: Sequence[Tensor],
    later: Sequence[Tensor | None],
) -> tuple[Tensor, list[Tensor]]:
    """Phase 1's backward: gradients of (weight, each block), given those of (l, each row) and those that later
    phase-1 calls passed back for each block, added to the blocks'."""
    if cpu_kernels.handles(*blocks):
        return cpu_kernels.phase_one_backward(weight, bias, m, list(blocks), eps, grad_l, list(grad_rows), list(later))
    grad_o = torch.stack(grad_rows, -2)
    if _on_kernels(blocks[0]):
        grad_blocks, coef = _kernels.phase_one_backward(weight, m, list(blocks), eps, grad_l, grad_o, bias)
        grad_weight = functools.reduce(torch.add, (_weight_grad(c, b) for c, b in zip(coef, blocks)))
    else:
        grads = [_source_grads(b, eps, _bias(bias, i), weight, m, grad_l, grad_o) for i, b in enumerate(blocks)]
        grad_weight = functools.reduce(torch.add, (g[1] for g in grads))
        grad_blocks = [g[0] for g in grads]
    return grad_weight, [g if x is None else g + x for g, x in zip(grad_blocks, later)]


def _bias(bias: Tensor | None, i: int) -> Tensor | float:
    return 0.0 if bias is None else bias[i]


class _BlockScores(torch.autograd.Function):
    """Phase 1. Inputs (weight [J, d], bias [blocks] or None, the key norm's eps, *blocks); outputs (m, l, *rows of o,
    *blocks): the blocks handed on, for later phase-1 calls to read (`BlockStats.blocks`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, weight: Tensor, bias: Tensor | None, eps: float, *blocks: Tensor
    ) -> tuple[Tensor, ...]:
        m, l, rows = _phase_one(weight, bias, blocks, eps)
        ctx.save_for_backward(weight, bias, m, *blocks)
        ctx.eps = eps
        ctx.mark_non_differentiable(m)
        ctx.set_materialize_grads(False)  # no gradient from later calls: None, not zeros to add
        return m, l, *rows, *blocks

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, _grad_m: Tensor, grad_l: Tensor | None, *grads: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        weight, bias, m, *blocks = ctx.saved_tensors
        J = weight.shape[0]
        grad_l = torch.zeros_like(m) if grad_l is None else grad_l
        grad_rows = [torch.zeros_like(blocks[0]) if g is None else g for g in grads[:J]]
        grad_weight, grad_blocks = _phase_one_grads(weight, bias, m, blocks, ctx.eps, grad_l, grad_rows, grads[J:])
        return grad_weight, None, None, *grad_blocks


def _source_grads(
    b: Tensor, eps: float, bias: Tensor | float, weight: Tensor, m: Tensor, grad_l: Tensor, grad_o: Tensor
) -> tuple[Tensor, Tensor]:
    """Phase 1's gradients for one completed block: (block, weight contribution), the block's through its keys'
    inverse RMS too."""
    v = b.float()
    z, r = _keys_dot(v, weight), inverse_rms(v, eps)
    e = torch.exp(z * r + bias - m)
    grad_x = (grad_l + (grad_o * v.unsqueeze(-2)).sum(-1)) * e
    grad_xr = grad_x * r
    grad_r = (grad_x * z).sum(-1, keepdim=True)
    grad_v = (e.unsqueeze(-1) * grad_o + grad_xr.unsqueeze(-1) * weight).sum(-2) - grad_r * r.pow(3) * v / v.shape[-1]
    return grad_v.to(b.dtype), _weight_grad(grad_xr, v)


class _Merge(torch.autograd.Function):
    """Phase 2. h = (a o + b p) / (a l + b), a = e^(m - M), b = e^(s - M), s the partial's logit."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, m: Tensor, l: Tensor, o: Tensor, partial: Tensor, weight: Tensor, eps: float
    ) -> Tensor:
        out = _merge(m, l, o, partial, weight, eps)
        ctx.save_for_backward(m, l, partial, weight, out)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        m, l, partial, weight, out = ctx.saved_tensors
        return None, *_merge_grads(m, l, partial, weight, out, grad_out, ctx.eps), None


def _merge(m: Tensor, l: Tensor, o: Tensor, partial: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The merge's forward."""
    kernels = _merge_kernels(partial, o)
    if kernels is not None:
        return kernels.merge(m, l, o, partial, weight, eps)
    p = partial.float()
    a, b, z, _ = _merge_terms(m, l, p, weight, eps)
    return ((a.unsqueeze(-1) * o + b.unsqueeze(-1) * p) / z.unsqueeze(-1)).to(partial.dtype)


def _merge_grads(
    m: Tensor, l: Tensor, partial: Tensor, weight: Tensor, out: Tensor, grad_out: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The merge's backward: gradients of (l, o, partial, weight), from the output instead of phase 1's o."""
    kernels = _merge_kernels(partial, out, grad_out)
    if kernels is not None:
        grad_l, grad_o, grad_p, coef = kernels.merge_backward(m, l, partial, weight, out, grad_out, eps)
        return grad_l, grad_o, grad_p, _weight_grad(coef.unsqueeze(-1), partial).squeeze(0)
    p, g = partial.float(), grad_out.float()
    a, b, z, (dot, r) = _merge_terms(m, l, p, weight, eps)
    g_out = (g * out.float()).sum(-1)  # dh/dl and dh/ds both end in -h: g . h, from the output
    grad_s = b * ((g * p).sum(-1) - g_out) / z
    grad_p = (b / z).unsqueeze(-1) * g + (grad_s * r).unsqueeze(-1) * weight
    grad_p = grad_p - (grad_s * dot * r.pow(3) / p.shape[-1]).unsqueeze(-1) * p  # through 1/RMS(p)
    grad_weight = _weight_grad((grad_s * r).unsqueeze(-1), p).squeeze(0)
    return -a * g_out / z, (a / z).unsqueeze(-1) * g, grad_p.to(partial.dtype), grad_weight


def _merge_terms(
    m: Tensor, l: Tensor, p: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """a, b and the normaliser z of the online-softmax merge, plus (p . weight, 1/RMS(p))."""
    dot = (p * weight).sum(-1)
    r = inverse_rms(p, eps).squeeze(-1)
    s = dot * r
    top = torch.maximum(m, s)
    a, b = torch.exp(m - top), torch.exp(s - top)
    return a, b, a * l + b, (dot, r)


def _normalize(l: Tensor, o: Tensor, dtype: torch.dtype) -> Tensor:
    out = _as_float(o) / l.unsqueeze(-1)
    return out if out.dtype == dtype else out.to(dtype)


class _Normalize(torch.autograd.Function):
    """Phase 2 without a partial sum: h = o / l."""

    @staticmethod
    def forward(ctx, l: Tensor, o: Tensor, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        out = _normalize(l, o, dtype)
        ctx.save_for_backward(l, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        l, out = ctx.saved_tensors
        g = grad_out.float()
        return -(g * out.float()).sum(-1) / l, g / l.unsqueeze(-1), None


# Under torch.compile, Dynamo puts the calls of the three Functions into its graph as they are, for AOTAutograd to
# trace (forward and backward, as it traces any autograd code): Dynamo's own tracing of a Function (its forward and its
# backward, at every call) took 2 of the 3.5 s of bytecode tracing of the small benchmark model's first compiled step.
@torch.compiler.allow_in_graph
def _block_scores_call(*args: Tensor | None) -> tuple[Tensor, ...]:
    return _BlockScores.apply(*args)


@torch.compiler.allow_in_graph
def _merge_call(m: Tensor, l: Tensor, o: Tensor, partial: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _Merge.apply(m, l, o, partial, weight, eps)


@torch.compiler.allow_in_graph
def _normalize_call(l: Tensor, o: Tensor, dtype: torch.dtype) -> Tensor:
    return _Normalize.apply(l, o, dtype)
