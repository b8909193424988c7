"""torch.compile (default Inductor) trains the transformed model: parity with eager."""


import pytest
import torch
import zoo

import attnres_fx

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def models():
    model = zoo.hf_causal_lm("llama", num_hidden_layers=2)
    tmodel = attnres_fx.transform(model, block_size=2)
    with torch.no_grad():
        for p in tmodel.attnres.parameters():
            p.normal_(std=0.3)
    return tmodel, torch.compile(tmodel)


def step(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def test_compiled_training_step_matches_eager(models) -> None:
    eager, compiled = models
    ids = zoo.token_ids()
    loss_e, logits_e, grads_e = step(eager, ids)
    loss_c, logits_c, grads_c = step(compiled, ids)
    assert zoo.rel_err(logits_c, logits_e) < 1e-5
    assert zoo.rel_err(loss_c, loss_e) < 1e-5
    assert grads_c.keys() == grads_e.keys()
    assert all(f"attnres.{s}" in " ".join(grads_c) for s in ("site_1.query", "final.key_weight"))
    for name in grads_e:
        assert zoo.rel_err(grads_c[name], grads_e[name]) < 1e-5, name
