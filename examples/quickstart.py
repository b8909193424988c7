"""The main job: transform an HF Llama built from a config, print the plan, train it compiled.

python examples/quickstart.py
"""

import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import attnres_fx


def main() -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
    )
    model = AutoModelForCausalLM.from_config(config)
    start = time.perf_counter()
    model = attnres_fx.transform(model, num_blocks=4)
    print(f"transformed in {time.perf_counter() - start:.1f}s")
    print(attnres_fx.plan(model))
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (4, 32))
    for step in range(20):
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {loss.item():.4f}")
    tokens = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)  # the model's own, with its KV cache
    print("generated:", tokens[0, 8:].tolist())
    weights = attnres_fx.depth_weights(model, input_ids=ids)
    print("final aggregation weights over [embedding, blocks...]:", [round(w, 3) for w in weights["final"].tolist()])


if __name__ == "__main__":
    main()
