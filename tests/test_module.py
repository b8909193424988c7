"""The transformed module behaves like the original in a training loop."""

import copy
import io

import pytest
import torch
import zoo

import attnres_fx


@pytest.fixture(scope="module")
def llama_pair():
    """(an untransformed copy, the transformed model); transform works in place."""
    model = zoo.llama()
    original = copy.deepcopy(model)
    return original, attnres_fx.transform(model)  # default example inputs from the config


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_keeps_the_output_structure_and_optional_keywords(llama_pair) -> None:
    model, tmodel = llama_pair
    ids = zoo.token_ids()
    out = tmodel(input_ids=ids, labels=ids)
    ref = model(input_ids=ids, labels=ids, use_cache=False)
    assert type(out) is type(ref)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-4
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    masked = tmodel(input_ids=ids, attention_mask=mask).logits
    assert rel(masked, model(input_ids=ids, attention_mask=mask, use_cache=False).logits) < 5e-4
    assert tmodel(ids).logits.shape == ref.logits.shape  # positional, as the original allows


@pytest.mark.parametrize("batch,seq", [(3, 7), (1, 5), (4, 31)])
def test_batch_and_sequence_vary_without_transforming_again(llama_pair, batch: int, seq: int) -> None:
    model, tmodel = llama_pair
    ids = zoo.token_ids(batch, seq, seed=batch + seq)
    out = tmodel(input_ids=ids).logits
    assert rel(out, model(input_ids=ids, use_cache=False).logits) < 5e-4


def test_train_and_eval_switch_dropout_like_the_original() -> None:
    model = zoo.gpt2()  # dropout 0.1 on embeddings, attention and residual branches
    tmodel = attnres_fx.transform(copy.deepcopy(model))
    ids = zoo.token_ids()
    tmodel.train()
    a, b = tmodel(input_ids=ids).logits, tmodel(input_ids=ids).logits
    assert not torch.allclose(a, b)
    tmodel.eval()
    c, d = tmodel(input_ids=ids).logits, tmodel(input_ids=ids).logits
    assert torch.equal(c, d)
    model.eval()
    assert rel(c, model(input_ids=ids, use_cache=False).logits) < 5e-4


def test_state_dict_keeps_original_keys_and_adds_attnres(llama_pair) -> None:
    _, tmodel = llama_pair
    original_keys = set(zoo.llama().state_dict())
    keys = set(tmodel.state_dict())
    assert original_keys <= keys
    new = keys - original_keys
    parameters = {k for s in attnres_fx.plan(tmodel).parametrised for k in (s.query, s.key_weight)}
    assert new == parameters | {"attnres._extra_state"}  # the settings, checked when a checkpoint loads


def test_original_checkpoint_loads_and_transformed_checkpoint_round_trips(llama_pair) -> None:
    model, tmodel = llama_pair
    fresh = attnres_fx.transform(zoo.hf_causal_lm("llama"))
    with torch.no_grad():  # make the fresh model's original weights differ from the checkpoint's
        for name, p in fresh.named_parameters():
            if not name.startswith("attnres."):
                p.add_(1.0)
    result = fresh.load_state_dict(model.state_dict(), strict=False)
    assert set(result.missing_keys) == {k for k in tmodel.state_dict() if k.startswith("attnres.")}
    assert not result.unexpected_keys
    ids = zoo.token_ids()
    assert rel(fresh(input_ids=ids).logits, model(input_ids=ids, use_cache=False).logits) < 5e-4

    trained = attnres_fx.transform(zoo.hf_causal_lm("llama"))
    with torch.no_grad():
        for p in trained.attnres.parameters():
            p.normal_()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh(input_ids=ids).logits, trained(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_parameters_follow_the_model_dtype_and_softmax_is_fp32(dtype: torch.dtype) -> None:
    model = zoo.llama().to(dtype)
    tmodel = attnres_fx.transform(copy.deepcopy(model))
    assert {p.dtype for p in tmodel.attnres.parameters()} == {dtype}
    ids = zoo.token_ids()
    out = tmodel(input_ids=ids).logits
    assert out.dtype == model(input_ids=ids, use_cache=False).logits.dtype
    weights = attnres_fx.depth_weights(tmodel, input_ids=ids)
    assert all(w.dtype == torch.float32 for w in weights.values())
    tmodel.to(torch.float64)
    assert {p.dtype for p in tmodel.attnres.parameters()} == {torch.float64}


def test_depth_weights_are_uniform_at_init_and_per_token_on_request(llama_pair) -> None:
    _, tmodel = llama_pair
    ids = zoo.token_ids()
    weights = attnres_fx.depth_weights(tmodel, input_ids=ids)
    tplan = attnres_fx.plan(tmodel)
    assert list(weights) == [f"site_{s.index}" for s in tplan.sites[1:]] + ["final"]
    for site in tplan.parametrised:
        w = weights[site.name]
        assert w.shape == (site.num_sources,)
        torch.testing.assert_close(w, torch.full_like(w, 1 / site.num_sources))
    per_token = attnres_fx.depth_weights(tmodel, input_ids=ids, per_token=True)
    assert per_token["final"].shape == (tplan.final.num_sources, *ids.shape)


def test_a_bare_in_place_dcp_load_checks_the_attnres_settings(tmp_path) -> None:
    """`dcp.load(model.state_dict(), ...)` writes into the tensors it is given and calls nothing of the model; the
    settings entry is Stateful to DCP, so a checkpoint of other settings is refused there too."""
    import torch.distributed.checkpoint as dcp

    saved = attnres_fx.transform(zoo.llama(), block_size=2)
    with torch.no_grad():
        saved.attnres.site_3.query.normal_()
    dcp.save(saved.state_dict(), checkpoint_id=str(tmp_path))
    same = attnres_fx.transform(zoo.llama(), block_size=2)
    dcp.load(same.state_dict(), checkpoint_id=str(tmp_path))
    torch.testing.assert_close(same.attnres.site_3.query, saved.attnres.site_3.query)
    other = attnres_fx.transform(zoo.llama(), block_size=3)
    with pytest.raises(attnres_fx.AttnResError, match="trained with block_size 2 over 8 sublayers"):
        dcp.load(other.state_dict(), checkpoint_id=str(tmp_path))
