"""Two-phase depth attention is exact (it equals one plain softmax per sublayer in outputs and gradients), keeps
little for the backward and compiles as one graph."""

import pytest
import torch
import zoo

import attnres_fx


def outputs_and_grads(tmodel, ids):
    tmodel.zero_grad()
    out = tmodel(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in tmodel.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block_size", [1, 3, None])
def test_two_phase_equals_plain_rewrite(block_size) -> None:
    plain = attnres_fx.transform(zoo.llama(), block_size=block_size, passes=())
    optimised = attnres_fx.transform(zoo.llama(), block_size=block_size, passes=("two_phase",))
    with torch.no_grad():
        for p in plain.attnres.parameters():
            p.normal_(std=0.3)
    optimised.attnres.load_state_dict(plain.attnres.state_dict())
    ids = zoo.token_ids()
    out_a, grads_a = outputs_and_grads(plain, ids)
    out_b, grads_b = outputs_and_grads(optimised, ids)
    assert zoo.rel_err(out_b, out_a) < 1e-5
    assert grads_a.keys() == grads_b.keys() and any(k.startswith("attnres.") for k in grads_a)
    for name in grads_a:
        assert zoo.rel_err(grads_b[name], grads_a[name]) < 1e-5, name


def saved_storages(tmodel, ids) -> list[int]:
    """Bytes of every storage the training forward keeps for the backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in tmodel.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tmodel.train()
    tmodel(input_ids=ids, labels=ids)  # captures the training graph outside the hooks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = tmodel(input_ids=ids, labels=ids).loss
    loss.backward()
    return list(storages.values())


def test_two_phase_backward_keeps_statistics_not_weighted_sums() -> None:
    """Phase 1's weighted sums ([tokens, J, d] fp32 per block) are recomputed, never kept."""
    model = zoo.llama(layers=6)  # 12 sublayers in blocks of 3
    plain = attnres_fx.transform(zoo.llama(layers=6), block_size=3, passes=())
    optimised = attnres_fx.transform(model, block_size=3)
    with torch.no_grad():
        for p in plain.attnres.parameters():
            p.normal_(std=0.3)
    optimised.attnres.load_state_dict(plain.attnres.state_dict())
    ids = zoo.token_ids()
    weighted_sums = ids.numel() * 3 * model.config.hidden_size * 4
    kept = saved_storages(optimised, ids)
    assert max(kept) < weighted_sums
    assert sum(kept) < 0.8 * sum(saved_storages(plain, ids))


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_two_phase_compiles_as_one_graph(grad) -> None:
    """Under torch.compile the hooks and the depth attention trace into one graph, without breaks."""
    torch._dynamo.reset()
    tmodel = attnres_fx.transform(zoo.llama(layers=6), block_size=3)
    with torch.no_grad():
        for p in tmodel.attnres.parameters():  # non-zero queries: the mixes differ clearly from the plain stream
            p.normal_(std=0.3)
    ids = zoo.token_ids()
    dynamo_graphs = []

    def backend(gm, example_inputs):
        dynamo_graphs.append(gm)
        return gm.forward

    with torch.set_grad_enabled(grad):
        expected = tmodel(input_ids=ids).logits
        out = torch.compile(tmodel, backend=backend, fullgraph=True)(input_ids=ids).logits
    assert zoo.rel_err(out, expected) < 1e-6
    assert len(dynamo_graphs) == 1
