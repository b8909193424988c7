"""Your own model: any pre-norm residual nn.Module, transformed without touching its code.

    python examples/hand_written.py

A hand-written model needs one example call (`transform(model, (x,))`); everything else is the same
as for library models.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import attnres_fx


class MixerBlock(nn.Module):
    """An MLP-Mixer block: token mixing and channel mixing, each a pre-norm residual sublayer."""

    def __init__(self, tokens: int, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, tokens: int = 16, d: int = 64, depth: int = 8, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(12, d)
        self.blocks = nn.Sequential(*(MixerBlock(tokens, d) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Mixer()
    x = torch.randn(32, 16, 12)
    target = torch.randint(0, 10, (32,))
    with torch.no_grad():
        before = model(x)
    model = attnres_fx.transform(model, (x,), num_blocks=4)
    print(attnres_fx.plan(model))
    with torch.no_grad():
        diff = (model(x) - before).abs().max() / before.abs().max()
    print(f"fresh transform vs original: max relative difference {diff:.1e} (zero queries preserve the function)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, args.steps + 1):
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (1, 25, 50, args.steps):
            print(f"step {step:3d}  loss {loss.item():.3f}")
    for site, w in attnres_fx.depth_weights(model, x).items():
        print(f"{site:>8}: " + " ".join(f"{v:.2f}" for v in w.tolist()))


if __name__ == "__main__":
    main()
