"""Microbenchmark: one block's depth attention against the memory-traffic bound.

    python -m benchmarks.depth_step                     # CPU, 1 thread, fp32
    python -m benchmarks.depth_step --device cuda       # bf16 by default on CUDA

For one block of J sublayers reading n completed blocks, the least the depth attention must move is:
every completed block read once, and per sublayer its partial sum read and its input written
(tokens x d each). Dividing those bytes by the bandwidth of a plain copy measured here gives the
bound. The table compares it with the compiled two-phase ops (what the `two_phase` pass emits and the
hooks call; on CUDA both on the Triton kernels and with Inductor generating every kernel), the plain
rewrite (stack the sources per sublayer), and the J residual adds that AttnRes replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from tabulate import tabulate

from attnres_fx import ops

EPS = 1e-6


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of `fn()` after warm-up (the first calls compile)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(numel: int, device: str, dtype: torch.dtype, repeats: int) -> float:
    """Bytes per second of `dst.copy_(src)` (read + write) on this machine."""
    src, dst = torch.randn(numel, device=device).to(dtype), torch.empty(numel, device=device, dtype=dtype)
    seconds = timed(lambda: dst.copy_(src), device, repeats)
    return 2 * numel * src.element_size() / seconds


def two_phase_block(blocks, queries, key_weights, partials):
    stats = ops.block_scores(blocks, queries, key_weights, EPS)
    outs = [ops.completed_only(stats, 0, blocks[0])]
    for k, p in enumerate(partials, start=1):
        outs.append(ops.merge_partial(stats, k, p, EPS))
    return outs


def plain_block(blocks, queries, key_weights, partials):
    outs = [ops.depth_attention(blocks, queries[0], key_weights[0], EPS)]
    for k, p in enumerate(partials, start=1):
        outs.append(ops.depth_attention([*blocks, p], queries[k], key_weights[k], EPS))
    return outs


def residual_adds(stream, deltas):
    outs = []
    for d in deltas:
        stream = stream + d
        outs.append(stream)
    return outs


def run(tokens: int, d: int, completed: int, block_size: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    blocks = [rand(tokens, d) for _ in range(completed)]
    partials = [rand(tokens, d) for _ in range(block_size - 1)]
    queries = [rand(d) * 0.3 for _ in range(block_size)]
    key_weights = [1 + rand(d) * 0.1 for _ in range(block_size)]
    stream, deltas = rand(tokens, d), [rand(tokens, d) for _ in range(block_size)]
    elem = blocks[0].element_size()

    two_phase = torch.compile(two_phase_block, dynamic=False)
    plain = torch.compile(plain_block, dynamic=False)
    adds = torch.compile(residual_adds, dynamic=False)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: two roundings of 2^-8 (see tests/test_kernels.py)
    torch.testing.assert_close(
        two_phase(blocks, queries, key_weights, partials),
        plain(blocks, queries, key_weights, partials),
        rtol=tolerance,
        atol=tolerance,
    )

    bandwidth = copy_bandwidth(16 * tokens * d, device, dtype, repeats)
    attn_bytes = elem * tokens * d * (completed + 2 * (block_size - 1) + 1)
    add_bytes = elem * tokens * d * 3 * block_size
    two_phase_variants = {"two-phase (attnres_fx)": contextlib.nullcontext()}
    if device == "cuda":  # the ops run on the Triton kernels there; also time what Inductor makes of the torch code
        two_phase_variants = {
            "two-phase, Triton kernels (attnres_fx)": contextlib.nullcontext(),
            "two-phase, Inductor only": mock.patch.object(ops, "_on_kernels", lambda x: False),
        }
    seconds = {}
    for name, routing in two_phase_variants.items():
        with routing:
            seconds[name] = timed(lambda: two_phase(blocks, queries, key_weights, partials), device, repeats)
    seconds["plain (stack per sublayer)"] = timed(
        lambda: plain(blocks, queries, key_weights, partials), device, repeats
    )
    seconds["residual adds (baseline)"] = timed(lambda: adds(stream, deltas), device, repeats)
    bounds = {name: add_bytes if name.startswith("residual") else attn_bytes for name in seconds}
    return {
        "shape": {
            "tokens": tokens,
            "d": d,
            "completed_blocks": completed,
            "block_size": block_size,
            "dtype": str(dtype),
        },
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)",
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "rows": [
            {
                "variant": name,
                "us": s * 1e6,
                "bytes": bounds[name],
                "bound_us": bounds[name] / bandwidth * 1e6,
                "x_bound": s * bandwidth / bounds[name],
            }
            for name, s in seconds.items()
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--completed", type=int, default=4, help="completed blocks read (b_0 included)")
    parser.add_argument("--block-size", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    report = run(args.tokens, args.d, args.completed, args.block_size, args.device, dtype, args.repeats)
    rows = [
        (r["variant"], f"{r['us']:.1f}", f"{r['bytes'] / 2**20:.1f}", f"{r['bound_us']:.1f}", f"{r['x_bound']:.2f}")
        for r in report["rows"]
    ]
    print(
        f"{report['shape']} on {report['device']}, torch {torch.__version__}; "
        f"copy bandwidth {report['copy_bandwidth_gbs']:.1f} GB/s"
    )
    print(tabulate(rows, headers=["one block", "us", "min MiB moved", "bound us", "x bound"]))
    path = Path(args.out) / f"depth-step-{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
