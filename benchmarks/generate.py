"""KV-cache decoding: the transformed model's own `generate` against the original's, eager.

    python -m benchmarks.generate            # small Llama (d=256, 8 layers), 256-token prompt, 64 new tokens

Both models generate greedily from the same prompt, interleaved round by round. Decode time per token is the time
of `generate(max_new_tokens=64)` minus that of `generate(max_new_tokens=1)` (the prefill), over 63. Ratios are
paired medians; JSON goes to benchmarks/results/generate-cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

import attnres_fx


def small_llama() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def generate_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def run(rounds: int, prompt_len: int, new_tokens: int) -> dict:
    original = small_llama()
    models = {"original": original, "attnres_fx": attnres_fx.transform(copy.deepcopy(original))}
    prompt = torch.randint(0, 1024, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "generate": []} for name in models}
    for name, model in models.items():  # warm-up
        generate_seconds(model, prompt, 2)
    for _ in range(rounds):
        for name, model in models.items():
            times[name]["prefill"].append(generate_seconds(model, prompt, 1))
            times[name]["generate"].append(generate_seconds(model, prompt, new_tokens))
    per_token = {
        name: [(g - p) / (new_tokens - 1) for g, p in zip(t["generate"], t["prefill"])] for name, t in times.items()
    }
    return {
        "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
        "prompt": prompt_len,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "times": times,
        "decode_ms_per_token": {name: statistics.median(v) * 1e3 for name, v in per_token.items()},
        "decode_ratio": statistics.median(a / b for a, b in zip(per_token["attnres_fx"], per_token["original"])),
        "prefill_ratio": statistics.median(
            a / b for a, b in zip(times["attnres_fx"]["prefill"], times["original"]["prefill"])
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(args.rounds, args.prompt, args.new_tokens)
    rows = [
        (name, f"{ms:.2f}", f"{1e3 / ms:.0f}", f"{statistics.median(report['times'][name]['prefill']) * 1e3:.0f}")
        for name, ms in report["decode_ms_per_token"].items()
    ]
    print(f"{report['device']}, torch {report['torch']}, prompt {args.prompt}, {args.new_tokens} new tokens")
    print(tabulate(rows, headers=["model", "decode ms/token", "tokens/s", "prefill ms"]))
    print(f"decode x{report['decode_ratio']:.3f}, prefill x{report['prefill_ratio']:.3f} (paired medians)")
    path = Path(args.out) / "generate-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
