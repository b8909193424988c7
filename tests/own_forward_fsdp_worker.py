"""One rank of the FSDP2 check on models that run their own forward without one module per layer (run by
tests/test_distributed.py under torchrun, 2 processes on gloo): each model transformed, with the same random
pseudo-queries as the test, every block (the modules a user shards) and then the root sharded with `fully_shard`, one
training step on this rank's half of the batch; rank 0 saves each model's loss and full gradients."""

import os
import re
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
import zoo  # noqa: E402

import attnres_fx  # noqa: E402

# factory, the modules sharded one by one, the batch of 4
MODELS = {
    "x-transformers": (zoo.x_transformer, r"attn_layers\.layers\.\d+\.1", lambda: zoo.token_ids(4, 16, seed=5)),
    "root forward": (zoo.root_forward_gpt, r"subs\.\d+", lambda: zoo.token_ids(4, 16, seed=5)),
    "mvitv2": (zoo.mvitv2, r"stages\.\d+\.blocks\.\d+", lambda: torch.randn(4, 3, 64, 64)),
}


def build(name: str) -> torch.nn.Module:
    make, _, batch = MODELS[name]
    torch.manual_seed(0)
    tmodel = attnres_fx.transform(make(), (batch()[:2],))
    return zoo.random_depth_(tmodel)


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return zoo.main_output(model(x)).pow(2).mean()


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, (_, blocks, batch) in MODELS.items():
        model = build(name)
        for path, module in list(model.named_modules()):
            if re.fullmatch(blocks, path):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        torch.manual_seed(1)
        x = batch().chunk(world)[rank]
        loss = loss_of(model, x)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        results[name] = {"loss": torch.stack(losses).mean(), "grads": grads}
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
