"""`attnres-fx bench` (also `python -m benchmarks.suite`): the suite's models, original and transformed, on
compiler backends, in the conventions of PyTorch's dynamo benchmark harness (one CSV row per model and backend).

Each (model, variant, backend) runs in a fresh process (`worker.py`) with empty compile caches, under a timeout: the
compile it times is cold, and a crash or hang is a row of the report with its error. The exit status is 1 when any
entry did not pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..progress import Progress
from . import report
from .models import MODELS, SIZES
from .worker import RESULT_PREFIX, Entry

__all__ = ["add_parser", "run"]

BACKENDS = {"cpu": "eager,aot_eager,inductor", "cuda": "eager,aot_eager,inductor,inductor-max-autotune,cudagraphs"}


def run_entry(entry: Entry, timeout: float) -> dict:
    """One worker process; its result, or a row saying how it ended (timeout, crash)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        worker = "from attnres_fx.bench.worker import main; main()"  # not -m: the package has imported the module
        cmd = [sys.executable, "-c", worker, json.dumps(dataclasses.asdict(entry))]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**dataclasses.asdict(entry), "accuracy": "timeout", "error": f"no result within {timeout:g} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line.removeprefix(RESULT_PREFIX))
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {**dataclasses.asdict(entry), "accuracy": "fail_to_run", "error": f"exit {done.returncode}: {last[:300]}"}


def run(args: argparse.Namespace) -> int:
    """Run the grid, print the tables, write the files; the exit status."""
    names = args.only.split(",") if args.only else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"attnres-fx bench: unknown model {', '.join(unknown)}; the suite has {', '.join(MODELS)}")
    backends = (args.backends or BACKENDS.get(args.device, BACKENDS["cpu"])).split(",")
    mode = "inference" if args.inference else "training"
    grid = [
        Entry(name, variant, backend, mode, args.device, args.dtype, args.size, args.iterations, args.threads)
        for name in names
        for backend in backends
        for variant in ("original", "attnres")
    ]
    start = time.perf_counter()
    progress, rows = Progress(len(grid)), []
    for i, entry in enumerate(grid, 1):
        rows.append(report.csv_row(run_entry(entry, args.timeout), SIZES[args.size].batch))
        progress.update(i, f"{entry.model} {entry.variant} {entry.backend}: {rows[-1]['accuracy']}")
    progress.close()
    report.add_overhead(rows)
    meta = {
        "mode": mode,
        "size": args.size,
        "sizes": dataclasses.asdict(SIZES[args.size]),
        "dtype": args.dtype,
        "device": _device_name(args.device, args.threads),
        "torch": torch.__version__,
        "iterations": args.iterations,
        "wall_seconds": time.perf_counter() - start,
    }
    stem = Path(args.out) / f"suite-{args.device}-{mode}-{args.size}-{args.dtype}"
    paths = report.write(rows, meta, stem)
    print(
        f"\n{mode}, size {args.size}, {args.dtype}, on {meta['device']}, torch {torch.__version__}, "
        f"{meta['wall_seconds'] / 60:.1f} min\n"
    )
    print(report.models_table(rows), end="\n\n")
    print(report.summary_table(rows))
    failed = [r for r in rows if r["accuracy"] != "pass"]
    for r in failed:
        print(f"\n{r['name']} {r['variant']} {r['backend']}: {r['accuracy']} {r['error']}")
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 1 if failed else 0


def _device_name(device: str, threads: int) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {threads} thread(s)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="compare compiler backends on the suite's models, original and transformed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", choices=list(SIZES), default="tiny")
    p.add_argument(
        "--backends",
        help=f"comma-separated: eager, aot_eager, inductor, inductor-max-autotune, cudagraphs, or "
        f"package.module:function for a backend of your own (default: {BACKENDS['cpu']}; on CUDA "
        f"{BACKENDS['cuda']})",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--training", action="store_true", help="forward and backward (the default)")
    mode.add_argument("--inference", action="store_true", help="forward under no_grad, eval mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--only", help=f"comma-separated models (default all: {', '.join(MODELS)})")
    p.add_argument("--iterations", type=int, default=10, help="timed steps per entry; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (baked into Inductor's kernels)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per entry before it is recorded as timeout")
    p.add_argument("--out", default="bench_results", help="folder for the CSV, JSON and PNG")
    p.set_defaults(run=run)
