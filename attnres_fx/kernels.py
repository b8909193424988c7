"""Triton kernels for the two-phase depth attention (`ops.py` holds the math they implement and its autograd).

Each is a `torch.library.triton_op`, so torch.compile traces it with fullgraph and Inductor schedules the kernel
among its own. `ops.py` calls them for CUDA tensors (the merge's in eager mode; compiled, Inductor fuses the merge
into the norm that reads it); on CPU they run under the Triton interpreter (`TRITON_INTERPRET=1`, set before triton
is imported), which is how the tests check them.

Memory traffic is what they save: phase 1 reads every completed block once for all J sublayers of a block (the J
programs of a row tile run side by side and share the tile through the cache) and keeps the running statistics in
registers; the merge reads the partial sum and the phase-1 row once. Statistics are fp32; the blocks, the partial
sum, the weighted sum and the output are in the model's dtype. The weight gradients are per-token coefficients
here, reduced over tokens by one matmul in `ops.py` (cuBLAS), which keeps the kernels free of atomics. A per-slot
bias of -inf marks a placeholder of a fixed-size bank (per-layer compile, `state.py`): phase 1 and its backward skip
it without reading it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

MAX_BLOCKS = 8  # completed blocks one phase-1 launch reads; more are folded in by further launches
_TILE_ELEMENTS = 4096  # rows x padded d held per program


def _tile(d: int) -> tuple[int, int, int]:
    """(rows per program, padded d, warps) for rows of `d` elements."""
    block_d = triton.next_power_of_2(d)
    return max(1, min(64, _TILE_ELEMENTS // block_d)), block_d, 4 if block_d <= 2048 else 8


@triton.jit
def _row_tile(tile, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row indices of a tile of BLOCK_M tokens, column indices of d padded to BLOCK_D, and their masks."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    return rows, cols, row_mask, row_mask[:, None] & (cols < D)[None, :]


@triton.jit
def _slot_bias(s_ptr, i, HAS_BIAS: tl.constexpr):
    """The logit bias of block slot i: -inf masks a placeholder (see `state.py`)."""
    if HAS_BIAS:
        return tl.load(s_ptr + i)
    return 0.0


@triton.jit
def _inverse_rms(v, D, eps):
    """1 / RMS of each row of a tile: a key's norm, taken where the tile is read anyway."""
    return 1.0 / tl.sqrt(tl.sum(v * v, 1) / D + eps)


@triton.jit
def _fold_block(b_ptr, bias, rows, cols, mask, D, eps, w, m, l, acc):
    """Online softmax: add one completed block's scores and values to the running (max, sum, weighted sum). A
    placeholder slot (bias -inf, see `state.py`) adds nothing and is not read."""
    if bias > float("-inf"):
        v = tl.load(b_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.sum(v * w[None, :], 1) * _inverse_rms(v, D, eps) + bias
        top = tl.maximum(m, x)
        alpha, beta = tl.exp(m - top), tl.exp(x - top)
        m, l, acc = top, l * alpha + beta, acc * alpha[:, None] + beta[:, None] * v
    return m, l, acc


# fmt: off
@triton.jit
def _phase_one_kernel(
    w_ptr,
    b0, b1, b2, b3, b4, b5, b6, b7,
    s_ptr, m_ptr, l_ptr, o_ptr, M, D, J, eps,
    NUM: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (j, row tile): sublayer j's statistics over NUM completed blocks, continuing from the stored ones.
    The first block folded in must hold a source (bias > -inf) when there is nothing to continue from."""
    j = tl.program_id(0)
    rows, cols, row_mask, mask = _row_tile(tl.program_id(1), M, D, BLOCK_M, BLOCK_D)
    w = tl.load(w_ptr + j * D + cols, mask=cols < D, other=0.0)
    stat = rows * J + j
    out = stat[:, None] * D + cols[None, :]
    if HAS_INIT:
        m = tl.load(m_ptr + stat, mask=row_mask, other=0.0)
        l = tl.load(l_ptr + stat, mask=row_mask, other=0.0)
        acc = tl.load(o_ptr + out, mask=mask, other=0.0).to(tl.float32)
    else:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m, l, acc = _fold_block(b0, _slot_bias(s_ptr, 0, HAS_BIAS), rows, cols, mask, D, eps, w, m, l, acc)
    if NUM > 1:
        m, l, acc = _fold_block(b1, _slot_bias(s_ptr, 1, HAS_BIAS), rows, cols, mask, D, eps, w, m, l, acc)
    if NUM > 2:
        m, l, acc = _fold_block(b2, _slot_bias(s_ptr, 2, HAS_BIAS), rows, cols, mask, D, eps, w, m, l, acc)
    if NUM > 3:
        m, l, acc = _fold_block(b3, _slot_bias(s_ptr, 3, HAS_BIAS), rows, cols, mask, D, eps, w, m, l, acc)
    if NUM > 4:
        m, l, acc = _fold_block(b4, _slot_bias(s_ptr, 4, HAS_BIAS), rows, cols, mask, D, eps, w, m, l, acc)
    if NUM > 5:
        m, l, acc = _fold_block(b5, _slot_bias(s_ptr, 5, HAS_BIAS), rows, cols, mask, D, eps, w, m, l, acc)
    if NUM > 6:
        m, l, acc = _fold_block(b6, _slot_bias(s_ptr, 6, HAS_BIAS), rows, cols, mask, D, eps, w, m, l, acc)
    if NUM > 7:
        m, l, acc = _fold_block(b7, _slot_bias(s_ptr, 7, HAS_BIAS), rows, cols, mask, D, eps, w, m, l, acc)
    tl.store(m_ptr + stat, m, mask=row_mask)
    tl.store(l_ptr + stat, l, mask=row_mask)
    tl.store(o_ptr + out, acc.to(o_ptr.dtype.element_ty), mask=mask)
# fmt: on


@triton.jit
def _block_grads(b_ptr, bias, gb_ptr, c_ptr, w_ptr, m_ptr, gl_ptr, go_ptr, rows, cols, row_mask, mask, D, J, eps):
    """One completed block's gradient (through its keys' inverse RMS too) and its weight-gradient coefficients, over
    all J. Those of a placeholder slot (bias -inf) are zeros, written without reading anything."""
    tile = rows[:, None] * D + cols[None, :]
    grad_v = tl.zeros(mask.shape, tl.float32)
    if bias > float("-inf"):
        v = tl.load(b_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        r = _inverse_rms(v, D, eps)
        grad_r = tl.zeros(row_mask.shape, tl.float32)
        for j in range(J):
            w = tl.load(w_ptr + j * D + cols, mask=cols < D, other=0.0)
            stat = rows * J + j
            go = tl.load(go_ptr + stat[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            z = tl.sum(v * w[None, :], 1)
            e = tl.exp(z * r + bias - tl.load(m_ptr + stat, mask=row_mask, other=0.0))
            grad_x = (tl.load(gl_ptr + stat, mask=row_mask, other=0.0) + tl.sum(go * v, 1)) * e
            grad_v += e[:, None] * go + (grad_x * r)[:, None] * w[None, :]
            grad_r += grad_x * z
            tl.store(c_ptr + stat, grad_x * r, mask=row_mask)
        grad_v -= (grad_r * r * r * r / D)[:, None] * v  # d r / d v = -r^3 v / D
    else:
        for j in range(J):
            tl.store(c_ptr + rows * J + j, tl.zeros(row_mask.shape, tl.float32), mask=row_mask)
    tl.store(gb_ptr + tile, grad_v.to(gb_ptr.dtype.element_ty), mask=mask)


# fmt: off
@triton.jit
def _phase_one_backward_kernel(
    w_ptr, m_ptr, gl_ptr, go_ptr,
    b0, b1, b2, b3, b4, b5, b6, b7,
    gb0, gb1, gb2, gb3, gb4, gb5, gb6, gb7,
    s_ptr, c_ptr, M, D, J, eps,
    NUM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row tile): the gradients of NUM completed blocks; the tile's upstream gradients stay in cache."""
    rows, cols, row_mask, mask = _row_tile(tl.program_id(0), M, D, BLOCK_M, BLOCK_D)
    step = M * J  # coefficients are [blocks, M, J]
    shared = (w_ptr, m_ptr, gl_ptr, go_ptr, rows, cols, row_mask, mask, D, J, eps)
    _block_grads(b0, _slot_bias(s_ptr, 0, HAS_BIAS), gb0, c_ptr, *shared)
    if NUM > 1:
        _block_grads(b1, _slot_bias(s_ptr, 1, HAS_BIAS), gb1, c_ptr + 1 * step, *shared)
    if NUM > 2:
        _block_grads(b2, _slot_bias(s_ptr, 2, HAS_BIAS), gb2, c_ptr + 2 * step, *shared)
    if NUM > 3:
        _block_grads(b3, _slot_bias(s_ptr, 3, HAS_BIAS), gb3, c_ptr + 3 * step, *shared)
    if NUM > 4:
        _block_grads(b4, _slot_bias(s_ptr, 4, HAS_BIAS), gb4, c_ptr + 4 * step, *shared)
    if NUM > 5:
        _block_grads(b5, _slot_bias(s_ptr, 5, HAS_BIAS), gb5, c_ptr + 5 * step, *shared)
    if NUM > 6:
        _block_grads(b6, _slot_bias(s_ptr, 6, HAS_BIAS), gb6, c_ptr + 6 * step, *shared)
    if NUM > 7:
        _block_grads(b7, _slot_bias(s_ptr, 7, HAS_BIAS), gb7, c_ptr + 7 * step, *shared)
# fmt: on


@triton.jit
def _merge_terms(m_ptr, l_ptr, p_ptr, w_ptr, rows, cols, row_mask, mask, D, stride_s, eps):
    """The partial sum (fp32), its inverse RMS, p . weight, the weight, and the merge's a, b and normaliser."""
    p = tl.load(p_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0)
    m = tl.load(m_ptr + rows * stride_s, mask=row_mask, other=0.0)
    l = tl.load(l_ptr + rows * stride_s, mask=row_mask, other=1.0)
    dot = tl.sum(p * w[None, :], 1)
    r = _inverse_rms(p, D, eps)
    s = dot * r
    top = tl.maximum(m, s)
    a, b = tl.exp(m - top), tl.exp(s - top)
    return p, r, dot, w, a, b, a * l + b


@triton.jit
def _merge_kernel(
    m_ptr,
    l_ptr,
    o_ptr,
    p_ptr,
    w_ptr,
    out_ptr,
    M,
    D,
    stride_s,
    stride_o,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (row tile): h = (a o + b p) / (a l + b), the partial sum as one more source of the softmax."""
    rows, cols, row_mask, mask = _row_tile(tl.program_id(0), M, D, BLOCK_M, BLOCK_D)
    p, r, dot, w, a, b, z = _merge_terms(m_ptr, l_ptr, p_ptr, w_ptr, rows, cols, row_mask, mask, D, stride_s, eps)
    o = tl.load(o_ptr + rows[:, None] * stride_o + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = (a[:, None] * o + b[:, None] * p) / z[:, None]
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_backward_kernel(
    m_ptr,
    l_ptr,
    p_ptr,
    w_ptr,
    h_ptr,
    g_ptr,
    gl_ptr,
    go_ptr,
    gp_ptr,
    c_ptr,
    M,
    D,
    stride_s,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (row tile): the merge's gradients, from the saved output rather than phase 1's weighted sum."""
    rows, cols, row_mask, mask = _row_tile(tl.program_id(0), M, D, BLOCK_M, BLOCK_D)
    tile = rows[:, None] * D + cols[None, :]
    p, r, dot, w, a, b, z = _merge_terms(m_ptr, l_ptr, p_ptr, w_ptr, rows, cols, row_mask, mask, D, stride_s, eps)
    g = tl.load(g_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    g_out = tl.sum(g * tl.load(h_ptr + tile, mask=mask, other=0.0).to(tl.float32), 1)
    grad_s = b * (tl.sum(g * p, 1) - g_out) / z
    grad_p = (b / z)[:, None] * g + (grad_s * r)[:, None] * w[None, :]
    grad_p -= (grad_s * dot * r * r * r / D)[:, None] * p
    tl.store(gl_ptr + rows, -a * g_out / z, mask=row_mask)
    tl.store(go_ptr + tile, ((a / z)[:, None] * g).to(go_ptr.dtype.element_ty), mask=mask)
    tl.store(gp_ptr + tile, grad_p.to(gp_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + rows, grad_s * r, mask=row_mask)


def _rows(x: Tensor) -> Tensor:
    """`x` as contiguous [tokens, d] rows (a view when it is contiguous already)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _chunks(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Up to MAX_BLOCKS at a time, padded with the first (unused: the kernel's NUM says how many count)."""
    chunks = [tensors[i : i + MAX_BLOCKS] for i in range(0, len(tensors), MAX_BLOCKS)]
    return [chunk + [chunk[0]] * (MAX_BLOCKS - len(chunk)) for chunk in chunks]


@triton_op("attnres_fx::phase_one", mutates_args=())
def phase_one(
    weight: Tensor, blocks: list[Tensor], eps: float, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 1: (running max [..., J], sum [..., J], weighted sum [..., J, d]) of J sublayers over the blocks, their
    keys RMS-normed with `eps`, each block's logits shifted by `bias` [blocks] if given (-inf: a placeholder, which
    the sum leaves out)."""
    j, d = weight.shape
    lead = blocks[0].shape[:-1]
    rows = [_rows(b) for b in blocks]
    if bias is not None:  # newest first: the newest slot always holds a source, so the running max starts finite
        rows, bias = rows[::-1], bias.flip(0).contiguous()
    m_rows = rows[0].shape[0]
    m = torch.empty(m_rows, j, device=weight.device, dtype=torch.float32)
    l = torch.empty_like(m)
    o = torch.empty(m_rows, j, d, device=weight.device, dtype=blocks[0].dtype)
    block_m, block_d, warps = _tile(d)
    grid = (j, triton.cdiv(m_rows, block_m))
    for start, bs in enumerate(_chunks(rows)):
        wrap_triton(_phase_one_kernel)[grid](
            weight, *bs, _bias_from(bias, start, weight), m, l, o, m_rows, d, j, eps,
            NUM=min(MAX_BLOCKS, len(rows) - start * MAX_BLOCKS), HAS_INIT=start > 0, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    return m.reshape(*lead, j), l.reshape(*lead, j), o.reshape(*lead, j, d)


@triton_op("attnres_fx::phase_one_backward", mutates_args=())
def phase_one_backward(
    weight: Tensor,
    m: Tensor,
    blocks: list[Tensor],
    eps: float,
    grad_l: Tensor,
    grad_o: Tensor,
    bias: Tensor | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Phase 1's gradients: per block, and weight-gradient coefficients [blocks, tokens, J]."""
    j, d = weight.shape
    rows = [_rows(b) for b in blocks]
    m_rows = rows[0].shape[0]
    grad_blocks = [torch.empty_like(b) for b in rows]
    m, grad_l, grad_o = m.reshape(m_rows, j).contiguous(), grad_l.reshape(m_rows, j).contiguous(), _rows(grad_o)
    block_m, block_d, warps = _tile(d)
    coefs = []  # one buffer per launch, not views of one: kernels write whole buffers (simpler for Inductor)
    for start, (bs, gbs) in enumerate(zip(_chunks(rows), _chunks(grad_blocks))):
        num = min(MAX_BLOCKS, len(rows) - start * MAX_BLOCKS)
        coefs.append(torch.empty(num, m_rows, j, device=weight.device, dtype=torch.float32))
        wrap_triton(_phase_one_backward_kernel)[(triton.cdiv(m_rows, block_m),)](
            weight, m, grad_l, grad_o, *bs, *gbs, _bias_from(bias, start, weight), coefs[-1], m_rows, d, j, eps,
            NUM=num, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    lead = blocks[0].shape
    return [g.reshape(lead) for g in grad_blocks], torch.cat(coefs) if len(coefs) > 1 else coefs[0]


def _bias_from(bias: Tensor | None, launch: int, unused: Tensor) -> Tensor:
    """The bias of the blocks one launch reads (any tensor where there is none: the kernel does not read it)."""
    return unused if bias is None else bias[launch * MAX_BLOCKS :].contiguous()


@triton_op("attnres_fx::merge", mutates_args=())
def merge(m: Tensor, l: Tensor, o: Tensor, partial: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Phase 2: sublayer k's phase-1 row (m, l [...], o [..., d], strided views) merged with the partial sum."""
    d = partial.shape[-1]
    p = _rows(partial)
    out = torch.empty_like(p)
    m, l, o = m.reshape(-1), l.reshape(-1), o.reshape(-1, d)
    block_m, block_d, warps = _tile(d)
    wrap_triton(_merge_kernel)[(triton.cdiv(p.shape[0], block_m),)](
        m, l, o, p, weight, out, p.shape[0], d, m.stride(0), o.stride(0), eps,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out.reshape(partial.shape)


@triton_op("attnres_fx::merge_backward", mutates_args=())
def merge_backward(
    m: Tensor, l: Tensor, partial: Tensor, weight: Tensor, out: Tensor, grad_out: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The merge's gradients: (l [...], o [..., d], partial [..., d]) and weight-gradient coefficients [...]."""
    d = partial.shape[-1]
    p, h, g = _rows(partial), _rows(out), _rows(grad_out)
    m, l = m.reshape(-1), l.reshape(-1)
    grad_l, coef = torch.empty_like(m), torch.empty_like(m)
    grad_o, grad_p = torch.empty_like(p), torch.empty_like(p)
    block_m, block_d, warps = _tile(d)
    wrap_triton(_merge_backward_kernel)[(triton.cdiv(p.shape[0], block_m),)](
        m, l, p, weight, h, g, grad_l, grad_o, grad_p, coef, p.shape[0], d, m.stride(0), eps,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    lead = partial.shape[:-1]
    return grad_l.reshape(lead), grad_o.reshape(partial.shape), grad_p.reshape(partial.shape), coef.reshape(lead)
