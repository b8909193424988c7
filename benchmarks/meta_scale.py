"""Transform full-size MoE configs on the meta device: no weight is ever materialised.

    python -m benchmarks.meta_scale                      # Kimi Linear 48B, Mixtral-8x7B, DeepSeek-V3
    python -m benchmarks.meta_scale --models mixtral

Each model runs in a fresh process, so its peak resident memory (ru_maxrss) is its own. Prints a
table and writes benchmarks/results/meta-scale.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

# transformers model type -> the checkpoint its default config describes
MODELS = {"kimi_linear": "Kimi Linear 48B-A3B", "mixtral": "Mixtral-8x7B", "deepseek_v3": "DeepSeek-V3 671B"}


def measure(model_type: str) -> dict:
    """Build the default config on meta and transform it; runs inside the worker process."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import attnres_fx

    config = AutoConfig.for_model(model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).eval()
        start = time.perf_counter()
        tmodel = attnres_fx.transform(model)
        seconds = time.perf_counter() - start
    plan = attnres_fx.plan(tmodel)
    params = sum(p.numel() for p in tmodel.parameters())
    return {
        "model": MODELS.get(model_type, model_type),
        "model_type": model_type,
        "layers": config.num_hidden_layers,
        "sublayers": len(plan.sites),
        "blocks": plan.num_blocks,
        "parameters": params,
        "bf16_weights_gb": 2 * params / 1e9,
        "all_on_meta": all(p.is_meta for p in tmodel.parameters()),
        "transform_s": seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # Linux: KiB; whole process
    }


def run_worker(model_type: str) -> dict:
    """Measure one model in a fresh interpreter, so that its peak resident memory is its own."""
    cmd = [sys.executable, "-m", "benchmarks.meta_scale", "--worker", model_type]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="transformers model types, comma-separated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker)))
        return
    rows = []
    for model_type in args.models.split(","):
        rows.append(run_worker(model_type))
        r = rows[-1]
        print(f"{r['model']}: {r['transform_s']:.1f}s, peak RSS {r['peak_rss_gb']:.2f} GB", file=sys.stderr)
    headers = ["model", "layers", "sublayers", "blocks", "parameters", "bf16 weights GB", "transform s", "peak RSS GB"]
    table = [
        (
            r["model"],
            r["layers"],
            r["sublayers"],
            r["blocks"],
            f"{r['parameters'] / 1e9:.1f}B",
            f"{r['bf16_weights_gb']:.0f}",
            f"{r['transform_s']:.1f}",
            f"{r['peak_rss_gb']:.2f}",
        )
        for r in rows
    ]
    print(f"meta device, {platform.machine()}, torch {torch.__version__}\n" + tabulate(table, headers=headers))
    path = Path(args.out) / "meta-scale.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"torch": torch.__version__, "results": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
