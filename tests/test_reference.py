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


@pytest.mark.parametrize("masked", [False, True])
def test_phase_one_under_no_grad_equals_the_training_form(masked: bool) -> None:
    # Under no_grad (eager decoding) phase 1 runs as matmuls over the stacked blocks; with grad, as the per-block
    # form Inductor fuses. Both must give the same statistics, placeholders masked or not.
    from attnres_fx import ops

    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randn(2, 5, 16, generator=gen) * (i + 1) for i in range(4)]
    inv_rms = [ops.inverse_rms(b, 1e-6) for b in blocks]
    queries = [torch.randn(16, generator=gen) for _ in range(3)]
    key_weights = [1 + 0.1 * torch.randn(16, generator=gen) for _ in range(3)]
    bias = torch.tensor([float("-inf"), 0.0, 0.0, 0.0]) if masked else None
    with torch.no_grad():
        stacked = ops.block_scores(blocks, inv_rms, queries, key_weights, bias)
    trained = ops.block_scores(blocks, inv_rms, [q.requires_grad_() for q in queries], key_weights, bias)
    for s, t in zip(stacked, trained):
        torch.testing.assert_close(s, t.detach())
