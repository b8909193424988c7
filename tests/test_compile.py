"""torch.compile (default Inductor) trains transformed models: parity with eager, outputs and grads.

MoE architectures get the same check, plus training steps, in test_moe.py."""

import os

import pytest
import torch
import zoo

import attnres_fx
from attnres_fx import cpu_kernels

pytestmark = pytest.mark.compile


def step(model, args, kwargs):
    model.zero_grad()
    out = zoo.main_output(model(*args, **kwargs))
    out.float().pow(2).mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


# Qwen3 and Mistral compile to what Llama does (same layer structure); CI keeps to one of the family.
SAME_AS_LLAMA = pytest.mark.skipif(
    not os.environ.get("ATTNRES_SLOW"), reason="Llama-family duplicate; ATTNRES_SLOW=1 runs it"
)
ARCHS = [
    pytest.param(a, marks=SAME_AS_LLAMA) if a in ("qwen3", "mistral") else a
    for a in zoo.ARCHITECTURES
    if a not in zoo.MOE
]


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_training_step_matches_eager(arch: str, monkeypatch) -> None:
    """In one graph; on CPU phase 1 and its backward run on the C++ operator (one kernel for every block count) and
    the merge is left to Inductor, which fuses it with the norm that reads it."""
    factory, make_call, _ = zoo.ARCHITECTURES[arch]
    args, kwargs = make_call()
    tmodel = attnres_fx.transform(factory(layers=zoo.COMPILE_LAYERS), args or kwargs, block_size=2)
    with torch.no_grad():
        for p in tmodel.attnres.parameters():
            p.normal_(std=0.3)
    out_e, grads_e = step(tmodel, args, kwargs)
    launched = set()
    launch = cpu_kernels._launch
    monkeypatch.setattr(cpu_kernels, "_launch", lambda op, *a, **k: launched.add(op) or launch(op, *a, **k))
    out_c, grads_c = step(torch.compile(tmodel, fullgraph=True), args, kwargs)
    assert launched == {cpu_kernels._PHASE_ONE, cpu_kernels._PHASE_ONE_BACKWARD}
    assert zoo.rel_err(out_c, out_e) < 1e-5
    assert grads_c.keys() == grads_e.keys()
    assert {"attnres.site_1.query", "attnres.final.key_weight"} <= grads_c.keys()
    for name in grads_e:
        assert zoo.rel_err(grads_c[name], grads_e[name]) < 1e-5, name


@pytest.mark.parametrize("seq", [64, 8], ids=["128 tokens", "decoding sizes"])
def test_compiled_inference_runs_phase_one_on_the_operator_from_128_tokens(seq: int, monkeypatch) -> None:
    """Without autograd, a compiled graph runs phase 1 on the C++ operator where a call has 128 tokens or more (one
    kernel for every block count), and as Inductor's torch code below (decoding: the operator's fixed cost per call
    would dominate); the same outputs as eager either way."""
    torch._dynamo.reset()
    tmodel = attnres_fx.transform(zoo.llama(layers=zoo.COMPILE_LAYERS), block_size=2).eval()
    with torch.no_grad():
        for p in tmodel.attnres.parameters():
            p.normal_(std=0.3)
        ids = zoo.token_ids(seq=seq)
        expected = tmodel(input_ids=ids).logits
        launched = set()
        launch = cpu_kernels._launch
        monkeypatch.setattr(cpu_kernels, "_launch", lambda op, *a, **k: launched.add(op) or launch(op, *a, **k))
        out = torch.compile(tmodel, fullgraph=True)(input_ids=ids).logits
    assert launched == ({cpu_kernels._PHASE_ONE} if ids.numel() >= 128 else set())
    assert zoo.rel_err(out, expected) < 1e-5


def test_dynamo_hands_the_depth_attention_functions_to_aotautograd_as_calls() -> None:
    """Dynamo traced each call of the depth attention's autograd Functions, forward and backward (2 of the 3.5 s of
    Dynamo's tracing of the 8-layer benchmark model): its graph now holds the calls, which AOTAutograd traces."""
    from attnres_fx import ops

    graphs = []
    tmodel = attnres_fx.transform(zoo.llama(layers=2), block_size=3).train()
    ids = zoo.token_ids()
    compiled = torch.compile(tmodel, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)
    compiled(input_ids=ids, labels=ids, use_cache=False)
    (graph,) = [g.graph for g in graphs]
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert {ops._block_scores_call, ops._merge_call, ops._normalize_call} <= set(targets)
    assert not [t for t in targets if "autograd_function_apply" in str(t)]


def test_compiled_backward_sums_no_block_gradients_outside_the_phase_one_kernel() -> None:
    """A completed block is read by the phase 1 of every later block. Summed by autograd, its gradients from all of
    them are one n-ary add, which Inductor compiles into a kernel per block count (7 of the 25 C++ kernels of the
    8-layer benchmark model). The blocks are handed from one phase 1 to the next, whose backward kernel adds what later
    ones passed back: in the compiled backward (AOTAutograd's graph), no add takes two phase-1 gradients."""
    import operator

    from torch._dynamo.backends.common import aot_autograd

    graphs = []
    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: graphs.append(gm) or gm)
    tmodel = attnres_fx.transform(zoo.llama(layers=4), num_blocks=4).train()
    ids = zoo.token_ids()
    torch.compile(tmodel, backend=backend, fullgraph=True)(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    def is_phase_one_backward(node: torch.fx.Node) -> bool:
        op = torch.ops.attnres_fx.cpu_phase_one_backward.default
        return node.target is torch.ops.higher_order.auto_functionalized_v2 and node.args[0] is op

    def phase_one_backward(node: object) -> bool:
        """Whether `node` is (an output, or a view of one, of) a phase-1 backward."""
        while isinstance(node, torch.fx.Node) and node.op == "call_function" and (
            node.target is operator.getitem or "view" in str(node.target)
        ):
            node = node.args[0]
        return isinstance(node, torch.fx.Node) and is_phase_one_backward(node)

    (graph,) = [g.graph for g in graphs]
    assert sum(is_phase_one_backward(n) for n in graph.nodes) == 5  # the stream's start and four blocks opening
    adds = [n for n in graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert adds and not [n for n in adds if all(phase_one_backward(a) for a in n.args[:2])]


def test_per_layer_compile_compiles_each_layer_configuration_once() -> None:
    """torchtitan's regional compile, `layer.compile(fullgraph=True)` on each of 12 layers: every layer reads state of
    the same shapes at any depth and is handed its parameters in order, so Dynamo compiles one graph per layer
    configuration. Blocks of 4 sublayers over 2 per layer: a layer whose first sublayer opens a block, one whose
    exit does, and the last (which returns the final aggregation). With fullgraph and the recompile limit an error
    (conftest), no layer can run eagerly."""
    import copy

    from torch._dynamo.utils import counters

    tmodel = zoo.random_depth_(attnres_fx.transform(zoo.llama(layers=12), num_blocks=6).train())
    eager = copy.deepcopy(tmodel)
    for layer in tmodel.model.layers:
        layer.compile(fullgraph=True)
    ids = zoo.token_ids()
    counters.clear()
    grads = []
    for model in (tmodel, eager):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert counters["stats"]["unique_graphs"] == 3
    (loss, compiled), (expected_loss, expected) = grads
    assert zoo.rel_err(loss, expected_loss) < 1e-5
    assert compiled.keys() == expected.keys()
    for name, grad in expected.items():
        assert zoo.rel_err(compiled[name], grad) < 1e-4, name
