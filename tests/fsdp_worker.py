"""One rank of the FSDP2 check (run by tests/test_distributed.py under torchrun, 2 processes on gloo).

Builds the tiny Llama, transforms it, sets the same random pseudo-queries as the test, shards every decoder layer
(compiled on its own, in the per-layer mode) and then the root with `fully_shard`, runs one training step on this
rank's half of the batch and saves the loss and every full gradient from rank 0.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
import zoo  # noqa: E402

import attnres_fx  # noqa: E402


def build() -> torch.nn.Module:
    """The transformed model with fixed non-zero queries (the test builds the same one-process reference)."""
    tmodel = attnres_fx.transform(zoo.llama()).train()
    return zoo.random_depth_(tmodel)


def batch() -> torch.Tensor:
    return zoo.token_ids(4, 16, seed=5)


def main(out_path: str, mode: str) -> None:
    """`mode`: eager, compiled (the whole model) or per-layer (each layer compiled, then sharded: torchtitan's way)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = build()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        if mode == "per-layer":
            layer.compile(fullgraph=True)
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = batch().chunk(world)[rank]
    call = torch.compile(model) if mode == "compiled" else model
    loss = call(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "grads": grads}, out_path)
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
