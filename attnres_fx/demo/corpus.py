"""The demo's corpus: the Python standard library's own source, which every Python install carries.

Bytes, not characters: a fixed 256-symbol vocabulary, no tokenizer, nothing to download. The files
are read in sorted order and the last tenth is held out for validation (whole files, so validation
text is code the model never saw).
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 256


@dataclass(frozen=True)
class Corpus:
    train: Tensor  # uint8 bytes
    val: Tensor
    source: str  # where the text came from, for the report
    num_files: int


def load_corpus(max_bytes: int) -> Corpus:
    """Up to `max_bytes` of stdlib source, split 90/10 into train and validation by file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    text = b"".join(chunks)[:max_bytes]
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    split = int(0.9 * len(data))
    return Corpus(data[:split], data[split:], f"{root}/*.py (sorted, first {len(text):,} bytes)", len(chunks))


def sample_batch(data: Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of `seq_len + 1` bytes: inputs and next-byte targets, as int64 ids."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]
