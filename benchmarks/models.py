"""Benchmark models: a Llama-style pre-norm transformer, and the same with hand-written Block AttnRes.

The hand-written variant follows the official pseudocode (stack the sources at every sublayer), the
way users write AttnRes by hand today; attnres_fx is compared against it and against the baseline.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        hidden = 4 * d * 2 // 3
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.attn = Attention(d, heads)
        self.mlp_norm = nn.RMSNorm(d, eps=1e-6)
        self.mlp = MLP(d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=1 / math.sqrt(p.shape[-1]))

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


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
        branches = [f for layer in self.layers for f in (lambda h, l=layer: l.attn(l.attn_norm(h)), lambda h, l=layer: l.mlp(l.mlp_norm(h)))]
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
