"""bf16 rounding of partial sums taken as differences of stream values, against partial sums handed in.

    python -m benchmarks.difference_rounding      # CPU, seconds

Where each layer is a module, its forward is handed the current block's partial sum and its own adds compute the
next one (exact up to the adds' own rounding). Where the stream starts inside the layer (the model's own forward
holds the embedding and every add), the layer computes on the model's own stream, and a partial sum is the
difference of two stream values that its norms see: in bf16 that difference carries the rounding of the larger
running sum. Same weights, same random pseudo-queries, two writings of one model (nanoGPT-style, the adds in the
model's forward vs one residual module per sublayer), each in bf16 against the fp64 handed-in reference. Writes
benchmarks/results/difference-rounding-cpu.json.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

import attnres_fx

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import zoo  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "difference-rounding-cpu.json"


class Residual(nn.Module):
    def __init__(self, sub: nn.Module):
        super().__init__()
        self.sub = sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sub(x)


class LayeredGPT(nn.Module):
    """`RootForwardGPT` with each sublayer's add in a module of its own: the layers are handed partial sums."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.wte, self.ln_f, self.lm_head = root.wte, root.ln_f, root.lm_head
        self.layers = nn.ModuleList(Residual(sub) for sub in root.subs)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


def transformed_pair(layers: int, block_size: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """(differenced, handed): the same weights and pseudo-queries."""
    ids = zoo.token_ids()
    root = zoo.root_forward_gpt(layers)
    layered = LayeredGPT(copy.deepcopy(root))
    differenced = attnres_fx.transform(root, (ids,), block_size=block_size)
    handed = attnres_fx.transform(layered, (ids,), block_size=block_size)
    zoo.random_depth_(differenced, 0.5, seed)
    handed.attnres.load_state_dict(differenced.attnres.state_dict())
    return differenced, handed


def error(model: nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return zoo.rel_err(copy.deepcopy(model).to(torch.bfloat16)(ids), reference)


def main() -> None:
    rows, ids = [], zoo.token_ids(4, 64, seed=2)
    for layers, block_size in [(6, 2), (12, 4), (24, 4)]:
        diff, hand = [], []
        for seed in range(5):
            differenced, handed = transformed_pair(layers, block_size, seed)
            with torch.no_grad():
                reference = copy.deepcopy(handed).double()(ids)
            diff.append(error(differenced, reference, ids))
            hand.append(error(handed, reference, ids))
        rows.append(
            {
                "sublayers": 2 * layers,
                "block_size": block_size,
                "handed bf16 rel err": statistics.median(hand),
                "differenced bf16 rel err": statistics.median(diff),
                "ratio": statistics.median(d / h for d, h in zip(diff, hand)),
            }
        )
    print(tabulate(rows, headers="keys", floatfmt=".4f"))
    note = "median over 5 seeds of max|out - fp64| / max|fp64| on logits, batch 4 x 64 tokens, d=32"
    RESULTS.write_text(json.dumps({"rows": rows, "measure": note}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
