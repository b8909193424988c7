"""Whether a compiled run computed what eager did: the dynamo benchmark harness's rule, tensor by tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Compiled against eager: the largest |difference| over the largest |eager| value, per tensor. fp32: the harness's
# tolerance; bf16 rounds at 2^-8 and the two runs round in different places.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def relative_error(result: Tensor, reference: Tensor) -> float:
    """The largest difference relative to the reference's largest magnitude; NaN counts as infinitely wrong."""
    error = (
        (result.double() - reference.double()).abs().max() / reference.double().abs().max().clamp_min(1e-30)
    ).item()
    return error if error == error else float("inf")


def mismatch(result: list[Tensor], reference: list[Tensor]) -> float:
    """The largest relative error over the output and every gradient (what the CSV reports)."""
    if len(result) != len(reference):
        return float("inf")
    return max(relative_error(a, b) for a, b in zip(result, reference))


def accurate(result: list[Tensor], reference: list[Tensor], fp64: Callable[[], list[Tensor]], dtype: str) -> bool:
    """As `torch._dynamo.utils.same` with an fp64 reference: a tensor passes within the tolerance of eager, or when
    it is no further from an fp64 run than eager is (RMSE, times 2; times 3 in bf16 and for tensors under 1000
    elements) plus a tenth of the tolerance. Where softmax saturates, fp32 eager itself is 1e-3 from fp64, and a
    compiled run that rounds in other places is as right as eager. `fp64` runs only when a tensor needs it."""
    if len(result) != len(reference):
        return False
    tol = TOLERANCE[dtype]
    outside = [i for i, (a, b) in enumerate(zip(result, reference)) if relative_error(a, b) > tol]
    if not outside:
        return True
    exact = fp64()
    for i in outside:
        multiplier = 3.0 if dtype != "float32" or exact[i].numel() < 1000 else 2.0
        if not _rmse(result[i], exact[i]) <= multiplier * _rmse(reference[i], exact[i]) + tol / 10:
            return False  # `not <=`: a NaN error fails
    return True


def _rmse(a: Tensor, b: Tensor) -> float:
    return torch.sqrt(torch.mean((a.double() - b.double()) ** 2)).item()
