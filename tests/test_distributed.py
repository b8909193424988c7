"""Data, tensor and sequence parallelism around the transformed model, 2 processes on gloo, against one process on
the whole batch: FSDP2 per layer and root (eager and compiled), torchtitan's TP + SP plan with the depth parameters'
plan entry; and the orders of calls that are refused."""

from pathlib import Path

import pytest
import torch
import zoo
from launch import torchrun

import attnres_fx


@pytest.mark.parametrize(
    "mode", ["eager", *(pytest.param(m, marks=pytest.mark.compile) for m in ("compiled", "per-layer"))]
)
def test_fsdp2_per_layer_matches_one_process(mode: str, tmp_path: Path) -> None:
    import fsdp_worker

    out = tmp_path / "rank0.pt"
    torchrun("fsdp_worker.py", str(out), mode)
    sharded = torch.load(out)

    model = fsdp_worker.build()
    ids = fsdp_worker.batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert zoo.rel_err(sharded["loss"], loss) < 1e-5
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sharded["grads"].keys() == expected.keys() and "attnres.site_1.query" in expected
    for name, grad in expected.items():
        assert zoo.rel_err(sharded["grads"][name], grad) < 1e-5, name


def test_fsdp2_per_block_on_models_with_their_own_forward_matches_one_process(tmp_path: Path) -> None:
    """x-transformers, a model whose forward holds the adds, MViTv2: blocks and root sharded, one process's step."""
    import own_forward_fsdp_worker as worker

    out = tmp_path / "rank0.pt"
    torchrun("own_forward_fsdp_worker.py", str(out))
    sharded = torch.load(out)
    assert sharded.keys() == worker.MODELS.keys()
    for name, (_, _, batch) in worker.MODELS.items():
        model = worker.build(name)
        torch.manual_seed(1)
        loss = worker.loss_of(model, batch())  # the mean over the batch: the mean of the two ranks' halves
        loss.backward()
        assert zoo.rel_err(sharded[name]["loss"], loss) < 1e-5, name
        expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert sharded[name]["grads"].keys() == expected.keys() and any(k.startswith("attnres.") for k in expected)
        scale = max(g.abs().max() for g in expected.values())  # some are rounding noise around 0 (a key bias)
        for key, grad in expected.items():
            got = sharded[name]["grads"][key]
            bound = 1e-4 * grad.abs().max() + 1e-6 * scale
            assert (got - grad).abs().max() <= bound, (name, key, zoo.rel_err(got, grad))


def test_sequence_parallel_depth_gradients_are_reduced_over_the_group(tmp_path: Path) -> None:
    """Each rank attends over depth for its own tokens; with `SequenceParallelDepth` in the plan the `attnres`
    gradients are summed over the group and equal one process's. Without it they are one rank's share."""
    import sp_worker

    out = tmp_path / "rank0.pt"
    torchrun("sp_worker.py", str(out))
    results = torch.load(out, weights_only=False)
    model = sp_worker.build()
    loss = sp_worker.loss_of(model)
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    reduced, alone = results["with SequenceParallelDepth"], results["without"]
    assert zoo.rel_err(reduced["loss"], loss) < 1e-5
    assert reduced["grads"].keys() == expected.keys()
    for name, grad in expected.items():
        assert zoo.rel_err(reduced["grads"][name], grad) < 1e-5, name
    assert zoo.rel_err(alone["grads"]["attnres.site_3.query"], expected["attnres.site_3.query"]) > 0.1


def test_fsdp2_over_tensor_and_sequence_parallel_on_a_2x2_mesh_and_dcp(tmp_path: Path) -> None:
    """The depth parameters replicated over tp (their gradients summed there) and sharded over dp: loss and every
    gradient equal one process's; a DCP checkpoint of the sharded state dict restores them."""
    import sp_worker

    out = tmp_path / "rank0.pt"
    torchrun("fsdp_tp_worker.py", str(out), str(tmp_path / "checkpoint"), processes=4)
    result = torch.load(out, weights_only=False)
    model = sp_worker.build()
    loss = sp_worker.loss_of(model)
    loss.backward()
    assert zoo.rel_err(result["loss"], loss) < 1e-5
    for name, p in model.named_parameters():
        assert zoo.rel_err(result["grads"][name], p.grad) < 1e-5, name
    assert result["restored"]


def test_a_model_parallelized_before_transform_is_refused_with_what_to_do() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = zoo.titan_llama()
        parallelize_module(model, init_device_mesh("cpu", (1,)), zoo.titan_tp_plan(model))
        with pytest.raises(
            attnres_fx.AttnResError,
            match=r"submodule `tok_embeddings` holds DTensor parameters \(weight\): it was parallelized .* "
            r"Transform the unwrapped model first",
        ):
            attnres_fx.transform(model, (zoo.token_ids(),))
    finally:
        dist.destroy_process_group()


def test_a_model_sharded_before_transform_is_refused_with_what_to_do() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = zoo.llama()
        for layer in model.model.layers:
            fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(
            attnres_fx.AttnResError,
            match=r"submodule `model.layers.0` is already wrapped or sharded .* "
            r"Transform the unwrapped model first",
        ):
            attnres_fx.transform(model)
    finally:
        dist.destroy_process_group()
