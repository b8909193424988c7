"""The sweep the demo's defaults were chosen from: the demo itself at other sizes and budgets, over seeds.

    python -m benchmarks.demo_sweep                         # the settings below (about 6 minutes each on 2 cores)
    python -m benchmarks.demo_sweep --settings 12x64,s1000 --seeds 5

A setting is `LAYERSxWIDTH` plus optional `,sSTEPS`, `,tSEQ_LEN`, `,bBATCH`, `,lrLR`, `,nBLOCKS`; the rest is the
demo's default. Per setting: the per-seed gap (attnres - baseline, nats/byte), its mean and standard error, and the
wall time of the whole demo run on this machine. Adds to docs/demo/sweep.json, which `docs/demo/README.md` quotes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from tabulate import tabulate

from attnres_fx.demo import DemoConfig, run_demo

DEFAULT_SETTINGS = "12x64,s360,t64,lr0.006;12x64,s500,t64,lr0.006;12x64,s1000,t64,lr0.003"
FIELDS = {"s": "steps", "t": "seq_len", "b": "batch_size", "lr": "lr", "n": "num_blocks"}


def parse(setting: str) -> DemoConfig:
    size, *rest = setting.split(",")
    layers, width = (int(v) for v in size.split("x"))
    changes: dict = {"layers": layers, "width": width}
    for item in rest:
        key = item.rstrip("0123456789.e-")
        changes[FIELDS[key]] = float(item[len(key) :]) if key == "lr" else int(item[len(key) :])
    return dataclasses.replace(DemoConfig(), **changes)


def sweep(setting: str, seeds: int, out: Path) -> dict:
    config = dataclasses.replace(parse(setting), seeds=seeds)
    results = run_demo(config, out / setting.replace(",", "_"))
    gap = results["gap"]
    return {
        "setting": setting,
        "config": results["config"],
        "gaps": gap["per_seed"],
        "gap_mean": gap["mean"],
        "gap_standard_error": gap["standard_error"],
        "verdict": results["verdict"],
        "wall_s": results["wall_seconds"],
        "machine": results["machine"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="';'-separated settings")
    parser.add_argument("--seeds", type=int, default=DemoConfig.seeds)
    parser.add_argument("--runs", default="demo_sweep", help="folder for each setting's plots and results.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "demo" / "sweep.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else []
    for setting in args.settings.split(";"):
        results = [r for r in results if r["setting"] != setting] + [sweep(setting, args.seeds, Path(args.runs))]
        path.write_text(json.dumps(results, indent=1))
    rows = [
        (
            r["setting"],
            " ".join(f"{g:+.3f}" for g in r["gaps"]),
            f"{r['gap_mean']:+.4f}",
            f"{r['gap_standard_error']:.4f}",
            f"{r['gap_mean'] / r['gap_standard_error']:+.1f}",
            f"{r['wall_s'] / 60:.1f}",
        )
        for r in results
    ]
    print(tabulate(rows, headers=["setting", "gaps", "mean gap", "SE", "mean / SE", "minutes"], disable_numparse=True))


if __name__ == "__main__":
    main()
