"""What the demo plots besides the loss: sublayer output magnitudes by depth and the depth weights.

Both are read generically: the sublayers are the plan's branch modules, the AttnRes quantities come
from the sites of the transformed graph. Nothing here knows the demo model's class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..api import plan, site_records
from ..plan import Plan


@torch.no_grad()
def baseline_sublayer_rms(model: nn.Module, tplan: Plan, *args: Tensor) -> list[float]:
    """RMS of each residual sublayer's output (what it adds to the stream) in the untransformed model."""
    outputs: dict[int, Tensor] = {}

    def hook(j: int):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            out = output[0] if isinstance(output, tuple) else output
            outputs[j] = outputs[j] + out if j in outputs else out

        return record

    handles = [model.get_submodule(path).register_forward_hook(hook(s.index)) for s in tplan.sites for path in s.branch]
    try:
        model(*args)
    finally:
        for h in handles:
            h.remove()
    return [_rms(outputs[s.index]) for s in tplan.sites]


@torch.no_grad()
def attnres_sublayer_rms(model: nn.Module, *args: Tensor) -> list[float]:
    """RMS of each sublayer's output in the transformed model, read off the depth-attention sources.

    The last source of site j is the running sum of sublayer j-1's block after j-1 ran, so sublayer
    j-1's output is that sum minus the previous site's (or the sum itself when j-1 opened a block).
    """
    tplan = plan(model)
    sums = [r.sources[-1].float() for r in site_records(model, args, {}).values()]  # sites 1..S-1, final
    outputs = [s if (j % tplan.block_size == 0) else s - sums[j - 1] for j, s in enumerate(sums)]
    return [_rms(o) for o in outputs]


@torch.no_grad()
def depth_weight_matrix(model: nn.Module, *args: Tensor) -> Tensor:
    """Mean softmax weight of every site (rows) over [b_0, b_1, ..., b_N, partial sum] (columns).

    Sources a site does not have are NaN; the partial sum always sits in the last column.
    """
    tplan = plan(model)
    records = site_records(model, args, {})
    matrix = torch.full((len(records), tplan.num_blocks + 2), math.nan)
    for row, (site, record) in enumerate(zip(tplan.parametrised, records.values())):
        weights = record.weights.flatten(1).mean(1)
        completed = 1 + site.index // tplan.block_size
        matrix[row, :completed] = weights[:completed]
        if site.index % tplan.block_size:
            matrix[row, -1] = weights[-1]
    return matrix


def _rms(x: Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()
