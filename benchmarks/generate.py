"""KV-cache decoding: the transformed model's own `generate` against the original's, eager or compiled.

    python -m benchmarks.generate             # small Llama (d=256, 8 layers), 256-token prompt, 64 new tokens, eager
    python -m benchmarks.generate --compiled  # static KV cache, `model.forward = torch.compile(model.forward)`

Compiled, both models decode with transformers' static cache (fixed shapes: one graph for the prefill, one for a
decode step; CUDA graphs on top where the device has them, `mode="reduce-overhead"`), as transformers documents for
`torch.compile`.

Both models generate greedily from the same prompt, interleaved round by round. Decode time per token is the time
of `generate(max_new_tokens=64)` minus that of `generate(max_new_tokens=1)` (the prefill), over 63. Ratios are
paired medians; JSON goes to benchmarks/results/generate[-compiled]-<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

import attnres_fx

from .run import device_name, sync


def small_llama(device: str = "cpu") -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device).eval()


def compile_decoding(model: torch.nn.Module, device: str) -> None:
    """A compiled forward, as transformers documents for `torch.compile` (the static cache is passed per call)."""
    model.forward = torch.compile(model.forward, mode="reduce-overhead" if device == "cuda" else None)


def static_cache(model: torch.nn.Module, cache_len: int | None) -> dict:
    """`generate`'s keyword for a fresh static KV cache of `cache_len` (none: the model's own dynamic cache)."""
    if cache_len is None:
        return {}
    from transformers import StaticCache

    return {"past_key_values": StaticCache(config=model.config, max_cache_len=cache_len)}


@torch.no_grad()
def generate_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, cache_len: int | None) -> float:
    """Wall time of one greedy `generate`; with `cache_len`, into a fresh static cache of that length (one length
    for every call, so a compiled forward sees the same shapes whatever `new_tokens` is)."""
    extra = static_cache(model, cache_len)
    sync(prompt.device.type)
    start = time.perf_counter()
    model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra
    )
    sync(prompt.device.type)
    return time.perf_counter() - start


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: torch.Tensor, cache_len: int | None) -> torch.Tensor:
    extra = static_cache(model, cache_len)
    return model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, **extra)


def run(rounds: int, prompt_len: int, new_tokens: int, compiled: bool, device: str) -> dict:
    original = small_llama(device)
    models = {"original": original, "attnres_fx": attnres_fx.transform(copy.deepcopy(original))}
    prompt = torch.randint(0, 1024, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "generate": []} for name in models}
    compile_s = {}
    cache_len = prompt_len + new_tokens if compiled else None
    for name, model in models.items():  # warm-up (compiled: the prefill and decode graphs)
        if compiled:
            compile_decoding(model, device)
        compile_s[name] = generate_seconds(model, prompt, 3, cache_len)
        generate_seconds(model, prompt, 3, cache_len)
    for _ in range(rounds):
        for name, model in models.items():
            times[name]["prefill"].append(generate_seconds(model, prompt, 1, cache_len))
            times[name]["generate"].append(generate_seconds(model, prompt, new_tokens, cache_len))
    per_token = {
        name: [(g - p) / (new_tokens - 1) for g, p in zip(t["generate"], t["prefill"])] for name, t in times.items()
    }
    tokens = {name: greedy(model, prompt, cache_len) for name, model in models.items()}
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "compiled": compiled,
        "first_generate_s": compile_s,
        "same_greedy_tokens": bool(torch.equal(tokens["original"], tokens["attnres_fx"])),
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
    parser.add_argument("--compiled", action="store_true", help="static KV cache and a compiled forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(args.rounds, args.prompt, args.new_tokens, args.compiled, args.device)
    rows = [
        (name, f"{ms:.2f}", f"{1e3 / ms:.0f}", f"{statistics.median(report['times'][name]['prefill']) * 1e3:.0f}")
        for name, ms in report["decode_ms_per_token"].items()
    ]
    mode = "compiled, static cache" if args.compiled else "eager"
    print(f"{report['device']}, torch {report['torch']}, {mode}, prompt {args.prompt}, {args.new_tokens} new tokens")
    print(tabulate(rows, headers=["model", "decode ms/token", "tokens/s", "prefill ms"]))
    print(f"decode x{report['decode_ratio']:.3f}, prefill x{report['prefill_ratio']:.3f} (paired medians)")
    name = f"generate{'-compiled' if args.compiled else ''}-{'cuda' if args.device == 'cuda' else 'cpu'}.json"
    path = Path(args.out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
