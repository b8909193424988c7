"""Convert a checkpoint of the original model: save, transform a fresh model, load, keep training.

    python examples/convert_checkpoint.py

A freshly transformed pre-norm model computes the original function (zero pseudo-queries), so a
trained checkpoint loads with `strict=False` (only `attnres.*` is missing) and training continues
from the same loss, without a spike. The original model, trained on alongside, is the reference.
"""

import argparse
import copy
import io

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import attnres_fx
from attnres_fx.demo.corpus import VOCAB_SIZE, load_corpus, sample_batch

CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=128,
)


def train(model, optimizer, batches) -> list[float]:
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **CONFIG)
    corpus = load_corpus(1_000_000)
    data = torch.Generator().manual_seed(0)
    batches = [sample_batch(corpus.train, 8, 64, data)[0] for _ in range(args.pretrain_steps + args.steps)]

    original = AutoModelForCausalLM.from_config(config)
    pre = train(original, torch.optim.AdamW(original.parameters(), lr=3e-3), batches[: args.pretrain_steps])
    checkpoint = io.BytesIO()
    torch.save(original.state_dict(), checkpoint)  # the "pretrained checkpoint"
    print(f"pretrained {args.pretrain_steps} steps: loss {pre[0]:.3f} -> {sum(pre[-10:]) / 10:.3f} (mean of last 10)")

    fresh = AutoModelForCausalLM.from_config(config)
    converted = attnres_fx.transform(fresh, num_blocks=4)
    checkpoint.seek(0)
    missing, unexpected = converted.load_state_dict(torch.load(checkpoint), strict=False)
    assert not unexpected and all(k.startswith("attnres.") for k in missing)
    print(f"loaded into the transformed model; missing only the {len(missing)} new attnres.* parameters")

    reference = copy.deepcopy(original)  # the original, trained on without conversion
    rest = batches[args.pretrain_steps :]
    after = train(converted, torch.optim.AdamW(converted.parameters(), lr=1e-3), rest)
    ref = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), rest)
    print(f"{'step':>5} {'converted (AttnRes)':>20} {'original':>10}")
    for i in sorted({0, 1, 2, 5, 10, 25, 50, len(rest) - 1} & set(range(len(rest)))):
        print(f"{args.pretrain_steps + i:>5} {after[i]:>20.3f} {ref[i]:>10.3f}")
    print(f"first step after conversion: {after[0]:.3f} vs {ref[0]:.3f} for the original on the same batch (no spike)")


if __name__ == "__main__":
    main()
