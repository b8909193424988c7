"""A tiny HF Mixtral (MoE) trained on the stdlib's source bytes: baseline vs Block AttnRes.

    python examples/moe_training.py             # about 2 minutes on 2 cores
    python examples/moe_training.py --steps 50

Same seed, same initial weights, same batches; prints both loss curves side by side.
"""

import argparse
import copy

import torch
from tabulate import tabulate
from transformers import AutoConfig, AutoModelForCausalLM

import attnres_fx
from attnres_fx.demo.corpus import VOCAB_SIZE, load_corpus, sample_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    config = AutoConfig.for_model(
        "mixtral",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=128,
        output_router_logits=True,
    )
    baseline = AutoModelForCausalLM.from_config(config)
    attnres = attnres_fx.transform(copy.deepcopy(baseline), num_blocks=4)
    print(attnres_fx.plan(attnres))
    corpus = load_corpus(1_000_000)
    models = {"baseline": baseline, "attnres": attnres}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0) for name, m in models.items()}
    data = torch.Generator().manual_seed(args.seed)
    rows, running = [], {name: [] for name in models}
    for step in range(1, args.steps + 1):
        ids, _ = sample_batch(corpus.train, 8, 64, data)
        for name, model in models.items():
            out = model(input_ids=ids, labels=ids)  # .loss includes the router's load-balancing loss
            out.loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            running[name].append(out.loss.item())
        if step % max(1, args.steps // 10) == 0:
            rows.append((step, *(sum(v[-10:]) / len(v[-10:]) for v in running.values())))
            print(f"step {step}: " + "  ".join(f"{n} {v:.3f}" for n, v in zip(models, rows[-1][1:])), flush=True)
    print(tabulate(rows, headers=["step", "baseline loss", "attnres loss"], floatfmt=".3f"))


if __name__ == "__main__":
    main()
