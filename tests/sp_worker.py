"""One rank of the sequence-parallel check (run by tests/test_distributed.py under torchrun, 2 processes on gloo).

torchtitan's tensor + sequence parallel plan on a transformed torchtitan-style Llama, with and without
`attnres_fx.SequenceParallelDepth` for the `attnres` submodule; one training step each on the whole batch; rank 0
saves the losses and every full gradient.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

sys.path.insert(0, os.path.dirname(__file__))
import zoo  # noqa: E402

import attnres_fx  # noqa: E402


def build() -> torch.nn.Module:
    """The transformed model with fixed non-zero queries (the test builds the same one-process reference)."""
    tmodel = attnres_fx.transform(zoo.titan_llama(), (zoo.token_ids(),), num_blocks=3).train()
    return zoo.random_depth_(tmodel)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return zoo.token_ids(2, 16, seed=5), zoo.token_ids(2, 16, seed=6)


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    ids, target = batch()
    return F.cross_entropy(model(ids).flatten(0, 1), target.flatten())


def step(with_style: bool) -> dict:
    model = build()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan = zoo.titan_tp_plan(model)
    if with_style:
        plan["attnres"] = attnres_fx.SequenceParallelDepth()
    parallelize_module(model, mesh, plan)
    loss = loss_of(model)
    loss.backward()
    grads = {
        n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return {"loss": loss.detach(), "grads": grads}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {"with SequenceParallelDepth": step(True), "without": step(False)}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
