"""C++ kernels for the two-phase depth attention on CPU tensors (`ops.py` holds the math and its autograd).

Phase 1 (and its backward) in eager and compiled models: written in torch ops, phase 1 over n completed blocks is
n-dependent code, so Inductor built a kernel per block count and fused each into the layer code around it, and every
layer's kernels came out different (44 distinct C++ kernels for the small benchmark model against the baseline's 16,
at ~1.7 CPU-s each to build). Here the block count is a runtime argument: a compiled graph calls one opaque operator
for every block, and the layers' own kernels are the same at every depth. The merge with the partial sum (phase 2) in
eager mode only: compiled, Inductor fuses its torch code with the norm that reads the result. Eager without autograd,
for a few tokens a call (decoding), one sublayer's whole mix in one call (`mix`: phase 1 of that sublayer alone over
all its sources, normalised), where the two phases' calls and ops would cost more than their math.

Per token: phase 1 scores its completed blocks, takes their softmax statistics (fp32) and the weighted sums of the J
sublayers of the block in one more pass over the token's rows; its backward writes each block's gradients (with those
that later phase-1 calls passed back added: see `ops.BlockStats.blocks`) and per-thread partial weight gradients that
one sum reduces. A slot whose bias is -inf (a fixed-size bank's placeholder, `state.py`) is not read and gets no
gradient of its own. The merge takes W tokens at a time, so that its exponentials and
square roots are vector operations. Sources, the weighted sum and their gradients are in the model's dtype (fp32,
bf16, fp16), statistics in fp32.

Built with Inductor's own C++ toolchain and flags (`CppPythonBindingsCodeCache`, cached like Inductor's kernels), once
per dtype that is used (about 1 s each once Inductor has checked the machine's vector ISA); where no compiler works,
`ops.py` computes with torch ops instead.
"""

from __future__ import annotations

import array
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

_DTYPES = {torch.float32: "float", torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}  # C++ types

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <numeric>
#include <vector>

// Inductor builds with -fno-tree-loop-vectorize and -fmath-errno: every loop over features is written in vectors, and
// exponentials and square roots are taken W lanes at a time.
using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();

// Up to n values from p as fp32 (lanes past n are zero), and back into p's dtype.
template <typename T>
static inline Vec load(const T* p, int64_t n) { return at::vec::convert<float>(at::vec::Vectorized<T>::loadu(p, n)); }
static inline Vec load(const float* p, int64_t n) { return Vec::loadu(p, n); }
template <typename T>
static inline void store(Vec x, T* p, int64_t n) { at::vec::convert<T>(x).store(p, n); }
static inline void store(Vec x, float* p, int64_t n) { x.store(p, n); }

static inline int64_t lanes(int64_t k, int64_t size) { return std::min(W, size - k); }
static inline float sum(Vec x) { return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x); }

// Four accumulators: one would make every step wait for the one before (the latency of a fused multiply-add).
template <typename A, typename B>
static inline float dot(const A* x, const B* y, int64_t D) {
    Vec acc[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
    int64_t k = 0;
    for (; k + 4 * W <= D; k += 4 * W)
        for (int u = 0; u < 4; ++u) acc[u] = at::vec::fmadd(load(x + k + u * W, W), load(y + k + u * W, W), acc[u]);
    for (; k < D; k += W) acc[0] = at::vec::fmadd(load(x + k, lanes(k, D)), load(y + k, lanes(k, D)), acc[0]);
    return sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// 1 / RMS of a row of D values: a key's norm, taken where phase 1 reads the row anyway.
template <typename T>
static inline float inverse_rms(const T* x, int64_t D, float eps) { return 1.f / std::sqrt(dot(x, x, D) / D + eps); }

// x[k] = exp(x[k] - shift[k]) for the n values of x.
static inline void exp_shifted(float* x, const float* shift, int64_t n) {
    for (int64_t k = 0; k < n; k += W) {
        int64_t c = lanes(k, n);
        (Vec::loadu(x + k, c) - Vec::loadu(shift + k, c)).exp().store(x + k, c);
    }
}

// Rows of the weighted sums handled at once, their feature chunks held in registers across the blocks.
constexpr int64_t G = 4;

// Phase 1 per token t: m[t, j], l[t, j] and row j's o[t, :] over the n blocks for each of the J weights: the logits of
// all blocks and their exponentials, then per feature chunk the weighted sums of G rows at a time, in registers over
// the blocks (one read of each block's chunk per G rows, one write of each row's). Without m and l (null), each row
// is the softmax-weighted sum itself: the depth mix over these sources.
template <typename T>
static void forward(const float* w, const float* bias, const int64_t* blocks, int64_t n, int64_t M, int64_t D,
                    int64_t J, float eps, float* m_out, float* l_out, const int64_t* rows, int64_t threads) {
    std::vector<int64_t> live;  // the slots that hold a block (not a placeholder)
    for (int64_t i = 0; i < n; ++i)
        if (!bias || bias[i] != -INFINITY) live.push_back(i);
    const int64_t N = live.size();
    #pragma omp parallel num_threads(threads)
    {
        std::vector<float> x(J * N), top(J * N);  // per row j, the logits of the N blocks, then their weights
        std::vector<const T*> v(N);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < M; ++t) {
            for (int64_t a = 0; a < N; ++a) {
                int64_t i = live[a];
                v[a] = reinterpret_cast<const T*>(blocks[i]) + t * D;
                float r = inverse_rms(v[a], D, eps), b = bias ? bias[i] : 0.f;
                for (int64_t j = 0; j < J; ++j) x[j * N + a] = dot(v[a], w + j * D, D) * r + b;
            }
            for (int64_t j = 0; j < J; ++j) {
                float m = *std::max_element(x.begin() + j * N, x.begin() + (j + 1) * N);
                std::fill(top.begin() + j * N, top.begin() + (j + 1) * N, m);
                if (m_out) m_out[t * J + j] = m;
            }
            exp_shifted(x.data(), top.data(), J * N);
            for (int64_t j = 0; j < J; ++j) {
                float l = std::accumulate(x.begin() + j * N, x.begin() + (j + 1) * N, 0.f);
                if (l_out) l_out[t * J + j] = l;
                else for (int64_t a = 0; a < N; ++a) x[j * N + a] /= l;  // no statistics asked: the softmax itself
            }
            for (int64_t j0 = 0; j0 < J; j0 += G) {
                const int64_t g = std::min(G, J - j0);
                for (int64_t k = 0; k < D; k += W) {
                    const int64_t c = lanes(k, D);
                    Vec acc[G] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
                    for (int64_t a = 0; a < N; ++a) {
                        Vec va = load(v[a] + k, c);
                        for (int64_t u = 0; u < g; ++u) acc[u] = at::vec::fmadd(va, Vec(x[(j0 + u) * N + a]), acc[u]);
                    }
                    for (int64_t u = 0; u < g; ++u) store(acc[u], reinterpret_cast<T*>(rows[j0 + u]) + t * D + k, c);
                }
            }
        }
    }
}

// Phase 1's backward per token t and block i: the gradient of the block (through its keys' inverse RMS r too), added
// to the one that later phase-1 calls passed back (an address, 0: none); per thread, the weights' gradient (summed
// over the threads afterwards).
template <typename T>
static void backward(const float* w, const float* bias, const int64_t* blocks, int64_t n, int64_t M, int64_t D,
                     int64_t J, float eps, const float* m, const float* grad_l, const int64_t* grad_rows,
                     const int64_t* later_blocks, const int64_t* grad_blocks, float* grad_w, int64_t threads) {
    #pragma omp parallel num_threads(threads)
    {
        std::vector<float> z(J), e(J), shift(J), gxr(J);
        std::vector<const T*> go(J);  // the token's gradient of each row
        float* gw = grad_w + omp_get_thread_num() * J * D;
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < M; ++t) {
            for (int64_t j = 0; j < J; ++j) go[j] = reinterpret_cast<const T*>(grad_rows[j]) + t * D;
            for (int64_t i = 0; i < n; ++i) {
                T* grad_v = reinterpret_cast<T*>(grad_blocks[i]) + t * D;
                const T* later_v = later_blocks[i] ? reinterpret_cast<const T*>(later_blocks[i]) + t * D : nullptr;
                float b = bias ? bias[i] : 0.f;
                if (b == -INFINITY) {  // a placeholder: read by nothing here
                    for (int64_t k = 0; k < D; k += W) {
                        int64_t c = lanes(k, D);
                        store(later_v ? load(later_v + k, c) : Vec(0.f), grad_v + k, c);
                    }
                    continue;
                }
                const T* v = reinterpret_cast<const T*>(blocks[i]) + t * D;
                float r = inverse_rms(v, D, eps), gr = 0.f;
                for (int64_t j = 0; j < J; ++j) {
                    z[j] = dot(v, w + j * D, D);
                    e[j] = z[j] * r + b;
                    shift[j] = m[t * J + j];
                }
                exp_shifted(e.data(), shift.data(), J);
                for (int64_t j = 0; j < J; ++j) {
                    float gx = (grad_l[t * J + j] + dot(v, go[j], D)) * e[j];
                    gxr[j] = gx * r;
                    gr += gx * z[j];
                }
                const Vec through_r(-gr * r * r * r / D);  // d r / d v = -r^3 v / D
                for (int64_t k = 0; k < D; k += W) {
                    int64_t c = lanes(k, D);
                    Vec vk = load(v + k, c), g = through_r * vk;
                    for (int64_t j = 0; j < J; ++j) {
                        g = at::vec::fmadd(load(go[j] + k, c), Vec(e[j]), g);
                        g = at::vec::fmadd(Vec::loadu(w + j * D + k, c), Vec(gxr[j]), g);
                        float* gwj = gw + j * D + k;
                        at::vec::fmadd(vk, Vec(gxr[j]), Vec::loadu(gwj, c)).store(gwj, c);
                    }
                    store(later_v ? g + load(later_v + k, c) : g, grad_v + k, c);
                }
            }
        }
    }
}

// The merge (phase 2) for W tokens from t0 (n of them real): the partial sum p as one more source of a sublayer's
// phase-1 row (m, l with token stride ms), by online softmax. Per token: p . weight, 1/RMS(p), the weights a of the
// row and b of p, and the normaliser z = a l + b.
struct MergeTile { float dot[W], r[W], a[W], b[W], z[W]; };

template <typename T>
static inline MergeTile merge_tile(const float* m, const float* l, const T* p, const float* w, int64_t t0, int64_t n,
                                   int64_t D, int64_t ms, float eps) {
    MergeTile c;
    float squares[W], mt[W], lt[W];
    for (int64_t i = 0; i < W; ++i) {
        const T* row = p + (t0 + i) * D;
        bool real = i < n;
        c.dot[i] = real ? dot(row, w, D) : 0.f;
        squares[i] = real ? dot(row, row, D) : 1.f;
        mt[i] = real ? m[(t0 + i) * ms] : 0.f;
        lt[i] = real ? l[(t0 + i) * ms] : 1.f;
    }
    Vec r = (Vec::loadu(squares) / Vec(static_cast<float>(D)) + Vec(eps)).rsqrt();
    Vec s = Vec::loadu(c.dot) * r, mv = Vec::loadu(mt), top = at::vec::maximum(mv, s);
    Vec a = (mv - top).exp(), b = (s - top).exp();
    r.store(c.r);
    a.store(c.a);
    b.store(c.b);
    (a * Vec::loadu(lt) + b).store(c.z);
    return c;
}

template <typename T>
static void merge(const float* m, const float* l, const T* o, const T* p, const float* w, T* out, int64_t M,
                  int64_t D, int64_t ms, int64_t os, float eps, int64_t threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t0 = 0; t0 < M; t0 += W) {
        int64_t n = lanes(t0, M);
        MergeTile c = merge_tile(m, l, p, w, t0, n, D, ms, eps);
        for (int64_t i = 0; i < n; ++i) {
            int64_t t = t0 + i;
            Vec a(c.a[i] / c.z[i]), b(c.b[i] / c.z[i]);
            for (int64_t k = 0; k < D; k += W) {
                int64_t cn = lanes(k, D);
                store(a * load(o + t * os + k, cn) + b * load(p + t * D + k, cn), out + t * D + k, cn);
            }
        }
    }
}

// The merge's gradients of l, o and p, and per token the coefficient of p in the weight's gradient; from the
// merge's output h rather than phase 1's o.
template <typename T>
static void merge_backward(const float* m, const float* l, const T* p, const float* w, const T* h, const T* g,
                           float* grad_l, T* grad_o, T* grad_p, float* coef, int64_t M, int64_t D, int64_t ms,
                           float eps, int64_t threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t0 = 0; t0 < M; t0 += W) {
        int64_t n = lanes(t0, M);
        MergeTile c = merge_tile(m, l, p, w, t0, n, D, ms, eps);
        for (int64_t i = 0; i < n; ++i) {
            int64_t t = t0 + i;
            const T *gt = g + t * D, *pt = p + t * D;
            float g_out = dot(gt, h + t * D, D), z = c.z[i], r = c.r[i];
            float grad_s = c.b[i] * (dot(gt, pt, D) - g_out) / z;
            grad_l[t] = -c.a[i] * g_out / z;
            coef[t] = grad_s * r;
            Vec ga(c.a[i] / z), gb(c.b[i] / z), gw(grad_s * r), gq(grad_s * c.dot[i] * r * r * r / D);
            for (int64_t k = 0; k < D; k += W) {
                int64_t cn = lanes(k, D);
                Vec gk = load(gt + k, cn);
                store(ga * gk, grad_o + t * D + k, cn);
                store(gb * gk + gw * Vec::loadu(w + k, cn) - gq * load(pt + k, cn), grad_p + t * D + k, cn);
            }
        }
    }
}

// The arguments of an op, in the order its wrapper in cpu_kernels.py writes them: addresses and sizes.
struct Args {
    const int64_t* next;
    template <typename P> P* ptr() { return reinterpret_cast<P*>(*next++); }
    int64_t num() { return *next++; }
    const int64_t* list(int64_t n) { const int64_t* start = next; next += n; return start; }
};

template <typename T>
static void run(int64_t op, Args a, float eps, int64_t threads) {
    if (op == 4) {  // one sublayer's mix: n, M, D, query, key weight (both fp32), bias (0: none), out, sources
        int64_t n = a.num(), M = a.num(), D = a.num();
        const float* q = a.ptr<const float>();
        const float* g = a.ptr<const float>();
        std::vector<float> w(D);
        for (int64_t k = 0; k < D; ++k) w[k] = q[k] * g[k];
        const float* bias = a.ptr<const float>();
        const int64_t* out = a.list(1);
        forward<T>(w.data(), bias, a.list(n), n, M, D, 1, eps, nullptr, nullptr, out, threads);
    } else if (op == 0 || op == 1) {  // phase 1: n, M, D, J, weight, bias (0: none), m, then per op below
        int64_t n = a.num(), M = a.num(), D = a.num(), J = a.num();
        const float* w = a.ptr<const float>();
        const float* bias = a.ptr<const float>();
        float* m = a.ptr<float>();
        if (op == 0) {  // l, the J rows of o, blocks
            float* l = a.ptr<float>();
            const int64_t* rows = a.list(J);
            forward<T>(w, bias, a.list(n), n, M, D, J, eps, m, l, rows, threads);
        } else {  // grad_l, grad_w (per thread), the rows' gradients, blocks, the gradients later calls passed back
            // for them, theirs
            const float* grad_l = a.ptr<const float>();
            float* grad_w = a.ptr<float>();
            const int64_t* grad_rows = a.list(J);
            const int64_t* blocks = a.list(n);
            const int64_t* later_blocks = a.list(n);
            backward<T>(w, bias, blocks, n, M, D, J, eps, m, grad_l, grad_rows, later_blocks, a.list(n), grad_w,
                        threads);
        }
    } else {  // merge: M, D, token stride of m and l, m, l, partial, weight, then per op below
        int64_t M = a.num(), D = a.num(), ms = a.num();
        const float* m = a.ptr<const float>();
        const float* l = a.ptr<const float>();
        const T* p = a.ptr<const T>();
        const float* w = a.ptr<const float>();
        if (op == 2) {  // token stride of o, o, out
            int64_t os = a.num();
            const T* o = a.ptr<const T>();
            merge<T>(m, l, o, p, w, a.ptr<T>(), M, D, ms, os, eps, threads);
        } else {  // out, grad_out, grad_l, grad_o, grad_p, coef
            const T* out = a.ptr<const T>();
            const T* g = a.ptr<const T>();
            float* grad_l = a.ptr<float>();
            T* grad_o = a.ptr<T>();
            T* grad_p = a.ptr<T>();
            merge_backward<T>(m, l, p, w, out, g, grad_l, grad_o, grad_p, a.ptr<float>(), M, D, ms, eps, threads);
        }
    }
}

"""

# The entry point, built once per dtype (the model's: a build for all three would take ten times as long).
_ENTRY = """
// op 0: phase 1, 1: its backward, 2: the merge, 3: its backward, 4: one sublayer's mix.
extern "C" void kernel(int64_t op, uintptr_t args, float eps, int64_t threads) {
    run<%s>(op, Args{reinterpret_cast<const int64_t*>(args)}, eps, threads);
}
"""
_ARGTYPES = ["int64_t", "uintptr_t", "float", "int64_t"]  # the arguments' array by address
_PHASE_ONE, _PHASE_ONE_BACKWARD, _MERGE, _MERGE_BACKWARD, _MIX = range(5)

_kernels: dict[torch.dtype, Callable[..., None]] = {}
_unbuildable: bool = False  # the C++ toolchain failed once: torch ops compute from then on


def build(dtype: torch.dtype) -> bool:
    """Build the kernel for sources of `dtype` (once per process; Inductor's cache keeps the library across them);
    False, with a warning, where Inductor's C++ toolchain cannot build it: torch ops compute then. Called where
    nothing is traced (`transform`, an eager call, a compiled graph running the operator)."""
    global _unbuildable
    if dtype not in _kernels and not _unbuildable:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        try:
            _kernels[dtype] = CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, _SOURCE + _ENTRY % _DTYPES[dtype])
        except Exception as error:  # no compiler, or one that fails
            warnings.warn(f"attnres_fx: the CPU depth-attention kernel could not be built ({error}); using torch ops.")
            _unbuildable = True
    return dtype in _kernels


def handles(*tensors: Tensor) -> bool:
    """Whether the kernel computes for these sources: CPU tensors of one dtype that it handles (it reads them all as
    one; mixed dtypes, as autocast makes them, are left to torch ops), plain ones (it reads their memory by address:
    a subclass such as a collective's pending result has none of its own). While a compile traces, where the
    toolchain has built the kernel for some dtype: the operator builds the one it needs when it runs."""
    dtype = tensors[0].dtype
    if dtype not in _DTYPES or not all(t.is_cpu and t.dtype == dtype for t in tensors):
        return False
    if torch.compiler.is_compiling():
        return bool(_kernels)
    return all(type(t) is Tensor for t in tensors) and build(dtype)


def _launch(
    op: int, dtype: torch.dtype, *args: int | Tensor | None | list[Tensor] | list[Tensor | None], eps: float = 0.0
) -> None:
    """Run `op` on `args` as the C++ code reads them (sizes as they are, tensors (contiguous, or strided as the op
    says) and None (0) by address, lists of tensors (or None) address by address), on torch's threads. The arguments
    go as one int64 array (a Python `array`: a tensor made from the list costs more than the kernel at decode sizes)."""
    flat: list[int] = []
    for arg in args:
        if isinstance(arg, list):
            flat += [0 if t is None else t.data_ptr() for t in arg]
        else:
            flat.append(arg.data_ptr() if isinstance(arg, Tensor) else arg or 0)
    if not build(dtype):
        raise RuntimeError("attnres_fx: the CPU depth-attention kernel could not be built (see the warning above).")
    _call(op, dtype, flat, eps)


def _call(op: int, dtype: torch.dtype, flat: list[int], eps: float) -> None:
    packed = array.array("q", flat)
    _kernels[dtype](op, packed.buffer_info()[0], eps, torch.get_num_threads())


_MaybeTensor = TypeVar("_MaybeTensor", Tensor, Tensor | None)


def _contiguous(tensors: list[_MaybeTensor]) -> list[_MaybeTensor]:
    """Each tensor contiguous (the kernel reads rows by address); None (no tensor) stays None."""
    return [None if t is None else t.contiguous() for t in tensors]


def _phase_one(
    weight: Tensor, bias: Tensor | None, blocks: list[Tensor], eps: float, m: Tensor, l: Tensor, rows: list[Tensor]
) -> None:
    J, D = weight.shape
    weight, bias, blocks = weight.contiguous(), None if bias is None else bias.contiguous(), _contiguous(blocks)
    _launch(_PHASE_ONE, blocks[0].dtype, len(blocks), m.numel() // J, D, J, weight, bias, m, l, rows, blocks, eps=eps)


def _phase_one_backward(
    weight: Tensor,
    bias: Tensor | None,
    m: Tensor,
    blocks: list[Tensor],
    eps: float,
    grad_l: Tensor,
    grad_rows: list[Tensor],
    later_blocks: list[Tensor | None],
    grad_weight: Tensor,
    grad_blocks: list[Tensor],
) -> None:
    blocks, later_blocks = _contiguous(blocks), _contiguous(later_blocks)
    J, D = weight.shape
    partial = weight.new_zeros((torch.get_num_threads(), J, D))  # per thread: its tokens' part of the weight gradient
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    m, grad_l, grad_rows = m.contiguous(), grad_l.contiguous(), _contiguous(grad_rows)
    _launch(_PHASE_ONE_BACKWARD, blocks[0].dtype, len(blocks), m.numel() // J, D, J, weight, bias, m, grad_l, partial,
            grad_rows, blocks, later_blocks, grad_blocks, eps=eps)  # fmt: skip
    torch.sum(partial, 0, out=grad_weight)


# Operators, so that a compiled graph calls the kernel as one opaque node (the low-level registration: a custom_op's
# Python layers cost more than the kernel itself at decode sizes). They write into outputs their callers allocate:
# in a compiled graph those are Inductor's buffers, which its memory planning reuses, where outputs allocated by the
# operator would be fresh memory at every call (page faults on first touch cost as much as the kernel).
_LIBRARY = torch.library.Library("attnres_fx", "FRAGMENT")
_LIBRARY.define(
    "cpu_phase_one(Tensor weight, Tensor? bias, Tensor[] blocks, float eps, Tensor(a!) m, Tensor(b!) l, "
    "Tensor(c!)[] rows) -> ()"
)
_LIBRARY.define(
    "cpu_phase_one_backward(Tensor weight, Tensor? bias, Tensor m, Tensor[] blocks, float eps, Tensor grad_l, "
    "Tensor[] grad_rows, Tensor?[] later_blocks, Tensor(a!) grad_weight, Tensor(b!)[] grad_blocks) -> ()"
)
_LIBRARY.impl("cpu_phase_one", _phase_one, "CPU")
_LIBRARY.impl("cpu_phase_one_backward", _phase_one_backward, "CPU")
torch.library.register_fake("attnres_fx::cpu_phase_one")(lambda *args: None)
torch.library.register_fake("attnres_fx::cpu_phase_one_backward")(lambda *args: None)


def phase_one(
    weight: Tensor, bias: Tensor | None, blocks: list[Tensor], eps: float
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """(m, l, rows): phase 1's statistics of the J sublayers (rows of `weight`) over `blocks` (see `ops.py`), each
    block's keys RMS-normed with `eps`."""
    first = blocks[0]
    m = first.new_empty((*first.shape[:-1], weight.shape[0]), dtype=torch.float32)
    l, rows = torch.empty_like(m), [first.new_empty(first.shape) for _ in range(weight.shape[0])]
    op = torch.ops.attnres_fx.cpu_phase_one if _traced() else _phase_one
    op(weight, bias, blocks, eps, m, l, rows)
    return m, l, tuple(rows)


def mix(sources: list[Tensor], query: Tensor, key_weight: Tensor, bias: Tensor | None, eps: float) -> Tensor | None:
    """One sublayer's depth mix over `sources` in one call, without autograd or a compiler (the caller's to know):
    phase 1 of that sublayer alone, asked for no statistics, so its row is normalised. None where the kernel does not
    handle the sources (see `handles`). Written for decoding, where this Python is most of a site's time: the kernel
    takes the weights as they are (fp32 parameters) or as fp32 copies, and the output is its first source's shape."""
    if not handles(*sources) or not query.is_cpu:
        return None
    first = sources[0]
    sources = [s.contiguous() for s in sources]  # these and the weights held until the kernel has read them
    query, key_weight = query.float().contiguous(), key_weight.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    D, out = first.shape[-1], torch.empty_like(sources[0])  # contiguous, as sources[0] now is
    bias_address = 0 if bias is None else bias.data_ptr()
    head = [len(sources), first.numel() // D, D, query.data_ptr(), key_weight.data_ptr(), bias_address, out.data_ptr()]
    _call(_MIX, first.dtype, head + [s.data_ptr() for s in sources], eps)
    return out


def phase_one_backward(
    weight: Tensor, bias: Tensor | None, m: Tensor, blocks: list[Tensor], eps: float, grad_l: Tensor,
    grad_rows: list[Tensor], later_blocks: list[Tensor | None],
) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """Phase 1's gradients: (weight, each block), the blocks' with those that later phase-1 calls passed back
    (`later_blocks`, None: none) added."""
    grad_blocks = [b.new_empty(b.shape) for b in blocks]  # contiguous, whatever the blocks' strides
    grad_weight = torch.empty_like(weight)
    op = torch.ops.attnres_fx.cpu_phase_one_backward if _traced() else _phase_one_backward
    op(weight, bias, m, blocks, eps, grad_l, grad_rows, later_blocks, grad_weight, grad_blocks)
    return grad_weight, grad_blocks


def _traced() -> bool:
    """Whether a compiler or a dispatch mode (fake tensors, `make_fx`) sees this call: it must see the operator. Else
    the operator's implementation is called directly (the dispatcher's way into Python costs 10 us a call)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _statistics(m: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """A sublayer's (m, l) as flat token rows of one stride (views of the block's statistics where they can be)."""
    m, l = m.reshape(-1), l.reshape(-1)
    return (m, l) if m.stride() == l.stride() else (m.contiguous(), l.contiguous())


def merge(m: Tensor, l: Tensor, o: Tensor, partial: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Phase 2 (eager only: compiled, Inductor fuses the torch code with the norm that reads the result): sublayer k's
    phase-1 row (m, l [...]: strided views of the block's statistics; o [..., d], its own tensor or, from the torch
    code, a view of one [..., J, d]) merged with the partial sum."""
    d = partial.shape[-1]
    (m, l), o, p = _statistics(m, l), o.reshape(-1, d), partial.contiguous()
    o = o if o.stride(1) == 1 else o.contiguous()
    out = torch.empty_like(p)
    _launch(_MERGE, p.dtype, p.numel() // d, d, m.stride(0), m, l, p, weight, o.stride(0), o, out, eps=eps)
    return out


def merge_backward(
    m: Tensor, l: Tensor, partial: Tensor, weight: Tensor, out: Tensor, grad_out: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The merge's gradients: (l [...], o [..., d], partial [..., d]) and weight-gradient coefficients [...]."""
    d = partial.shape[-1]
    p, h, g = partial.contiguous(), out.contiguous(), grad_out.contiguous()
    m, l = _statistics(m, l)
    grad_l, coef = m.new_empty(m.shape[0]), m.new_empty(m.shape[0])
    grad_o, grad_p = torch.empty_like(p), torch.empty_like(p)
    _launch(_MERGE_BACKWARD, p.dtype, p.numel() // d, d, m.stride(0), m, l, p, weight, h, g, grad_l, grad_o, grad_p,
            coef, eps=eps)  # fmt: skip
    lead = partial.shape[:-1]
    return grad_l.reshape(lead), grad_o, grad_p, coef.reshape(lead)
