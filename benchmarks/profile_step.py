"""Where the time goes: one training step, baseline vs attnres_fx, split by phase and kernel.

    python -m benchmarks.profile_step --config small          # compiled
    python -m benchmarks.profile_step --config demo --eager   # eager: the ops and autograd nodes instead of kernels

For each variant: forward / backward / optimizer milliseconds (medians), how many kernels Inductor
generated, and the most expensive kernels (eager: ops and autograd Functions) of the step (torch.profiler, self time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate
from torch._inductor import metrics

from .run import CONFIGS, build


def phases(model, call, ids, rounds: int) -> dict[str, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        loss = call(ids, ids)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[name].append(dt * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def top_kernels(call, ids, count: int) -> list[tuple[str, float]]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call(ids, ids).backward()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key[:70], e.self_cpu_time_total / 1e3) for e in events[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), default="small")
    parser.add_argument("--variants", default="baseline,attnres_fx")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--eager", action="store_true", help="the eager step (no torch.compile)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = CONFIGS[args.config]
    rows, kernels = [], {}
    for variant in args.variants.split(","):
        model = build(variant, cfg, "cpu", torch.float32).train()
        ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]))
        call = model if args.eager else torch.compile(model)
        metrics.reset()
        call(ids, ids).backward()
        generated = "-" if args.eager else metrics.generated_kernel_count
        split = phases(model, call, ids, args.rounds)
        rows.append((variant, generated, *(f"{split[k]:.1f}" for k in ("forward", "backward", "optimizer"))))
        kernels[variant] = top_kernels(call, ids, args.top)
    print(f"{args.config} {cfg}, {'eager' if args.eager else 'compiled'}, 1 thread, torch {torch.__version__}")
    print(tabulate(rows, headers=["variant", "kernels generated", "forward ms", "backward ms", "optimizer ms"]))
    for variant, top in kernels.items():
        print(f"\n{variant}: top kernels by self time (one forward + backward)")
        print(tabulate(top, headers=["kernel", "ms"], floatfmt=".2f"))


if __name__ == "__main__":
    main()
