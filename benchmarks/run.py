"""Baseline vs attnres_fx (plain rewrite, optimised) vs hand-written AttnRes, eager and compiled.

    python -m benchmarks.run --config small            # CPU, a few minutes
    python -m benchmarks.run --config medium --device cuda         # bf16 by default on CUDA

Prints ratios against the compiled baseline measured in the same run (variants interleaved, paired
medians) and writes JSON under benchmarks/results/. Per variant: training step, inference forward,
activations kept for the backward (any device), peak training memory (CUDA), and the first compiled
training step, each variant in its own process with empty compile caches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tabulate import tabulate

import attnres_fx
from attnres_fx.bench.worker import check_vector_isa
from attnres_fx.demo.model import Transformer

from .models import HandWrittenAttnRes

CONFIGS = {
    "tiny": dict(d=64, layers=2, heads=4, vocab=256, batch=2, seq=32),
    "demo": dict(d=64, layers=12, heads=4, vocab=256, batch=8, seq=64),  # the demo's model and batch (eager training)
    "small": dict(d=256, layers=8, heads=4, vocab=1024, batch=2, seq=256),
    "medium": dict(d=768, layers=12, heads=12, vocab=8192, batch=2, seq=512),
    "large": dict(d=2048, layers=24, heads=16, vocab=32000, batch=4, seq=2048),
}


def build(variant: str, cfg: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    shape = dict(d=cfg["d"], layers=cfg["layers"], heads=cfg["heads"], vocab=cfg["vocab"])
    torch.manual_seed(0)
    if variant == "handwritten":
        return HandWrittenAttnRes(**shape).to(device, dtype)
    model = Transformer(**shape).to(device, dtype)
    if variant == "baseline":
        return model
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), device=device)
    return attnres_fx.transform(model, (ids, ids), passes=() if variant == "attnres_fx_plain" else ("two_phase",))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One variant in one mode: its model, optimizer and compiled callable."""

    def __init__(self, variant: str, compiled: bool, cfg: dict, device: str, dtype: torch.dtype):
        self.name = f"{variant} ({'compiled' if compiled else 'eager'})"
        self.variant, self.compiled, self.device = variant, compiled, device
        self.model = build(variant, cfg, device, dtype)
        self.call: Callable = torch.compile(self.model) if compiled else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), device=device)

    def train_step(self) -> float:
        self.model.train()
        sync(self.device)
        start = time.perf_counter()
        self.call(self.ids, self.ids).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def infer(self) -> float:
        self.model.eval()
        sync(self.device)
        start = time.perf_counter()
        self.call(self.ids, self.ids)
        sync(self.device)
        return time.perf_counter() - start

    def saved_for_backward(self) -> float:
        """MiB the training forward keeps for the backward (activations, not parameters), any device.

        Read from the autograd graph the forward built: what eager nodes and compiled graphs hold
        as saved tensors, each storage counted once.
        """
        self.model.train()
        loss = self.call(self.ids, self.ids)
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved_tensors(loss.grad_fn)}
        del loss
        return sum(n for ptr, n in storages.items() if ptr not in params) / 2**20

    def peak_train_memory(self) -> float | None:
        if self.device != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        self.train_step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def saved_tensors(root: torch.autograd.graph.Node) -> Iterator[torch.Tensor]:
    """Every tensor an autograd node reachable from `root` saved for the backward."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_") or name == "saved_tensors":  # aten nodes / Python Functions
                value = getattr(node, name)
                yield from (
                    v for v in (value if isinstance(value, tuple | list) else (value,)) if isinstance(v, torch.Tensor)
                )
        stack.extend(n for n, _ in node.next_functions)


def cold_compile_seconds(config: str, variant: str, device: str, dtype: torch.dtype) -> float:
    """The first compiled training step of `variant`, in a fresh process with empty compile caches.

    In one process, later variants would reuse the kernels and graphs an earlier one compiled (the
    transformed model's attention and MLP kernels are the baseline's), so each compiles alone.
    """
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--config",
            config,
            "--device",
            device,
            "--threads",
            str(torch.get_num_threads()),
            "--dtype",
            str(dtype).removeprefix("torch."),
        ]
        out = subprocess.run([*cmd, "--first-step-of", variant], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def run(config: str, device: str, dtype: torch.dtype, rounds: int, variants: list[str], eager: bool) -> dict:
    cfg = CONFIGS[config]
    compile_s = {v: cold_compile_seconds(config, v, device, dtype) for v in variants}
    runners = [Runner(v, c, cfg, device, dtype) for v in variants for c in ((False, True) if eager else (True,))]
    results: dict[str, dict] = {}
    for r in runners:
        r.train_step(), r.infer()  # compiles when compiled
        results[r.name] = {"compile_s": compile_s[r.variant] if r.compiled else None, "train": [], "infer": []}
        r.train_step(), r.infer()  # warm-up
        results[r.name]["peak_train_mib"] = r.peak_train_memory()
        results[r.name]["saved_mib"] = r.saved_for_backward()
    for _ in range(rounds):  # interleaved, so drift hits every variant alike
        for r in runners:
            results[r.name]["train"].append(r.train_step())
        for r in runners:
            results[r.name]["infer"].append(r.infer())
    return {
        "config": config,
        "cfg": cfg,
        "device": device_name(device),
        "dtype": str(dtype),
        "rounds": rounds,
        "results": results,
    }


def paired_ratio(xs: list[float], base: list[float]) -> float:
    return statistics.median(x / b for x, b in zip(xs, base))


def table(report: dict) -> str:
    res = report["results"]
    base = res["baseline (compiled)"]
    rows = []
    for name, r in res.items():
        mem, saved = r["peak_train_mib"], r["saved_mib"]
        rows.append(
            (
                name,
                f"{statistics.median(r['train']) * 1e3:.1f}",
                f"{paired_ratio(r['train'], base['train']):.3f}",
                f"{statistics.median(r['infer']) * 1e3:.1f}",
                f"{paired_ratio(r['infer'], base['infer']):.3f}",
                f"{saved:.1f}",
                f"{saved / base['saved_mib']:.3f}",
                "-" if mem is None else f"{mem:.0f}",
                "-" if mem is None or not base["peak_train_mib"] else f"{mem / base['peak_train_mib']:.3f}",
                "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
                "-" if r["compile_s"] is None else f"{r['compile_s'] / base['compile_s']:.2f}",
            )
        )
    headers = [
        "variant",
        "train ms",
        "x base",
        "infer ms",
        "x base",
        "saved MiB",
        "x base",
        "peak train MiB",
        "x base",
        "compile s",
        "x base",
    ]
    return tabulate(rows, headers=headers)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (baked into Inductor's kernels)")
    parser.add_argument("--variants", default="baseline,attnres_fx_plain,attnres_fx,handwritten")
    parser.add_argument("--no-eager", action="store_true", help="compiled variants only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--first-step-of", help=argparse.SUPPRESS)  # used by cold_compile_seconds
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    if args.first_step_of:
        check_vector_isa(args.device)
        print(Runner(args.first_step_of, True, CONFIGS[args.config], args.device, dtype).train_step())
        return
    report = run(args.config, args.device, dtype, args.rounds, args.variants.split(","), not args.no_eager)
    report["torch"] = torch.__version__
    text = table(report)
    print(
        f"{args.config} {report['cfg']} {dtype} on {report['device']}, torch {torch.__version__}, "
        f"{args.rounds} rounds\n{text}"
    )
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"{args.config}-{'cuda' if args.device == 'cuda' else 'cpu'}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
