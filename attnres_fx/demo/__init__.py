"""`attnres-fx demo`: a byte-level LM on the stdlib's source, baseline vs `attnres_fx.transform`, over seeds.

Trains both side by side at each seed (same weights at step 0, same batches), then reports the final validation-loss
gap per seed, its mean and standard error, and says whether it stands out of seed noise. Writes `loss.png`,
`depth_profile.png` (the paper's Figure 5, from the first seed), `depth_weights.png` and `results.json` to the output
folder. It reports what it finds, whichever model wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tabulate import tabulate

from ..api import plan
from ..plan import Plan
from .corpus import load_corpus, sample_batch
from .measure import depth_weight_matrix, stream_read_rms, sublayer_grad_norms, sublayer_output_rms
from .train import DemoConfig, Variant, build_variants, train

__all__ = ["DemoConfig", "run_demo"]

WARMUP_STEPS = 5  # left out of the timings: compilation and allocator warm-up


def run_demo(config: DemoConfig, out_dir: Path) -> dict:
    """Train at every seed (`config.workers` seeds at a time, each in its own process), measure, plot; returns what
    `results.json` holds. The first seed's models give the depth profile and weights."""
    from . import plots  # matplotlib only when the demo runs

    start = time.perf_counter()
    seeds = list(range(config.seed, config.seed + config.seeds))
    jobs = [(dataclasses.replace(config, seed=s), s == config.seed, torch.get_num_threads()) for s in seeds]
    print(f"training {len(seeds)} seed(s), {min(config.workers, len(seeds))} at a time; progress of seed {config.seed}")
    if config.workers > 1 and len(seeds) > 1:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's thread pools
        with ProcessPoolExecutor(min(config.workers, len(seeds)), mp_context=context) as pool:
            outcomes = list(pool.map(_train_seed, *zip(*jobs)))
    else:
        outcomes = [_train_seed(*job) for job in jobs]
    runs = {seed: outcome["variants"] for seed, outcome in zip(seeds, outcomes)}
    first = outcomes[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{config.layers} layers x width {config.width}, {len(seeds)} seed(s)"
    curves = {name: [runs[s][name]["val_loss"] for s in seeds] for name in ("baseline", "attnres")}
    weights = torch.tensor(first["depth_weights"]["matrix"])
    figures = {
        "loss.png": plots.loss_figure(curves, config.tokens_per_step, title),
        "depth_profile.png": plots.depth_profile_figure(first["depth_profile"], first["block_size"]),
        "depth_weights.png": plots.weights_figure(weights, first["depth_weights"]["sites"]),
    }
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=120)
        plots.plt.close(fig)  # pyplot keeps every figure alive otherwise

    results = {
        "config": dataclasses.asdict(config),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) per seed, "
        f"torch {torch.__version__}",
        "corpus": first["corpus"],
        "seeds": {str(seed): run for seed, run in runs.items()},
        "gap": gap_summary(
            [runs[s]["attnres"]["final_val_loss"] - runs[s]["baseline"]["final_val_loss"] for s in seeds]
        ),
        "depth_profile": {"seed": config.seed, **first["depth_profile"]},
        "depth_weights": first["depth_weights"],
        "wall_seconds": time.perf_counter() - start,
    }
    results["verdict"] = verdict(results["gap"])
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'compiled' if config.compile else 'eager'}, {results['machine']}\n" + _table(runs))
    print("\n" + results["verdict"])
    print(_profile_line(first["depth_profile"]))
    print(f"\nwrote {', '.join(figures)} and results.json to {out_dir}/ ({results['wall_seconds'] / 60:.1f} min)")
    return results


def gap_summary(gaps: list[float]) -> dict:
    """The per-seed final validation-loss gaps (attnres - baseline), their mean and standard error."""
    se = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else math.nan
    return {
        "per_seed": gaps,
        "mean": statistics.fmean(gaps),
        "standard_error": se,
        "attnres_ahead": sum(g < 0 for g in gaps),
    }


def verdict(gap: dict) -> str:
    """One line: the mean gap, its standard error and the seed count; a gap within two standard errors of zero (or
    from one seed) is called seed noise."""
    n, mean, se = len(gap["per_seed"]), gap["mean"], gap["standard_error"]
    stats = (
        f"mean gap {mean:+.4f} nats/byte, standard error {se:.4f}, {n} seed(s), AttnRes ahead in {gap['attnres_ahead']}"
    )
    if n < 2 or abs(mean) <= 2 * se:
        return f"AttnRes vs baseline: {stats}: not distinguishable from seed noise."
    side = "below" if mean < 0 else "above"
    return f"AttnRes ended {abs(mean):.4f} nats/byte {side} the baseline ({stats}; more than two standard errors)."


def _train_seed(config: DemoConfig, measure: bool, threads: int) -> dict:
    """One seed, baseline and AttnRes (in a worker process or not): each model's summary and, with `measure`, the
    depth profile and weights of the trained models."""
    torch.set_num_threads(threads)  # a worker starts with torch's default
    corpus = load_corpus(config.corpus_bytes)
    example = sample_batch(corpus.train, 2, config.seq_len, torch.Generator().manual_seed(0))
    variants = build_variants(config, example)
    tplan = plan(variants[1].model)
    if measure:
        print(f"corpus: {corpus.source}, {len(corpus.train):,} train / {len(corpus.val):,} validation bytes")
        print(tplan, end="\n\n", flush=True)
    probe = train(config, corpus, variants, show_progress=measure)[0]
    outcome: dict = {"variants": {v.name: _summary(v, variants[0], config) for v in variants}, "corpus": corpus.source}
    if measure:
        weights = depth_weight_matrix(variants[1].model, *probe)
        outcome["depth_profile"] = {v.name: _depth_profile(v, tplan, probe) for v in variants}
        outcome["depth_weights"] = {"sites": [s.name for s in tplan.parametrised], "matrix": weights.tolist()}
        outcome["block_size"] = tplan.block_size
    return outcome


def _depth_profile(v: Variant, tplan: Plan, probe: tuple) -> dict[str, list[float]]:
    v.model.eval()
    return {
        "stream_read_rms": stream_read_rms(v.model, *probe),
        "output_rms": sublayer_output_rms(v.model, tplan, *probe),
        "grad_norm": sublayer_grad_norms(v.model, tplan, *probe),
    }


def _summary(v: Variant, baseline: Variant, config: DemoConfig) -> dict:
    timed = v.step_seconds[WARMUP_STEPS:] or v.step_seconds
    base = baseline.step_seconds[WARMUP_STEPS:] or baseline.step_seconds
    return {
        "parameters": sum(p.numel() for p in v.model.parameters()),
        "final_val_loss": v.val_loss[-1][1],
        "best_val_loss": min(loss for _, loss in v.val_loss),
        "val_loss": v.val_loss,
        "tokens_per_second": config.tokens_per_step / statistics.median(timed),
        "step_time_vs_baseline": statistics.median(a / b for a, b in zip(timed, base)),
        "first_step_seconds": v.step_seconds[0],
    }


def _table(runs: dict[int, dict[str, dict]]) -> str:
    rows = [
        (
            seed,
            name,
            f"{s['parameters']:,}",
            f"{s['final_val_loss']:.4f}",
            f"{s['best_val_loss']:.4f}",
            f"{s['tokens_per_second']:,.0f}",
            f"{100 * (s['step_time_vs_baseline'] - 1):+.1f}%",
            f"{s['first_step_seconds']:.1f}",
        )
        for seed, run in runs.items()
        for name, s in run.items()
    ]
    headers = [
        "seed",
        "model",
        "parameters",
        "final val loss",
        "best val loss",
        "train tokens/s",
        "step time vs baseline",
        "first step s",
    ]
    return tabulate(rows, headers=headers, disable_numparse=True)


def _profile_line(profile: dict[str, dict[str, list[float]]]) -> str:
    """How the stream the sublayers read grows with depth (the paper: the baseline's grows, AttnRes stays bounded),
    from a quarter of the way down (past the embedding's own scale) to the final norm."""
    parts = []
    for name, p in profile.items():
        reads = p["stream_read_rms"]
        start, end = reads[len(reads) // 4], reads[-1]
        parts.append(f"{name} {start:.2f} -> {end:.2f} ({end / start:.2f}x)")
    return f"RMS of the stream read, a quarter of the way down -> at the final norm: {', '.join(parts)}."
