"""Per-model compiled ratios of the suite, paired: each model's original and transformed are compiled in one process
and timed in alternation, so that a ratio compares steps seconds apart. The suite (`attnres-fx bench`) times each
entry alone in a fresh process, minutes from its original: single ratios there move by up to 0.17 between runs.

    python -m benchmarks.suite_paired --size small                 # every suite model, training and inference, CPU
    python -m benchmarks.suite_paired --only llama,gpt2 --modes training

Per model and mode: the median step of each, and the median over rounds of the transformed / original ratio of the
round's steps (with its interquartile range). Models whose package is missing are skipped. JSON goes to
benchmarks/results/suite-paired-<device>-<size>.json.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

from attnres_fx.bench.models import MODELS
from attnres_fx.bench.worker import Entry, check_vector_isa, compiler, load, step, sync

from .run import device_name


def paired(name: str, mode: str, args: argparse.Namespace) -> dict:
    """One model in one mode: both variants compiled, then `rounds` rounds of `steps` steps each, alternating."""
    calls = {}
    for variant in ("original", "attnres"):
        entry = Entry(name, variant, "inductor", mode, args.device, "float32", args.size, 0, args.threads)
        model, inputs = load(entry)
        compiled = compiler("inductor")(model)
        calls[variant] = lambda c=compiled, m=model, x=inputs: step(c, m, x, mode == "training")
        calls[variant]()  # compile
        calls[variant]()
    seconds: dict[str, list[float]] = {variant: [] for variant in calls}
    for _ in range(args.rounds):
        for variant, call in calls.items():
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                call()
            sync(args.device)
            seconds[variant].append((time.perf_counter() - start) / args.steps)
    ratios = sorted(a / o for a, o in zip(seconds["attnres"], seconds["original"]))
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "model": name,
        "mode": mode,
        "original_ms": statistics.median(seconds["original"]) * 1e3,
        "attnres_ms": statistics.median(seconds["attnres"]) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_iqr": [quartiles[0], quartiles[2]],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--only", help="comma-separated suite model names")
    parser.add_argument("--modes", default="training,inference")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # before compiling: Inductor bakes the count into its kernels
    check_vector_isa(args.device)
    names = args.only.split(",") if args.only else list(MODELS)
    rows = []
    for name in names:
        if importlib.util.find_spec(MODELS[name].needs) is None:
            print(f"{name}: skipped ({MODELS[name].needs} is not installed)")
            continue
        for mode in args.modes.split(","):
            rows.append(paired(name, mode, args))
            torch._dynamo.reset()
            gc.collect()
            r = rows[-1]
            print(f"{name} {mode}: x{r['ratio']:.3f} ({r['ratio_iqr'][0]:.3f}-{r['ratio_iqr'][1]:.3f})", flush=True)
    table = [
        (r["model"], r["mode"], f"{r['original_ms']:.1f}", f"{r['attnres_ms']:.1f}", f"{r['ratio']:.3f}",
         f"{r['ratio_iqr'][0]:.3f}-{r['ratio_iqr'][1]:.3f}")
        for r in rows
    ]  # fmt: skip
    print(f"{device_name(args.device)}, torch {torch.__version__}, size {args.size}, compiled (inductor), paired")
    print(tabulate(table, headers=["model", "mode", "original ms", "attnres ms", "x original", "IQR"]))
    gmeans = {
        mode: statistics.geometric_mean([r["ratio"] for r in rows if r["mode"] == mode])
        for mode in args.modes.split(",")
        if any(r["mode"] == mode for r in rows)
    }
    print("geometric means: " + ", ".join(f"{mode} x{g:.3f}" for mode, g in gmeans.items()))
    path = Path(args.out) / f"suite-paired-{args.device}-{args.size}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": device_name(args.device), "torch": torch.__version__, "size": args.size, "rows": rows}
    path.write_text(json.dumps({**report, "geometric_means": gmeans, "rounds": args.rounds, "steps": args.steps}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
