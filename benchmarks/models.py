"""The hand-written Block AttnRes that attnres_fx is compared against in the benchmarks.

It follows the official pseudocode (stack the sources at every sublayer), the way users write
AttnRes by hand today, on the same pre-norm transformer the demo trains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnres_fx.demo.model import Transformer


class HandWrittenAttnRes(Transformer):
    """Block AttnRes written into the model, as in the official pseudocode (stack per sublayer)."""

    def __init__(self, d: int, layers: int, heads: int, vocab: int, num_blocks: int = 8):
        super().__init__(d, layers, heads, vocab)
        sublayers = 2 * layers
        self.block_size = math.ceil(sublayers / num_blocks)
        self.queries = nn.Parameter(torch.zeros(sublayers + 1, d))
        self.key_weights = nn.Parameter(torch.ones(sublayers + 1, d))

    def mix(self, sources: list[Tensor], j: int) -> Tensor:
        v = torch.stack(sources)
        k = F.rms_norm(v.float(), (v.shape[-1],), self.key_weights[j].float(), 1e-6)
        w = torch.einsum("d,n...d->n...", self.queries[j].float(), k).softmax(0)
        return torch.einsum("n...,n...d->...d", w, v.float()).to(v.dtype)

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        blocks, partial = [self.embed(ids)], None
        branches = [
            f
            for layer in self.layers
            for f in (lambda h, l=layer: l.attn(l.attn_norm(h)), lambda h, l=layer: l.mlp(l.mlp_norm(h)))
        ]
        for j, f in enumerate(branches):
            sources = blocks + ([partial] if partial is not None else [])
            out = f(sources[0] if len(sources) == 1 else self.mix(sources, j))
            partial = out if partial is None else partial + out
            if (j + 1) % self.block_size == 0:
                blocks.append(partial)
                partial = None
        x = self.mix(blocks + ([partial] if partial is not None else []), len(branches))
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
