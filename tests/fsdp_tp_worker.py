"""One rank of the 2-D check (run by tests/test_distributed.py under torchrun, 4 processes on gloo): FSDP2 over
torchtitan's TP + SP plan with `SequenceParallelDepth`, on a 2 x 2 (dp, tp) mesh; each dp half gets half the batch.
Rank 0 saves the loss and every full gradient, and whether a DCP checkpoint of the sharded state dict restores the
depth parameters after they were changed."""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import parallelize_module

sys.path.insert(0, os.path.dirname(__file__))
import sp_worker  # noqa: E402
import zoo  # noqa: E402

import attnres_fx  # noqa: E402


def main(out_path: str, checkpoint: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = sp_worker.build()
    parallelize_module(model, mesh["tp"], {**zoo.titan_tp_plan(model), "attnres": attnres_fx.SequenceParallelDepth()})
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    ids, target = (t.chunk(2)[mesh["dp"].get_local_rank()] for t in sp_worker.batch())
    loss = F.cross_entropy(model(ids).flatten(0, 1), target.flatten())
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    losses = [torch.zeros(()) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, loss.detach())
    dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint)
    query = model.attnres.site_3.query
    before = query.full_tensor().clone()
    with torch.no_grad():
        query.zero_()
    state = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state)
    restored = torch.equal(query.full_tensor(), before)
    if dist.get_rank() == 0:
        torch.save({"loss": torch.stack(losses).mean(), "grads": grads, "restored": restored}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
