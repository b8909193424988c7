"""Models whose stream does not run through one layer module per layer run their own forward too, with what users put
around them: x-transformers (every add in `AttentionLayers.forward`), a model whose own forward holds the adds, a
layer called at two depths (with a norm computed in its forward), timm MViTv2 (one stream per stage, each but the
first starting inside the stage's first block). Each: the function at zero init, an independent reference with
random queries where one is at hand, hooks, activation checkpointing, bf16 and autocast, torch.save / pickle /
deepcopy / state dict. (FSDP2 per block: test_distributed.py.)"""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import reference
import torch
import torch.nn.functional as F
import zoo
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

import attnres_fx


def ids() -> tuple[torch.Tensor]:
    return (zoo.token_ids(),)


def images() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)


# factory, example inputs, a branch module, what a user checkpoints (the branches, or whole layers)
MODELS = {
    "x-transformers": (zoo.x_transformer, ids, "attn_layers.layers.1.1", r"attn_layers\.layers\.\d+\.1"),
    "root forward": (zoo.root_forward_gpt, ids, "subs.1.fn", r"subs\.\d+\.fn"),
    "shared layer": (zoo.shared_layer_model, ids, "layers.1.mlp", r"layers\.\d+"),
    "mvitv2": (zoo.mvitv2, images, "stages.2.blocks.1.mlp", r"stages\.2\.blocks\.\d+"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    """(name, an untransformed copy, the transformed model with random queries, example inputs)."""
    make, inputs, _, _ = MODELS[request.param]
    model = make()
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model, inputs())
    assert tmodel is model
    with torch.no_grad():
        assert zoo.rel_err(zoo.main_output(tmodel(*inputs())), zoo.main_output(original(*inputs()))) < 1e-3
    return request.param, original, zoo.random_depth_(tmodel, 0.3, 7), inputs()


def out(model: torch.nn.Module, x: tuple) -> torch.Tensor:
    return zoo.main_output(model(*x))


def test_random_queries_change_the_function_the_same_way_at_every_call(pair) -> None:
    _, original, tmodel, x = pair
    with torch.no_grad():
        first, again, plain = out(tmodel, x), out(tmodel, x), out(original, x)
    assert torch.equal(first, again) and zoo.rel_err(first, plain) > 1e-2


def test_hooks_on_the_models_modules_fire_once_per_call(pair) -> None:
    name, _, tmodel, x = pair
    fired = []
    handles = [
        tmodel.get_submodule(MODELS[name][2]).register_forward_hook(lambda *a: fired.append("branch")),
        tmodel.register_forward_pre_hook(lambda *a: fired.append("model")),
    ]
    with torch.no_grad():
        out(tmodel, x), out(tmodel, x)
    for h in handles:
        h.remove()
    assert fired == ["model", "branch"] * 2


def grads(model: torch.nn.Module, x: tuple) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out(model, x).pow(2).mean().backward()
    return {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients(pair) -> None:
    name, _, tmodel, x = pair
    plain = copy.deepcopy(tmodel)
    checkpointed = copy.deepcopy(tmodel)
    chosen = {id(m) for path, m in checkpointed.named_modules() if re.fullmatch(MODELS[name][3], path)}
    apply_activation_checkpointing(checkpointed, check_fn=lambda m: id(m) in chosen)
    assert chosen
    expected = grads(plain.eval(), x)  # eval: no dropout, so both runs draw nothing
    got = grads(checkpointed.eval(), x)
    assert got.keys() == expected.keys() and any(k.startswith("attnres.") for k in got)
    for key, grad in expected.items():
        assert zoo.rel_err(got[key], grad) < 1e-5, key


# bf16 bounds. A wrong dtype or a dropped term is off by O(1). MViTv2 (4 streams of random-query depth attention,
# pooled) amplifies rounding the most: under autocast its torch-op path is 0.088 off fp32, and the same ops summing
# phase 1's blocks in reverse order are 0.155 off (its untransformed original: 0.021).
BF16_BOUND = {"mvitv2": 0.2}


def test_bf16_and_autocast_stay_close_to_fp32(pair) -> None:
    name, _, tmodel, x = pair
    with torch.no_grad():
        expected = out(tmodel, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = out(tmodel, x)
        half = copy.deepcopy(tmodel).to(torch.bfloat16)
        moved = out(half, tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in x))
    assert moved.dtype == torch.bfloat16 and {p.dtype for p in half.attnres.parameters()} == {torch.bfloat16}
    bound = BF16_BOUND.get(name, 0.1)
    assert zoo.rel_err(moved, expected) < bound and zoo.rel_err(autocast, expected) < bound


def test_save_load_pickle_deepcopy_and_state_dict_keep_the_transformed_model(pair) -> None:
    name, _, tmodel, x = pair
    with torch.no_grad():
        expected = out(tmodel, x)
        buffer = io.BytesIO()
        torch.save(tmodel, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for copied in (loaded, pickle.loads(pickle.dumps(tmodel)), copy.deepcopy(tmodel)):
            assert torch.equal(out(copied, x), expected)
        fresh = attnres_fx.transform(MODELS[name][0](), x)  # a new copy, transformed, then the state dict
        fresh.load_state_dict(tmodel.state_dict())
        assert torch.equal(out(fresh, x), expected)
    assert attnres_fx.plan(loaded).streams == attnres_fx.plan(tmodel).streams


@pytest.mark.parametrize("norm", ["use_rmsnorm", "use_scalenorm"])
def test_x_transformers_norms_written_with_f_normalize_are_norms(norm: str) -> None:
    """`F.normalize(x, dim=-1) * scale * g`: recognised by what it computes, so the model is pre-norm."""
    model = zoo.x_transformer(depth=2, **{norm: True})
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model, ids())
    assert len(attnres_fx.plan(tmodel).sites) == 4
    with torch.no_grad():
        assert zoo.rel_err(out(tmodel, ids()), out(original, ids())) < 1e-4
        zoo.random_depth_(tmodel)
        assert zoo.rel_err(out(tmodel, ids()), out(original, ids())) > 1e-2


# --- independent references with random queries -------------------------------------------------------------


def test_root_forward_model_equals_the_hand_written_reference() -> None:
    model = zoo.root_forward_gpt()
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model, ids(), block_size=2)
    with torch.no_grad():
        params = reference.random_site_parameters_(tmodel)
        start = original.wte(ids()[0])
        mixed = reference.block_attnres(start, list(original.subs), params, 2, 1e-5)
        expected = original.lm_head(original.ln_f(mixed))
        assert zoo.rel_err(tmodel(*ids()), expected) < 1e-4


def test_a_layer_called_at_two_depths_equals_the_hand_written_reference() -> None:
    model = zoo.shared_layer_model()
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model, ids(), block_size=3)
    assert attnres_fx.plan(tmodel).rewritten == ("layers.0", "layers.1", "layers.2")  # the F.rms_norm
    sublayers = []
    for i in (0, 1, 0, 2):
        layer = original.layers[i]
        sublayers += [
            lambda h, layer=layer: layer.attn(F.rms_norm(h, (h.shape[-1],), eps=1e-6)),
            lambda h, layer=layer: layer.mlp(layer.norm2(h)),
        ]
    with torch.no_grad():
        params = reference.random_site_parameters_(tmodel)
        mixed = reference.block_attnres(original.embed(ids()[0]), sublayers, params, 3, 1e-6)
        expected = original.head(original.norm(mixed))
        assert zoo.rel_err(tmodel(*ids()), expected) < 1e-4
