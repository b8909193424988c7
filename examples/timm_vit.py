"""A timm ViT, transformed and compiled, trained on synthetic images.

    python examples/timm_vit.py            # needs timm (pip install -e ".[test]")

The task is made up so that it needs no download: say which colour channel of a noisy image is
brighter than the others, or that none is.
"""

import argparse

import timm
import torch
import torch.nn.functional as F

import attnres_fx


def synthetic_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 4, (batch,), generator=generator)  # 0-2: that channel is brighter; 3: none
    for i, label in enumerate(labels.tolist()):
        if label < 3:
            images[i, label] += 0.5
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=96,
        depth=6,
        num_heads=3,
        num_classes=4,
    )
    # timm's pretrained_cfg still says 224x224 after img_size=32, so give the example input explicitly
    model = attnres_fx.transform(model, (torch.randn(2, 3, 32, 32),), num_blocks=4)
    print(attnres_fx.plan(model))
    step_fn = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        images, labels = synthetic_batch(32, data)
        logits = step_fn(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 1:
            accuracy = (logits.argmax(-1) == labels).float().mean().item()
            print(f"step {step:3d}  loss {loss.item():.3f}  batch accuracy {accuracy:.2f}", flush=True)
    weights = attnres_fx.depth_weights(model, synthetic_batch(8, data)[0])
    print(
        "final aggregation weights over [patch embedding, blocks...]:", [round(w, 3) for w in weights["final"].tolist()]
    )


if __name__ == "__main__":
    main()
