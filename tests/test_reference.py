"""Transformed models equal an independent hand-written Block AttnRes with non-zero queries."""

import copy

import pytest
import reference
import torch
import zoo

import attnres_fx

CASES = {
    "llama": (zoo.llama, zoo.token_ids, reference.llama_reference),
    "gpt2": (zoo.gpt2, zoo.token_ids, reference.gpt2_reference),
    "vit": (zoo.vit, zoo.images, reference.vit_reference),
}


@pytest.mark.parametrize("block_size", [1, 2, 3, None])
@pytest.mark.parametrize("arch", list(CASES))
def test_matches_hand_written_reference(arch: str, block_size: int | None) -> None:
    factory, make_input, ref_fn = CASES[arch]
    model, x = factory(), make_input()
    original_model = copy.deepcopy(model)  # transform works in place; the reference runs the untouched modules
    call = {"input_ids": x, "use_cache": False} if arch != "vit" else (x,)
    tmodel = attnres_fx.transform(model, call, block_size=block_size)
    params = reference.random_site_parameters_(tmodel)
    size = attnres_fx.plan(tmodel).block_size
    assert size == (block_size or 1)  # 8 sublayers, 8 blocks by default
    with torch.no_grad():
        out = zoo.main_output(tmodel(**call) if isinstance(call, dict) else tmodel(*call))
        expected = ref_fn(original_model, x, params, size)
        plain = attnres_fx.transform(factory(), call, block_size=block_size, passes=())
        plain.load_state_dict(tmodel.state_dict())
        out_plain = zoo.main_output(plain(**call) if isinstance(call, dict) else plain(*call))
    scale = expected.abs().max()
    # fp32 rounding differs between the two orders of summation: about 1e-5 of the logits' scale
    assert (out - expected).abs().max() / scale < 1e-4
    assert (out_plain - expected).abs().max() / scale < 1e-4
    # the check can fail: the original (no AttnRes) differs clearly once queries are non-zero
    original = zoo.main_output(original_model(**call) if isinstance(call, dict) else original_model(*call))
    assert (original - expected).abs().max() / scale > 1e-2

