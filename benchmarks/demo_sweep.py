"""The sweep the demo's defaults were chosen from: final validation loss of baseline and AttnRes over seeds.

    python -m benchmarks.demo_sweep                         # the settings below, 3 seeds each (about an hour)
    python -m benchmarks.demo_sweep --settings 12x64,s1000 --seeds 5

A setting is `LAYERSxWIDTH` plus optional `,sSTEPS`, `,tSEQ_LEN`, `,bBATCH`, `,lrLR`, `,nBLOCKS`. Per setting: the
per-seed gap (attnres - baseline, nats/byte), its mean and standard error, and the wall time of training both
models at all seeds on this machine. Appends to docs/demo/sweep.json, which `docs/demo/README.md` quotes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

from attnres_fx.demo.corpus import load_corpus, sample_batch
from attnres_fx.demo.train import DemoConfig, build_variants, train

DEFAULT_SETTINGS = "12x64,s1000;12x64,s1000,t64;16x48,s1000,t64;12x64,s600,t64,lr0.006;8x64,s1000,t64"
FIELDS = {"s": "steps", "t": "seq_len", "b": "batch_size", "lr": "lr", "n": "num_blocks"}


def parse(setting: str) -> DemoConfig:
    size, *rest = setting.split(",")
    layers, width = (int(v) for v in size.split("x"))
    changes: dict = {"layers": layers, "width": width}
    for item in rest:
        key = item.rstrip("0123456789.e-")
        changes[FIELDS[key]] = float(item[len(key) :]) if key == "lr" else int(item[len(key) :])
    return dataclasses.replace(DemoConfig(), **changes)


def final_losses(config: DemoConfig) -> dict[str, float]:
    corpus = load_corpus(config.corpus_bytes)
    example = sample_batch(corpus.train, 2, config.seq_len, torch.Generator().manual_seed(0))
    variants = build_variants(config, example)
    train(config, corpus, variants)
    return {v.name: v.val_loss[-1][1] for v in variants}


def sweep(setting: str, seeds: int) -> dict:
    config = parse(setting)
    start = time.perf_counter()
    runs = [final_losses(dataclasses.replace(config, seed=s)) for s in range(seeds)]
    gaps = [r["attnres"] - r["baseline"] for r in runs]
    se = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
    return {
        "setting": setting,
        "config": dataclasses.asdict(config),
        "final_val_loss": runs,
        "gaps": gaps,
        "gap_mean": statistics.fmean(gaps),
        "gap_standard_error": se,
        "wall_s": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="';'-separated settings")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "demo" / "sweep.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else []
    for setting in args.settings.split(";"):
        results = [r for r in results if r["setting"] != setting] + [sweep(setting, args.seeds)]
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
