"""Pipeline parallelism: the depth state crosses stages as tensors, so every schedule computes what one process does.

Stages are HF copies (`pipeline_split`) or torchtitan-style copies (`pipeline_stage`); 2 processes on gloo run GPipe,
1F1B and interleaved 1F1B (2 stages per rank, naive and with cross-stage caching); in one process, stages of
different microbatches interleave."""

from pathlib import Path

import pytest
import torch
import zoo
from launch import torchrun

import attnres_fx


def one_process(kind: str) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Per-microbatch losses and the gradients of their mean, on the whole model."""
    import pp_worker

    model = pp_worker.build(kind)
    ids, target = pp_worker.batch()
    losses = []
    for mb_ids, mb_target in zip(ids.chunk(pp_worker.MICROBATCHES), target.chunk(pp_worker.MICROBATCHES)):
        out = model(input_ids=mb_ids, use_cache=False).logits if kind == "hf" else model(mb_ids)
        losses.append(pp_worker.loss_fn(out, mb_target))
    torch.stack(losses).mean().backward()
    return [x.detach() for x in losses], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def launch(tmp_path: Path, kind: str, configs: list[str]) -> dict:
    out = tmp_path / f"{kind}.pt"
    torchrun("pp_worker.py", str(out), kind, *configs)
    return torch.load(out, weights_only=False)


def assert_matches(ranks: list[dict], losses: list[torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    piped = [x for r in ranks for x in r["losses"]]
    assert len(piped) == len(losses)
    for a, b in zip(piped, losses):
        assert zoo.rel_err(a, b) < 1e-5
    summed: dict[str, torch.Tensor] = {}
    for r in ranks:
        for name, g in r["grads"].items():
            summed[name] = summed.get(name, 0) + g
    assert summed.keys() == grads.keys() and "attnres.site_1.query" in grads
    for name, g in grads.items():
        assert zoo.rel_err(summed[name], g) < 1e-5, name


@pytest.mark.parametrize(
    "kind, configs",
    [
        ("hf", ["gpipe:naive", "1f1b:naive", "interleaved:naive", "interleaved:cached"]),
        ("titan", ["1f1b:naive", "interleaved:cached"]),
    ],
)
def test_every_schedule_matches_one_process(kind: str, configs: list[str], tmp_path: Path) -> None:
    results = launch(tmp_path, kind, configs)
    losses, grads = one_process(kind)
    for config in configs:
        assert_matches(results[config], losses, grads)
    if "interleaved:cached" in configs and "interleaved:naive" in configs:
        # 4 layers, 8 sublayers, blocks of 3, 4 stages: boundaries before sublayers 2, 4 and 6, with 1, 2 and 3
        # completed sources (the start first), and a partial sum at the first two. Naive hops carry the bank;
        # cached ones only the blocks the receiving rank has not kept from its stage before (stage 2 keeps 1 block
        # from stage 0, stage 3 keeps 2 from stage 1).
        hidden = 2 * 16 * 64 * 4  # a microbatch's hidden state (and a block, a partial sum), fp32
        naive = {i: b for r in results["interleaved:naive"] for i, b in r["sent"].items()}
        cached = {i: b for r in results["interleaved:cached"] for i, b in r["sent"].items()}
        assert naive == {0: 3 * hidden, 1: 4 * hidden, 2: 4 * hidden}
        assert cached == {0: 3 * hidden, 1: 3 * hidden, 2: 2 * hidden}


def test_stages_of_different_microbatches_interleave_in_one_process() -> None:
    """Each microbatch's state travels with its own tensors: stage 1 on microbatch 0 after stage 0 ran microbatch 1."""
    model = zoo.random_depth_(attnres_fx.transform(zoo.llama(), num_blocks=3).eval())
    first, second = attnres_fx.pipeline_split(model, 2)
    microbatches = [zoo.token_ids(2, 16, seed=s) for s in (1, 2)]
    with torch.no_grad():
        outs = [first(ids) for ids in microbatches]
        logits = [second(*out) for out in outs[::-1]][::-1]
        for ids, got in zip(microbatches, logits):
            assert zoo.rel_err(got, model(input_ids=ids).logits) < 1e-5


def test_a_stage_with_layers_missing_between_is_refused() -> None:
    model = attnres_fx.transform(zoo.titan_llama(), (zoo.token_ids(),))
    stage = zoo.titan_stage(model, 0, 4)
    del stage.layers["1"]
    with pytest.raises(attnres_fx.AttnResError, match="not consecutive: `layers.0` ends at sublayer 1"):
        attnres_fx.pipeline_stage(stage)
    with pytest.raises(attnres_fx.AttnResError, match="holds no layer of a model transformed"):
        attnres_fx.pipeline_stage(zoo.titan_llama())


def test_a_model_whose_forward_changes_the_embeddings_is_not_split() -> None:
    """GPT-2 adds position embeddings to `inputs_embeds`: a later stage's input would get them twice."""
    with pytest.raises(attnres_fx.AttnResError, match="does not read the input embeddings as they are"):
        attnres_fx.pipeline_split(attnres_fx.transform(zoo.gpt2()), 2)
