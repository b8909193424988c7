"""Per-layer ("regional") compile, as torchtitan does it: `layer.compile(fullgraph=True)` on every decoder layer.

    python -m benchmarks.per_layer_compile            # HF Llama, 12 layers, CPU, about 4 minutes

For the original and for transforms with 8 blocks (the default; blocks of 3 sublayers) and 6 (blocks of 4): how many
graphs Dynamo compiles, the first training step (each variant in its own process with empty compile caches), and the
steady training step (variants interleaved round by round, paired medians) as a ratio to the original compiled the
same way. Writes benchmarks/results/per-layer-compile-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

import attnres_fx

CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)
VARIANTS = {"original": None, "attnres_fx, 8 blocks": 8, "attnres_fx, 6 blocks": 6}


class Runner:
    def __init__(self, variant: str, layers: int, batch: int, seq: int):
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = AutoConfig.for_model("llama", num_hidden_layers=layers, **CONFIG)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
        blocks = VARIANTS[variant]
        self.model = model if blocks is None else attnres_fx.transform(model, num_blocks=blocks).train()
        for layer in self.model.model.layers:
            layer.compile(fullgraph=True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq))

    def step(self) -> float:
        start = time.perf_counter()
        self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def first_step(variant: str, args: argparse.Namespace) -> dict:
    """The first training step and the graph count, in a fresh process with empty compile caches."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        cmd = [sys.executable, "-m", "benchmarks.per_layer_compile", "--first-step-of", variant]
        cmd += ["--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--first-step-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # count every graph; past the default 8 layers would run eagerly
    if args.first_step_of:
        from torch._dynamo.utils import counters

        from attnres_fx.bench.worker import check_vector_isa

        check_vector_isa("cpu")
        seconds = Runner(args.first_step_of, args.layers, args.batch, args.seq).step()
        print(json.dumps({"first_step_s": seconds, "graphs": counters["stats"]["unique_graphs"]}))
        return
    cold = {v: first_step(v, args) for v in VARIANTS}
    runners = {v: Runner(v, args.layers, args.batch, args.seq) for v in VARIANTS}
    for r in runners.values():
        r.step(), r.step()  # compile, warm up
    steps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v, r in runners.items():
            steps[v].append(r.step())
    base = steps["original"]
    rows, report = [], {"layers": args.layers, "batch": args.batch, "seq": args.seq, "config": CONFIG, "results": {}}
    for v in VARIANTS:
        ratio = statistics.median(s / b for s, b in zip(steps[v], base))
        first = cold[v]["first_step_s"]
        report["results"][v] = {**cold[v], "steps": steps[v], "step_ratio": ratio}
        rows.append((v, cold[v]["graphs"], f"{first:.1f}", f"{first / cold['original']['first_step_s']:.2f}",
                     f"{statistics.median(steps[v]) * 1e3:.1f}", f"{ratio:.3f}"))  # fmt: skip
    report.update(device=f"CPU, {torch.get_num_threads()} thread", torch=torch.__version__, rounds=args.rounds)
    headers = ["variant", "graphs", "first step s", "x original", "step ms", "x original"]
    print(f"HF Llama {CONFIG}, {args.layers} layers, {args.batch} x {args.seq} tokens, per-layer compile")
    print(tabulate(rows, headers=headers))
    path = Path(args.out) / "per-layer-compile-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
