"""Bytes a transformed model's pipeline stages send per microbatch: every hop carrying the bank (naive), or only the
blocks the receiving rank has not kept from its earlier stage (cross-stage caching, `attnres_fx.pipeline_stages`).

    python -m benchmarks.pipeline_bytes          # 2 gloo ranks on CPU, HF Llama with 16 layers, a minute

Runs one interleaved-1F1B training step per setting under torchrun and counts, per microbatch, what each stage's
module returns to the next (its gradient travels back with the same size). Writes
benchmarks/results/pipeline-bytes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tabulate import tabulate

import attnres_fx

CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
MICROBATCHES = 4


def measure(layers: int, stages_per_rank: int, num_blocks: int, cached: bool, batch: int, seq: int) -> dict:
    """One step on this rank's stages: bytes per microbatch per sending stage (rank 0 gathers)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B
    from transformers import AutoConfig, AutoModelForCausalLM

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", num_hidden_layers=layers, **CONFIG)
    model = attnres_fx.transform(AutoModelForCausalLM.from_config(config), num_blocks=num_blocks).train()
    num_stages = world * stages_per_rank
    modules = attnres_fx.pipeline_split(model, num_stages)
    indices = list(range(rank, num_stages, world))
    mine = [modules[i] for i in indices]
    device = torch.device("cpu")
    if cached:
        stages = attnres_fx.pipeline_stages(mine, indices, num_stages, device)
    else:
        stages = [PipelineStage(m, i, num_stages, device) for m, i in zip(mine, indices)]
    sent: dict[int, int] = {}
    for i, m in zip(indices, mine):
        if i < num_stages - 1:
            m.register_forward_hook(lambda mod, a, out, i=i: sent.__setitem__(i, sum(t.nbytes for t in out)))

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    pipe = ScheduleInterleaved1F1B(stages, MICROBATCHES, loss_fn=loss_fn)
    ids = torch.randint(0, CONFIG["vocab_size"], (batch * MICROBATCHES, seq))
    kwargs = {"target": ids, "losses": []} if num_stages - 1 in indices else {}
    pipe.step(*((ids,) if 0 in indices else ()), **kwargs)
    gathered: list[dict[int, int]] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, sent)
    return {i: b for part in gathered for i, b in part.items()}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = []
    for stages_per_rank in (2, 4):
        for cached in (False, True):
            sent = measure(args.layers, stages_per_rank, args.num_blocks, cached, args.batch, args.seq)
            results.append({"stages_per_rank": stages_per_rank, "cached": cached, "sent": sent})
    if dist.get_rank() == 0:
        Path(args.worker_out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        return worker(args)
    out = Path(args.out) / "pipeline-bytes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "benchmarks.pipeline_bytes", "--worker-out", str(out)]
    cmd += ["--layers", str(args.layers), "--num-blocks", str(args.num_blocks)]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads(out.read_text())
    hidden = args.batch * args.seq * CONFIG["hidden_size"] * 4
    rows = []
    for spr in (2, 4):
        naive, cached = ({int(k): v for k, v in r["sent"].items()} for r in results if r["stages_per_rank"] == spr)
        total_n, total_c = sum(naive.values()), sum(cached.values())
        rows.append((2 * spr, f"{total_n / hidden:.0f}", f"{total_c / hidden:.0f}", f"{total_c / total_n:.2f}",
                     " ".join(f"{naive[i] // hidden}/{cached[i] // hidden}" for i in sorted(naive))))  # fmt: skip
    report = {"layers": args.layers, "num_blocks": args.num_blocks, "batch": args.batch, "seq": args.seq,
              "hidden_bytes": hidden, "results": results, "torch": torch.__version__}  # fmt: skip
    out.write_text(json.dumps(report, indent=1))
    print(f"HF Llama, {args.layers} layers, {args.num_blocks} blocks, 2 ranks; per microbatch, in hidden states")
    print(f"({hidden} bytes each), forward (the backward sends gradients of the same sizes):")
    headers = ["stages", "naive", "cached", "cached / naive", "per hop naive/cached"]
    print(tabulate(rows, headers=headers))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
