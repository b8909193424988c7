"""One rank of the pipeline-parallel checks (run by tests/test_pipeline.py under torchrun, 2 processes on gloo).

Builds a tiny transformed model (HF Llama, or torchtitan-style), sets the test's random pseudo-queries, makes this
rank's stages, runs one training step of each pipeline schedule asked for and saves, per schedule and rank, the
losses, every parameter gradient (summed over the rank's stages) and the bytes each stage sends per microbatch.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

sys.path.insert(0, os.path.dirname(__file__))
import zoo  # noqa: E402

import attnres_fx  # noqa: E402

MICROBATCHES = 4
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


def build(kind: str) -> torch.nn.Module:
    """The transformed model with fixed non-zero queries (the test builds the same one-process reference)."""
    model = zoo.llama() if kind == "hf" else zoo.titan_llama()
    example = None if kind == "hf" else (zoo.token_ids(),)
    tmodel = attnres_fx.transform(model, example, num_blocks=3).train()
    return zoo.random_depth_(tmodel)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = zoo.token_ids(8, 16, seed=5)
    return ids, zoo.token_ids(8, 16, seed=6)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def stage_modules(model: torch.nn.Module, kind: str, num_stages: int) -> list[torch.nn.Module]:
    if kind == "hf":
        return attnres_fx.pipeline_split(model, num_stages)
    count = len(model.layers)
    bounds = [k * count // num_stages for k in range(num_stages + 1)]
    return [attnres_fx.pipeline_stage(zoo.titan_stage(model, bounds[k], bounds[k + 1])) for k in range(num_stages)]


def run(kind: str, schedule: str, cached: bool) -> dict:
    """One training step of `schedule` on this rank's stages; what this rank saw."""
    rank, world = dist.get_rank(), dist.get_world_size()
    num_stages = 2 * world if schedule == "interleaved" else world
    modules = stage_modules(build(kind), kind, num_stages)
    indices = list(range(rank, num_stages, world))
    mine = [modules[i] for i in indices]
    device = torch.device("cpu")
    if cached:
        stages = attnres_fx.pipeline_stages(mine, indices, num_stages, device)
    else:
        stages = [PipelineStage(m, i, num_stages, device) for m, i in zip(mine, indices)]
    sent: dict[int, list[int]] = {}  # stage -> bytes its module returned, per forward
    for index, module in zip(indices, mine):
        if index < num_stages - 1:
            module.register_forward_hook(
                lambda mod, args, out, i=index: sent.setdefault(i, []).append(sum(t.nbytes for t in out))
            )
    pipe = SCHEDULES[schedule](stages if schedule == "interleaved" else stages[0], MICROBATCHES, loss_fn=loss_fn)
    ids, target = batch()
    losses: list[torch.Tensor] = []
    args = (ids,) if 0 in indices else ()
    kwargs = {"target": target, "losses": losses} if num_stages - 1 in indices else {}
    pipe.step(*args, **kwargs)
    grads: dict[str, torch.Tensor] = {}
    for module in mine:  # a parameter used by two stages (a site scored in both) gets both gradients
        for name, p in module.named_parameters():
            if p.grad is not None:
                grads[name] = grads.get(name, 0) + p.grad
    return {"losses": [x.detach() for x in losses], "grads": grads, "sent": {i: b[-1] for i, b in sent.items()}}


def main(out_path: str, kind: str, configs: list[str]) -> None:
    """`configs`: schedule:naive|cached, each run in turn."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {}
    for config in configs:
        schedule, how = config.split(":")
        mine = run(kind, schedule, how == "cached")
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        results[config] = gathered
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
