"""Where cold compile time goes: the first compiled training step of each variant, split by compiler stage.

    python -m benchmarks.compile_time --config small          # baseline and attnres_fx, about 3 minutes on 2 cores

Each variant runs in a fresh process with Inductor's caches disabled (`TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`) and an
empty cache folder. Per variant: the model's build (for attnres_fx the transform, which on CPU builds its C++
depth-attention kernel, about 1 s, then kept in Inductor's cache), the first step's wall time, Dynamo's
per-stage totals (`torch._dynamo.utils.compilation_time_metrics`: bytecode tracing, AOTAutograd, Inductor lowering,
scheduling, code generation, the C++ / Triton build) and the number of distinct C++ kernels Inductor built (a kernel
used at several places is built once; CPU). JSON goes to benchmarks/results/compile-time-<config>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

STAGES = {  # Dynamo's timer names -> what they are
    "bytecode_tracing": "Dynamo tracing",
    "aot_trace_joint_graph": "AOT joint trace",
    "GraphLowering.run": "Inductor lowering",
    "Scheduler.__init__": "scheduling (fusion)",
    "Scheduler.codegen": "kernel codegen",
    "compile_file": "C++ build (CPU-s, all workers)",
    "async_compile.wait": "waiting for the build",
}


def first_step(variant: str, config: str, device: str) -> dict:
    """In this process: build, compile and run one training step; its wall time and the compiler's breakdown."""
    from torch._dynamo.utils import compilation_time_metrics
    from torch._inductor.async_compile import AsyncCompile

    from attnres_fx.bench.worker import check_vector_isa

    from .run import CONFIGS, Runner

    sources: set[str] = set()  # every C++ kernel source Inductor asks to build; the same source is built once
    build = AsyncCompile.cpp_pybinding

    def record(self: AsyncCompile, argtypes: list[str], source_code: str) -> object:
        sources.add(source_code)
        return build(self, argtypes, source_code)

    AsyncCompile.cpp_pybinding = record  # type: ignore[method-assign]
    check_vector_isa(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    runner = Runner(variant, True, CONFIGS[config], device, dtype)
    setup = time.perf_counter() - start
    seconds = runner.train_step()
    times = {name: sum(values) for name, values in compilation_time_metrics.items()}
    kernels = len(sources)
    return {
        "variant": variant,
        "setup_s": setup,
        "first_step_s": seconds,
        "stages_s": {name: times.get(name, 0.0) for name in STAGES},
        "cpp_kernels_built": kernels,
    }


def measure(variant: str, config: str, device: str, threads: int) -> dict:
    """One variant in a fresh process with caches off and an empty cache folder, so that no C++ build of an earlier
    run (attnres_fx's own CPU kernel included) is reused."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TORCHINDUCTOR_CACHE_DIR": cache}
        cmd = [sys.executable, "-m", "benchmarks.compile_time", "--config", config, "--device", device]
        cmd += ["--threads", str(threads), "--one", variant]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _total(row: dict) -> float:
    return row["setup_s"] + row["first_step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="baseline,attnres_fx")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(first_step(args.one, args.config, args.device)))
        return
    rows = [measure(v, args.config, args.device, args.threads) for v in args.variants.split(",")]
    base = rows[0]
    table = [
        ("model build + transform s", *(f"{r['setup_s']:.1f}" for r in rows)),
        ("first step s", *(f"{r['first_step_s']:.1f}" for r in rows)),
        *((label, *(f"{r['stages_s'][name]:.1f}" for r in rows)) for name, label in STAGES.items()),
        ("distinct C++ kernels built", *(str(r["cpp_kernels_built"]) for r in rows)),
        ("first step x baseline", *(f"{r['first_step_s'] / base['first_step_s']:.2f}" for r in rows)),
        ("build + first step x baseline", *(f"{_total(r) / _total(base):.2f}" for r in rows)),
    ]
    print(tabulate(table, headers=["", *(r["variant"] for r in rows)], disable_numparse=True))
    path = Path(args.out) / f"compile-time-{args.config}-{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": args.config, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
