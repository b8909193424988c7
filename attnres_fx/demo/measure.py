"""What the demo plots besides the loss: the depth profile (the paper's Figure 5) and the depth weights.

All read generically: the sublayers are the plan's branch modules (forward hooks fire in the transformed model as in
the original), the streams the sublayers read come from the depth-attention sites. Nothing here knows the demo
model's class.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .. import ops
from ..api import plan, site_records, transform
from ..plan import Plan


@torch.no_grad()
def sublayer_output_rms(model: nn.Module, tplan: Plan, *args: Tensor) -> list[float]:
    """RMS of each residual sublayer's output (what it adds to the stream), original or transformed."""
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
def stream_read_rms(model: nn.Module, *args: Tensor) -> list[float]:
    """RMS of the stream each sublayer (and the final norm) reads, by depth: in a transformed model its depth mix;
    in an original one the running residual sum, read off a zero-initialised transform of a copy, whose sources
    (stream start, completed blocks, partial sum) add up to exactly that sum."""
    transformed = hasattr(model, "attnres")
    records = list(site_records(model if transformed else transform(copy.deepcopy(model), args), args, {}).values())

    def read(record: ops.SiteRecord) -> Tensor:
        values = torch.stack([s.float() for s in record.sources])
        return (record.weights.unsqueeze(-1) * values).sum(0) if transformed else values.sum(0)

    return [_rms(records[0].sources[0]), *(_rms(read(r)) for r in records)]


def sublayer_grad_norms(model: nn.Module, tplan: Plan, *args: Tensor) -> list[float]:
    """L2 norm of each sublayer's parameter gradient (its branch modules') for the loss the model returns on `args`."""
    model.zero_grad(set_to_none=True)
    model(*args).backward()
    norms = []
    for site in tplan.sites:
        grads = [p.grad.float().pow(2).sum() for path in site.branch for p in model.get_submodule(path).parameters()]
        norms.append(torch.stack(grads).sum().sqrt().item())
    model.zero_grad(set_to_none=True)
    return norms


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
