"""Train the baseline and its AttnRes transform side by side: same init, same batches, same budget.

The two variants take turns, one optimizer step each on the same batch, so machine noise hits both
alike and their step times can be compared in pairs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import attnres_fx

from .corpus import VOCAB_SIZE, Corpus, sample_batch
from .model import Transformer
from ..progress import Progress


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budget of the demo. Defaults: deep and narrow, where the paper finds AttnRes helps, at a budget of
    about 6 minutes on 2 cores (4 seeds, 2 at a time); chosen from the sweep in docs/demo/README.md."""

    width: int = 64
    layers: int = 12
    heads: int = 4
    num_blocks: int = 8
    seq_len: int = 64
    batch_size: int = 8
    steps: int = 360
    lr: float = 6e-3
    eval_every: int = 60
    eval_batches: int = 8
    seed: int = 0
    seeds: int = 4  # runs at seed, seed + 1, ...: the loss gap's mean and standard error
    workers: int = 2  # processes training seeds side by side (one thread each by default)
    corpus_bytes: int = 4_000_000
    compile: bool = False  # eager by default: compiling both costs ~3 min of the 6 on 2 cores

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class Variant:
    """One model being trained: its callable, optimizer and what was measured along the way."""

    name: str
    model: nn.Module
    step_fn: Callable[[Tensor, Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    step_seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)

    def train_step(self, ids: Tensor, labels: Tensor, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        loss = self.step_fn(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_seconds.append(time.perf_counter() - start)
        self.train_loss.append(loss.item())

    @torch.no_grad()
    def evaluate(self, step: int, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.model.eval()
        self.val_loss.append((step, statistics.fmean(self.model(x, y).item() for x, y in batches)))
        self.model.train()


def build_variants(config: DemoConfig, example: tuple[Tensor, Tensor]) -> list[Variant]:
    """The baseline and `attnres_fx.transform` of an identical copy (same seed, same weights)."""
    variants = []
    for name in ("baseline", "attnres"):
        torch.manual_seed(config.seed)
        model = Transformer(config.width, config.layers, config.heads, VOCAB_SIZE)
        if name == "attnres":
            model = attnres_fx.transform(model, example, num_blocks=config.num_blocks)
        step_fn = torch.compile(model) if config.compile else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
        variants.append(Variant(name, model, step_fn, optimizer))
    return variants


def learning_rate(config: DemoConfig, step: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to a tenth."""
    warmup = max(1, config.steps // 20)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(
    config: DemoConfig, corpus: Corpus, variants: list[Variant], show_progress: bool = True
) -> list[tuple[Tensor, Tensor]]:
    """Train every variant for `config.steps` steps on the same batches; returns the validation batches."""
    data_rng = torch.Generator().manual_seed(config.seed)
    val_rng = torch.Generator().manual_seed(config.seed + 1)
    val_batches = [
        sample_batch(corpus.val, config.batch_size, config.seq_len, val_rng) for _ in range(config.eval_batches)
    ]
    progress = Progress(config.steps)
    for step in range(config.steps):
        ids, labels = sample_batch(corpus.train, config.batch_size, config.seq_len, data_rng)
        lr = learning_rate(config, step)
        for v in variants:
            v.train_step(ids, labels, lr)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            for v in variants:
                v.evaluate(step + 1, val_batches)
        losses = "  ".join(f"{v.name} {v.train_loss[-1]:.3f}" for v in variants)
        if show_progress:
            progress.update(step + 1, f"loss: {losses}  {_tokens_per_second(config, variants) / 1e3:.1f}k tok/s")
    if show_progress:
        progress.close()
    return val_batches


def _tokens_per_second(config: DemoConfig, variants: list[Variant]) -> float:
    seconds = sum(v.step_seconds[-1] for v in variants)
    return len(variants) * config.tokens_per_step / seconds
