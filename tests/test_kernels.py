"""The kernels compute what the torch ops compute, outputs and every gradient: the Triton kernels (`kernels.py`) and
the C++ phase-1 kernel for CPU tensors (`cpu_kernels.py`).

On a machine without a GPU the Triton kernels run under the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before triton is imported); with one, on CUDA tensors. The C++ kernel runs on CPU tensors. Each case
runs the same two-phase block twice, once on the kernels and once on the torch code, from the same inputs.
"""

import pytest
import torch
import zoo
from torch.testing._internal.two_tensor import TwoTensor
from torch.utils._python_dispatch import TorchDispatchMode

import attnres_fx
from attnres_fx import cpu_kernels, kernels, ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
# (token dims, d, completed blocks, sublayers per block); tokens not a multiple of any tile, d not a power of two
CASES = {
    "ragged-d96": ((2, 37), 96, 3, 4),
    "one-block-one-sublayer": ((5,), 64, 1, 1),
    "full-attnres-many-blocks": ((3, 7), 40, kernels.MAX_BLOCKS + 3, 1),
    "two-launches-block-size-3": ((19,), 96, kernels.MAX_BLOCKS + 1, 3),
    "block-of-six-sublayers": ((23,), 40, 4, 6),  # more rows than the C++ kernel holds in registers at once
}


PHASE_ONE, MERGE = {"phase_one", "phase_one_backward"}, {"merge", "merge_backward"}
KERNELS = {"triton": kernels, "cpu": cpu_kernels}  # family: its module (phase 1 and the merge, each with a backward)
FAMILIES = list(KERNELS)


def device_of(family: str | None) -> str:
    """The C++ kernel computes for CPU tensors; the Triton kernels for CUDA ones, or under the interpreter."""
    return "cpu" if family == "cpu" else DEVICE


class Routing:
    """Routes the ops to one family of kernels or to the torch code, whatever the device, and records which kernels
    ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.monkeypatch, self.launched = monkeypatch, set()
        for module in KERNELS.values():
            for name in PHASE_ONE | MERGE:
                op = getattr(module, name)
                monkeypatch.setattr(module, name, lambda *a, op=op, name=name: self.launched.add(name) or op(*a))

    def __call__(self, family: str | None) -> None:
        """`family`: "triton", "cpu", or None for the torch code."""
        self.launched.clear()
        self.monkeypatch.setattr(ops, "_on_kernels", lambda x: family == "triton")
        self.monkeypatch.setattr(cpu_kernels, "handles", lambda *x: family == "cpu")


@pytest.fixture
def on_kernels(monkeypatch) -> Routing:
    return Routing(monkeypatch)


def block_inputs(lead, d, completed, sublayers, dtype, values_in, device):
    """Random inputs in `dtype` holding values of `values_in` (bf16 values in fp32 for a bf16 run's reference)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(values_in).to(device, dtype).requires_grad_()

    blocks = [rand(*lead, d, scale=1 + i) for i in range(completed)]  # magnitudes that differ, as depth makes them
    partials = [rand(*lead, d) for _ in range(sublayers - 1)]
    queries = [rand(d, scale=0.5) for _ in range(sublayers)]
    key_weights = [(1 + rand(d, scale=0.1)).detach().requires_grad_() for _ in range(sublayers)]
    cotangents = [torch.randn(*lead, d, generator=g).to(device) for _ in range(sublayers)]
    return blocks, partials, queries, key_weights, cotangents


def two_phase_block(blocks, partials, queries, key_weights, cotangents, empty=0):
    """One block's sublayer inputs through the ops, and the gradients of a random projection of them. With `empty`,
    phase 1 also reads that many zero placeholders before the blocks, masked by a -inf bias (a layer's fixed-size
    bank, see `state.py`)."""
    slots = [torch.zeros_like(blocks[0]) for _ in range(empty)] + blocks
    bias = torch.tensor([float("-inf")] * empty + [0.0] * len(blocks), device=blocks[0].device) if empty else None
    stats = ops.block_scores(slots, queries, key_weights, EPS, bias)
    outs = [ops.completed_only(stats, 0, blocks[0])]
    outs += [ops.merge_partial(stats, k, p, EPS) for k, p in enumerate(partials, 1)]
    leaves = [*blocks, *partials, *queries, *key_weights]
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cotangents))
    return [o.detach() for o in outs], torch.autograd.grad(loss, leaves)


def err(a, b) -> float:
    """Largest difference relative to the reference's largest magnitude, or absolute below magnitude 1: with one
    source the softmax is constant and the query's gradient is exactly zero, which rounding cannot be relative to."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1.0)).item()


def run(route, family, case, dtype, values_in=None, empty=0, device=None):
    """The block on a family of kernels or (None) on the torch code, on that family's device; checks that exactly the
    kernels it needs ran (or none)."""
    route(family)
    inputs = block_inputs(*case, dtype, values_in or dtype, device or device_of(family))
    result = two_phase_block(*inputs, empty=empty)
    sublayers = case[-1]
    expected = (PHASE_ONE | MERGE) if family else set()
    assert route.launched == (expected if sublayers > 1 else expected - MERGE)
    return result


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernels_equal_torch_ops_fp32(on_kernels, family, case) -> None:
    outs, grads = run(on_kernels, family, case, torch.float32)
    ref_outs, ref_grads = run(on_kernels, None, case, torch.float32, device=device_of(family))
    for out, ref in zip(outs, ref_outs):
        assert err(out, ref) < 1e-5
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert err(grad, ref) < 1e-5


@pytest.mark.parametrize("family", [*FAMILIES, None], ids=[*FAMILIES, "torch"])
@pytest.mark.parametrize("case", [CASES["ragged-d96"], CASES["two-launches-block-size-3"]], ids=["one", "two launches"])
def test_masked_placeholder_slots_change_nothing(on_kernels, family, case) -> None:
    """Placeholders before the blocks (the oldest slots, as in the bank), masked: the same outputs and gradients as the
    blocks alone, on the kernels (the Triton ones fold the newest slot first, so their running max starts finite) and
    the torch code; with more slots than one Triton launch reads, the bias of each launch's own blocks."""
    outs, grads = run(on_kernels, family, case, torch.float32, empty=kernels.MAX_BLOCKS - 1)
    ref_outs, ref_grads = run(on_kernels, family, case, torch.float32)
    for out, ref in zip(outs, ref_outs):
        assert err(out, ref) < 1e-5
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert err(grad, ref) < 1e-5


@pytest.mark.parametrize("family", [*FAMILIES, None], ids=[*FAMILIES, "torch"])
@pytest.mark.parametrize("empty", [0, 2], ids=["blocks", "placeholders"])
def test_gradients_passed_back_through_handed_on_blocks_are_added(on_kernels, family, empty) -> None:
    """A later block's phase 1 reads the blocks that an earlier one handed on (`BlockStats.blocks`, as the depth state
    does), and the earlier call adds the gradients passed back through them to its own: the gradients of every input
    are those of two calls that read the same blocks directly, which autograd sums. With placeholder slots (masked),
    whose gradients are passed on alone."""
    route = on_kernels
    route(family)
    blocks, partials, queries, key_weights, cotangents = block_inputs(
        (3, 11), 40, 3, 2, torch.float32, torch.float32, device_of(family)
    )
    slots = [torch.zeros_like(blocks[0]).requires_grad_() for _ in range(empty)] + blocks
    bias = torch.tensor([float("-inf")] * empty + [0.0] * len(blocks), device=blocks[0].device) if empty else None
    leaves = [*slots, *partials, *queries, *key_weights]
    results = []
    for handed_on in (True, False):
        first = ops.block_scores(slots, queries[:1], key_weights[:1], EPS, bias)
        read = list(first.blocks) if handed_on else slots
        later = ops.block_scores(read + [partials[0]], queries[1:], key_weights[1:], EPS,
                                 None if bias is None else torch.cat([bias, bias[-1:]]))
        outs = [ops.completed_only(first, 0, blocks[0]), ops.completed_only(later, 0, blocks[0])]
        loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
        results.append(torch.autograd.grad(loss, leaves, allow_unused=True))
    assert route.launched == (PHASE_ONE if family else set())
    for grad, ref in zip(*results, strict=True):
        if ref is None:  # a placeholder: read by nothing
            assert grad is None or not grad.any()
        else:
            assert err(grad, ref) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernels_in_bf16_match_an_fp32_reference(on_kernels, family, case) -> None:
    """bf16 in and out, fp32 statistics, against the torch ops in fp32 on the same (bf16) values. bf16 keeps 8
    significant bits: a rounding costs up to 2^-8 of a value on a GPU and in C++ (to nearest), 2^-7 under the
    interpreter (toward zero). An output meets two (phase 1's weighted sum, the result): 2 x 2^-7 < 2%; a gradient up
    to four (the output it is computed from, the upstream gradient, its own): < 4%. A wrong index or dropped term is
    off by O(1)."""
    outs, grads = run(on_kernels, family, case, torch.bfloat16)
    ref_outs, ref_grads = run(on_kernels, None, case, torch.float32, torch.bfloat16, device=device_of(family))
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == torch.bfloat16
        assert err(out, ref) < 2e-2
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert err(grad, ref) < 4e-2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("block_size", "merges"), [(3, True), (1, False)], ids=["3", "full"])
def test_kernels_run_inside_a_transformed_model(on_kernels, family, block_size, merges) -> None:
    """A transformed model's outputs and every gradient are the same on the kernels as on the torch ops (Full
    AttnRes: 8 sublayers, each its own block, so the last sites read more blocks than one Triton launch takes, and no
    partial sum is ever merged)."""
    device = device_of(family)
    model = attnres_fx.transform(zoo.llama(layers=4).to(device), block_size=block_size)
    with torch.no_grad():
        for p in model.attnres.parameters():
            p.normal_(std=0.3)
    ids = zoo.token_ids().to(device)
    results = []
    for use in (family, None):
        on_kernels(use)
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        if use:
            assert on_kernels.launched == (PHASE_ONE | MERGE if merges else PHASE_ONE)
    (logits, grads), (ref_logits, ref_grads) = results
    assert zoo.rel_err(logits, ref_logits) < 1e-5
    for name, ref in ref_grads.items():
        assert zoo.rel_err(grads[name], ref) < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor compiles Triton kernels for CUDA tensors only")
def test_kernels_compile_into_one_graph_on_cuda() -> None:
    """On a GPU, phase 1's kernels are traced by torch.compile (fullgraph) and the result matches eager."""
    torch._dynamo.reset()
    model = attnres_fx.transform(zoo.llama(layers=4).cuda(), block_size=3)
    with torch.no_grad():
        for p in model.attnres.parameters():
            p.normal_(std=0.3)
    ids = zoo.token_ids().cuda()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._inductor.compile_fx.compile_fx(gm, example_inputs)

    results = []
    for call in (model, torch.compile(model, backend=backend, fullgraph=True)):
        model.zero_grad()
        out = call(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(graphs) == 1 and any("attnres_fx.phase_one" in str(n.target) for n in graphs[0].graph.nodes)
    (logits, grads), (ref_logits, ref_grads) = results
    assert zoo.rel_err(logits, ref_logits) < 1e-4
    for name, ref in ref_grads.items():
        assert zoo.rel_err(grads[name], ref) < 1e-4, name


def test_sources_of_mixed_dtypes_as_under_autocast() -> None:
    """Under autocast a stream's start can be fp32 and later blocks bf16. The C++ kernel reads all sources as one
    dtype, so such blocks are left to the torch code: the same outputs and gradients as with the C++ kernels switched
    off (reading a bf16 block as fp32 is off by O(1))."""
    results = []
    for use in (True, False):
        torch.manual_seed(0)
        inputs = block_inputs((3, 5), 64, 3, 2, torch.float32, torch.float32, "cpu")
        blocks, partials, queries, key_weights, cotangents = inputs
        blocks[1:] = [b.detach().bfloat16().requires_grad_() for b in blocks[1:]]
        with pytest.MonkeyPatch.context() as patch:
            if not use:
                patch.setattr(cpu_kernels, "handles", lambda *x: False)
            results.append(two_phase_block(blocks, partials, queries, key_weights, cotangents))
    (outs, grads), (ref_outs, ref_grads) = results
    for out, ref in zip(outs, ref_outs):
        assert err(out, ref) < 1e-5
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert err(grad, ref) < 1e-5


class _SelectBackwardShapes(TorchDispatchMode):
    """Records the shape of every gradient that `select_backward` builds (a zero-filled tensor of the sliced one's
    shape, with the slice's gradient copied in)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.select_backward.default:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("family", [*FAMILIES, None], ids=[*FAMILIES, "torch"])
def test_each_sublayer_row_of_phase_one_takes_its_gradient_alone(on_kernels, family) -> None:
    """Phase 1 hands each sublayer its weighted sum as a tensor of its own, so the backward passes each sublayer's
    gradient to phase 1 as it is: no [..., J, d] zero-filled gradient per sublayer, summed over the J of them (what
    slices of one stacked tensor cost: J times the statistics' size in writes, per block)."""
    lead, d, completed, sublayers = CASES["ragged-d96"]
    on_kernels(family)
    blocks, partials, queries, key_weights, cotangents = block_inputs(
        lead, d, completed, sublayers, torch.float32, torch.float32, device_of(family)
    )
    with _SelectBackwardShapes() as seen:
        two_phase_block(blocks, partials, queries, key_weights, cotangents)
    assert (*lead, sublayers, d) not in seen.shapes


def test_tensor_subclasses_are_left_to_the_torch_code() -> None:
    """The C++ kernels read memory by address, which a tensor subclass does not have of its own (sequence
    parallelism's all-gathered stream is an AsyncCollectiveTensor, whose address is 0 until it is waited for): phase 1
    and the merge of a subclass's values compute as torch code, and give what the kernels give on the plain values."""
    blocks, partials, queries, key_weights, _ = block_inputs((3, 5), 64, 3, 2, torch.float32, torch.float32, "cpu")
    results = []
    with torch.no_grad():
        for wrap in (lambda t: t, lambda t: TwoTensor(t, t.clone())):
            sources = [wrap(b.detach()) for b in blocks]
            stats = ops.block_scores(sources, queries, key_weights, EPS)
            results.append(ops.merge_partial(stats, 1, wrap(partials[0].detach()), EPS))
    plain, wrapped = results
    assert isinstance(wrapped, TwoTensor)
    assert err(wrapped.a, plain) < 1e-5 and err(wrapped.b, plain) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("empty", [0, 2], ids=["blocks", "placeholders"])
def test_one_call_mix_equals_the_torch_mix(monkeypatch, dtype, empty) -> None:
    """Without autograd the C++ kernel computes a site's plain mix in one call: what the torch code computes, also
    over a source that is not contiguous and with placeholder slots that a -inf bias masks."""
    blocks, partials, queries, key_weights, _ = block_inputs((3, 7), 96, 3, 2, dtype, dtype, "cpu")
    sources = [torch.zeros_like(blocks[0]) for _ in range(empty)] + [s.detach() for s in (*blocks, partials[0])]
    sources[-2] = sources[-2].transpose(0, 1).contiguous().transpose(0, 1)  # the same values, strided
    bias = torch.tensor([float("-inf")] * empty + [0.0] * (len(sources) - empty)) if empty else None
    query, key_weight = queries[1].detach(), key_weights[1].detach()
    with torch.no_grad():
        kernel = cpu_kernels.mix(sources, query, key_weight, bias, EPS)
        monkeypatch.setattr(cpu_kernels, "handles", lambda *x: False)
        torch_code = ops.depth_attention(sources, query, key_weight, EPS, bias)
    assert kernel is not None and kernel.dtype == dtype and kernel.shape == sources[0].shape
    assert err(kernel, torch_code) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(("tokens", "one_call"), [(ops._PLAIN_TOKENS, True), (ops._PLAIN_TOKENS + 1, False)])
def test_a_few_tokens_without_autograd_mix_each_site_in_one_call(on_kernels, monkeypatch, tokens, one_call) -> None:
    """Decoding (no autograd, a few tokens a call) each parametrised site is one call of the C++ mix, with no phase 1
    and no merge; from more tokens on, the two phases compute. Either way the logits are the two phases' with
    autograd on."""
    model = attnres_fx.transform(zoo.llama(layers=4), block_size=3)
    with torch.no_grad():
        for p in model.attnres.parameters():
            p.normal_(std=0.3)
    ids = zoo.token_ids(batch=1, seq=tokens)
    reference = model(input_ids=ids).logits.detach()
    on_kernels("cpu")
    mixes = []
    monkeypatch.setattr(cpu_kernels, "mix", lambda *a, mix=cpu_kernels.mix: mixes.append(1) or mix(*a))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    sites = len(list(model.attnres.children()))
    assert (len(mixes), on_kernels.launched) == ((sites, set()) if one_call else (0, {"phase_one", "merge"}))
    assert zoo.rel_err(logits, reference) < 1e-5
