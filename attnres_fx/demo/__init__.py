"""`attnres-fx demo`: a byte-level LM on the stdlib's source, baseline vs `attnres_fx.transform`.

Trains both side by side (same seed, same weights at step 0, same batches), prints a table and
writes `loss.png`, `sublayer_magnitude.png`, `depth_weights.png` and `results.json` to the output
folder. It reports what it finds, whichever model wins.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
from pathlib import Path

import torch
from tabulate import tabulate

from ..api import plan
from .corpus import load_corpus, sample_batch
from .measure import attnres_sublayer_rms, baseline_sublayer_rms, depth_weight_matrix
from .train import DemoConfig, Variant, build_variants, train

__all__ = ["DemoConfig", "run_demo", "run_seeds"]

WARMUP_STEPS = 5  # left out of the timings: compilation and allocator warm-up


def run_demo(config: DemoConfig, out_dir: Path) -> dict:
    """Train, measure, plot; returns what `results.json` holds."""
    from . import plots  # matplotlib only when the demo runs

    corpus = load_corpus(config.corpus_bytes)
    example = sample_batch(corpus.train, 2, config.seq_len, torch.Generator().manual_seed(0))
    baseline, attnres = variants = build_variants(config, example)
    tplan = plan(attnres.model)
    print(f"corpus: {corpus.source}, {len(corpus.train):,} train / {len(corpus.val):,} validation bytes")
    print(tplan, end="\n\n")
    val_batches = train(config, corpus, variants)

    probe = val_batches[0]
    rms = {
        "baseline": baseline_sublayer_rms(baseline.model, tplan, *probe),
        "attnres": attnres_sublayer_rms(attnres.model, *probe),
    }
    weights = depth_weight_matrix(attnres.model, *probe)
    site_names = [s.name for s in tplan.parametrised]
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{config.layers} layers x width {config.width}, seed {config.seed}"
    figures = {
        "loss.png": plots.loss_figure({v.name: v.val_loss for v in variants}, config.tokens_per_step, title),
        "sublayer_magnitude.png": plots.magnitude_figure(rms, tplan.block_size),
        "depth_weights.png": plots.weights_figure(weights, site_names),
    }
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=120)
        plots.plt.close(fig)  # pyplot keeps every figure alive otherwise

    results = {
        "config": dataclasses.asdict(config),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "corpus": corpus.source,
        "variants": {v.name: _summary(v, baseline, config) for v in variants},
        "sublayer_rms": rms,
        "depth_weights": {"sites": site_names, "matrix": weights.tolist()},
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'compiled' if config.compile else 'eager'}, {results['machine']}\n" + _table(results["variants"]))
    print(_findings(results))
    print(f"\nwrote {', '.join(figures)} and results.json to {out_dir}/")
    return results


def run_seeds(config: DemoConfig, out_dir: Path, seeds: int) -> dict:
    """The demo at `seeds` consecutive seeds from `config.seed` (weights and batches both change), each in its own
    folder, then the final validation-loss gap (attnres - baseline) per seed, its mean and its spread."""
    runs = {
        seed: run_demo(dataclasses.replace(config, seed=seed), out_dir / f"seed-{seed}")
        for seed in range(config.seed, config.seed + seeds)
    }
    final = {seed: {v: r["variants"][v]["final_val_loss"] for v in ("baseline", "attnres")} for seed, r in runs.items()}
    gaps = [f["attnres"] - f["baseline"] for f in final.values()]
    spread = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
    result = {
        "config": dataclasses.asdict(config),
        "seeds": list(runs),
        "final_val_loss": final,
        "gap_mean": statistics.fmean(gaps),
        "gap_std": spread,
        "gap_standard_error": spread / len(gaps) ** 0.5,
        "attnres_ahead": sum(g < 0 for g in gaps),
    }
    (out_dir / "seeds.json").write_text(json.dumps(result, indent=1))
    rows = [
        (seed, f"{f['baseline']:.4f}", f"{f['attnres']:.4f}", f"{g:+.4f}") for (seed, f), g in zip(final.items(), gaps)
    ]
    print(
        "\n"
        + tabulate(rows, headers=["seed", "baseline", "attnres", "gap (attnres - baseline)"], disable_numparse=True)
    )
    print(
        f"\nFinal validation-loss gap over {len(gaps)} seeds: {result['gap_mean']:+.4f} nats/byte "
        f"(std {spread:.4f}, standard error {result['gap_standard_error']:.4f}); "
        f"AttnRes ahead in {result['attnres_ahead']} of {len(gaps)}. Wrote {out_dir}/seeds.json."
    )
    return result


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


def _table(summaries: dict[str, dict]) -> str:
    rows = [
        (
            name,
            f"{s['parameters']:,}",
            f"{s['final_val_loss']:.4f}",
            f"{s['best_val_loss']:.4f}",
            f"{s['tokens_per_second']:,.0f}",
            f"{100 * (s['step_time_vs_baseline'] - 1):+.1f}%",
            f"{s['first_step_seconds']:.1f}",
        )
        for name, s in summaries.items()
    ]
    headers = [
        "model",
        "parameters",
        "final val loss",
        "best val loss",
        "train tokens/s",
        "step time vs baseline",
        "first step s",
    ]
    return tabulate(rows, headers=headers)


def _findings(results: dict) -> str:
    base, attn = results["variants"]["baseline"], results["variants"]["attnres"]
    delta = attn["final_val_loss"] - base["final_val_loss"]
    growth = {name: values[-1] / values[0] for name, values in results["sublayer_rms"].items()}
    verdict = "below" if delta < 0 else "above"
    return (
        f"\nAttnRes ended {abs(delta):.4f} nats/byte {verdict} the baseline (seed {results['config']['seed']}, "
        f"same batches and token budget).\nLast / first sublayer output RMS: baseline {growth['baseline']:.2f}x, "
        f"attnres {growth['attnres']:.2f}x."
    )
