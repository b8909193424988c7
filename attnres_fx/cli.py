"""The `attnres-fx` command: `demo` trains baseline vs AttnRes; `inspect` prints a model's plan; `bench` compares
compiler backends on a suite of models, original and transformed.

attnres-fx demo                               # a few minutes on 2 cores; plots in attnres_demo/
attnres-fx demo --layers 4 --steps 50 --out /tmp/demo
attnres-fx demo --quick                       # a one-minute smoke run
attnres-fx inspect --hf llama                 # tiny config of a transformers model type
attnres-fx inspect --hf config.json --meta    # a config file, built on the meta device
attnres-fx inspect --timm vit_small_patch16_224
attnres-fx inspect --factory my_pkg.models:build --input-shape 2,16,256
attnres-fx bench --size tiny --backends eager,aot_eager,inductor
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import time
from pathlib import Path

import torch
from torch import nn

from . import bench, plan, transform
from .demo import DemoConfig, run_demo
from .errors import AttnResError

TINY_HF = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def build_model(args: argparse.Namespace) -> tuple[nn.Module, tuple | None]:
    if args.hf:
        from transformers import AutoConfig, AutoModelForCausalLM

        if args.hf.endswith(".json"):
            config = AutoConfig.from_pretrained(args.hf)
        else:
            config = AutoConfig.for_model(args.hf, **({} if args.default_config else TINY_HF))
        return AutoModelForCausalLM.from_config(config), None
    if args.timm:
        import timm

        return timm.create_model(args.timm, pretrained=False), None
    module_name, _, attr = args.factory.partition(":")
    model = getattr(importlib.import_module(module_name), attr)()
    if not args.input_shape:
        return model, None
    shape = tuple(int(s) for s in args.input_shape.split(","))
    return model, (torch.randn(shape),)


def inspect(args: argparse.Namespace) -> None:
    device = torch.device("meta") if args.meta else torch.device("cpu")
    with device:
        model, example = build_model(args)
        start = time.perf_counter()
        tmodel = transform(model, example, num_blocks=args.num_blocks)
    print(plan(tmodel))
    print(f"\ntransformed in {time.perf_counter() - start:.1f}s" + (" on the meta device" if args.meta else ""))


# `--quick`: a smoke run of about a minute on 2 cores (what the tests use); flags given explicitly still win.
QUICK = dict(width=32, layers=4, heads=2, num_blocks=4, seq_len=32, batch_size=4, steps=40, eval_every=20, seeds=2)


def demo(args: argparse.Namespace) -> None:
    defaults = DemoConfig()
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    chosen = {k: v for k, v in vars(args).items() if k in fields}
    if args.quick:
        chosen.update({k: v for k, v in QUICK.items() if chosen[k] == getattr(defaults, k)})
    torch.set_num_threads(args.threads)  # before compiling: Inductor bakes the count into its kernels
    run_demo(DemoConfig(**chosen), Path(args.out))


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    defaults = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="train a byte-level LM, baseline vs AttnRes, and plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sizes = {
        "width": "model width",
        "layers": "transformer layers (2 residual sublayers each)",
        "heads": "attention heads",
        "num_blocks": "AttnRes blocks",
        "seq_len": "bytes per training sequence",
        "batch_size": "sequences per step",
        "steps": "optimizer steps, the same for both models",
        "eval_every": "steps between validation evaluations",
        "seed": "seed of the initial weights and of the batches (the first seed)",
        "seeds": "runs at seed, seed+1, ...: the loss gap's mean and standard error",
        "workers": "processes training seeds side by side",
    }
    for name, what in sizes.items():
        default = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"{what} (default {default})")
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    p.add_argument("--compile", action="store_true", help="train both with torch.compile (adds minutes of compilation)")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run at tiny sizes")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per seed's process")
    p.add_argument("--out", default="attnres_demo", help="folder for the plots and results.json")
    p.set_defaults(run=demo)


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="print the plan for a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="transformers model type (tiny config) or a config.json")
    source.add_argument("--timm", help="timm model name (random init)")
    source.add_argument("--factory", help="package.module:function returning an nn.Module")
    p.add_argument("--input-shape", help="for --factory: shape of one random example input, e.g. 2,16,256")
    p.add_argument("--default-config", action="store_true", help="with --hf TYPE: the type's full default config")
    p.add_argument("--meta", action="store_true", help="build on the meta device: no memory for weights")
    p.add_argument("--num-blocks", type=int, default=8)
    p.set_defaults(run=inspect)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="attnres-fx", description="Block AttnRes as a compiler pass.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_inspect_parser(sub)
    bench.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        status = args.run(args)  # `bench` returns 1 when an entry failed
    except AttnResError as exc:
        parser.exit(2, f"attnres-fx: {exc}\n")
    if status:
        parser.exit(status)
